//! Writing formed rows into the log: straight into the heap and its indexes, many at a time
//! (`CatalogTuplesMultiInsertWithInfo`), or through the executor as the log's owner when the
//! log has something more to maintain (an index with expressions, a trigger, a CHECK).

use super::{values, Layout, LogRow, LogTable, END, TOAST_THRESHOLD, TX_FIRST};
use crate::roles::as_role;
use pgrx::prelude::*;
use pgrx::spi::Spi;
use pgrx::PgMemoryContexts;

/// The log opened for writing, for the rest of the transaction: opened and closed under the
/// top transaction's resource owner, so subtransactions come and go around it.
pub(super) struct Writer {
    pub(super) rel: pg_sys::Relation,
    /// The log's indexes, when rows go straight into the heap; null for the executor path.
    pub(super) indexes: pg_sys::CatalogIndexState,
    /// Slots for multi-row inserts, made once, over a copy of the log's row descriptor that
    /// they need not pin (pinning a thousand was a tenth of an ingest's time).
    pub(super) slots: Vec<*mut pg_sys::TupleTableSlot>,
    pub(super) desc: pg_sys::TupleDesc,
    /// See `Layout`; decided per transaction, as an update adds columns under a lock.
    pub(super) layout: Layout,
}

impl Writer {
    pub(super) unsafe fn open(relid: pg_sys::Oid) -> Self {
        in_top_transaction(|| {
            let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as i32);
            let layout = Layout::of(rel).unwrap_or_else(|e| error!("{e}"));
            let mut indexes = pg_sys::CatalogOpenIndexes(rel);
            if !only_plain_indexes(rel, indexes) {
                pg_sys::CatalogCloseIndexes(indexes);
                indexes = std::ptr::null_mut();
            }
            Writer {
                rel,
                indexes,
                slots: Vec::new(),
                desc: std::ptr::null_mut(), // made with the first slot
                layout,
            }
        })
    }

    pub(super) unsafe fn close(self) {
        in_top_transaction(|| {
            if !self.indexes.is_null() {
                pg_sys::CatalogCloseIndexes(self.indexes);
            }
            pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
        })
    }

    /// A row of the log, formed where it outlives the call (it may be written at commit).
    pub(super) unsafe fn form(&self, values: &[Option<pg_sys::Datum>]) -> pg_sys::HeapTuple {
        let mut datums: Vec<pg_sys::Datum> = values
            .iter()
            .map(|v| v.unwrap_or(pg_sys::Datum::from(0)))
            .collect();
        let mut nulls: Vec<bool> = values.iter().map(Option::is_none).collect();
        PgMemoryContexts::TopTransactionContext.switch_to(|_| {
            pg_sys::heap_form_tuple((*self.rel).rd_att, datums.as_mut_ptr(), nulls.as_mut_ptr())
        })
    }

    /// Writes formed rows into the table and frees them.
    pub(super) unsafe fn write(&mut self, tuples: &mut Vec<pg_sys::HeapTuple>) {
        if tuples.is_empty() {
            return;
        }
        let desc = (*self.rel).rd_att;
        if !self.indexes.is_null() {
            // A row that will be TOASTed goes alone: the multi-insert would index the row
            // before TOASTing, at no location (its TID is set on the TOASTed copy only). So
            // does a single row: it needs no slot.
            let (alone, small): (Vec<_>, Vec<_>) = tuples.iter().partition(|&&tuple| {
                tuples.len() == 1
                    || (*tuple).t_len as usize > TOAST_THRESHOLD
                    || (*(*tuple).t_data).t_infomask & pg_sys::HEAP_HASEXTERNAL as u16 != 0
            });
            for tuple in alone {
                pg_sys::CatalogTupleInsertWithInfo(self.rel, tuple, self.indexes);
            }
            if self.desc.is_null() && !small.is_empty() {
                self.desc = in_top_transaction(|| pg_sys::CreateTupleDescCopy(desc));
            }
            while self.slots.len() < small.len() {
                let slot = PgMemoryContexts::TopTransactionContext.switch_to(|_| {
                    pg_sys::MakeSingleTupleTableSlot(self.desc, &pg_sys::TTSOpsHeapTuple)
                });
                self.slots.push(slot);
            }
            let slots = &mut self.slots[..small.len()];
            for (&slot, tuple) in slots.iter().zip(small) {
                pg_sys::ExecStoreHeapTuple(tuple, slot, false);
            }
            pg_sys::CatalogTuplesMultiInsertWithInfo(
                self.rel,
                slots.as_mut_ptr(),
                slots.len() as i32,
                self.indexes,
            );
            for &slot in slots.iter() {
                pg_sys::ExecClearTuple(slot);
            }
        } else {
            let owner = (*(*self.rel).rd_rel).relowner;
            let rowtype = (*(*self.rel).rd_rel).reltype;
            // At commit no snapshot is active; the executor needs one (as deferred triggers do).
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            for &tuple in tuples.iter() {
                let row = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
                as_role(owner, || {
                    Spi::run_with_args(
                        "INSERT INTO sync.change_history OVERRIDING SYSTEM VALUE SELECT ($1).*",
                        &[pgrx::datum::DatumWithOid::new(row, rowtype)],
                    )
                    .expect("writing the log through the executor")
                });
            }
            pg_sys::PopActiveSnapshot();
        }
        for tuple in tuples.drain(..) {
            pg_sys::heap_freetuple(tuple);
        }
    }

    /// A row that closes a transaction whose newest change was rolled back.
    pub(super) unsafe fn end_row(&self, log: &LogTable) -> pg_sys::HeapTuple {
        let end = LogRow {
            table_name: "",
            entity_code: "",
            op: END,
            entity_id: None,
            data: None,
            old_data: None,
            changed_columns: None,
            schema_version: 0,
            tracking: None,
            client_id: None,
            source: "trigger",
            lsn: None,
        };
        self.form(&values(log.next_id(), end))
    }

    /// The row with its `tx_first` set: the transaction's last.
    pub(super) unsafe fn marked(
        &self,
        last: pg_sys::HeapTuple,
        first_id: i64,
    ) -> pg_sys::HeapTuple {
        let mut column = TX_FIRST;
        let mut value = pg_sys::Datum::from(first_id);
        let mut null = false;
        let marked = PgMemoryContexts::TopTransactionContext.switch_to(|_| {
            pg_sys::heap_modify_tuple_by_cols(
                last,
                (*self.rel).rd_att,
                1,
                &mut column,
                &mut value,
                &mut null,
            )
        });
        pg_sys::heap_freetuple(last);
        marked
    }
}

/// Runs `f` under the top transaction's resource owner and memory context.
pub(super) unsafe fn in_top_transaction<T>(f: impl FnOnce() -> T) -> T {
    let owner = pg_sys::CurrentResourceOwner;
    pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
    let result = PgMemoryContexts::TopTransactionContext.switch_to(|_| f());
    pg_sys::CurrentResourceOwner = owner;
    result
}

/// Whether every index of the log is plain (no expressions, no predicate) and the log has
/// no trigger and no CHECK constraint: what `CatalogTuplesMultiInsertWithInfo` maintains is
/// then all there is to maintain.
pub(super) unsafe fn only_plain_indexes(
    rel: pg_sys::Relation,
    indexes: pg_sys::CatalogIndexState,
) -> bool {
    let constraints = (*(*rel).rd_att).constr;
    if !(*rel).trigdesc.is_null() || (!constraints.is_null() && (*constraints).num_check > 0) {
        return false;
    }
    let infos = std::slice::from_raw_parts(
        (*indexes).ri_IndexRelationInfo,
        (*indexes).ri_NumIndices as usize,
    );
    infos
        .iter()
        .all(|&info| (*info).ii_Expressions.is_null() && (*info).ii_Predicate.is_null())
}
