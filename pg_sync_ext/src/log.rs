//! Writing rows into `sync.change_history`, the hot path of every tracked write.
//!
//! **Straight into the heap and its indexes.** An SPI `INSERT` per row pays an executor
//! start-up each time (plan copy, expression set-up, CHECK constraints parsed from text):
//! measured, a 100k-row UPDATE took 1.88 s tracked against 0.30 s untracked. Here a row costs
//! a `nextval`, its share of a multi-row heap insert and one insert per index, as PostgreSQL
//! does for its catalogs (`CatalogTuplesMultiInsertWithInfo`); the log and its indexes are
//! opened once per transaction. That is only right while the log has nothing else to
//! maintain: when someone adds an index with expressions or a predicate, a trigger or a CHECK
//! constraint to it, rows go through the executor instead (an `INSERT`, as the log's owner).
//! Which way is decided when a transaction first writes, under its lock on the log.
//!
//! **The last row of a transaction says so.** A reader orders transactions by their last
//! log id and must know which row is a transaction's last (see `cursor/src/lib.rs`); asking
//! that of an index for every row was most of the cost of reading. So a transaction's rows
//! are held back (their ids taken at once, in capture order) and written in batches, and the
//! last one, at commit, with `tx_first`, the transaction's first id: a reader finds the
//! transactions of an id range, and their rows, by two range scans. When the newest change
//! rolled back with a savepoint after older ones were written, the transaction ends with a
//! row of op `END` instead, which readers use as the key and never return. A transaction
//! that reads the log it writes sees its own held rows only after `sync._flush_log()`.
//!
//! Neither the heap insert nor the id (`nextval_internal` without its permission check)
//! asks for privileges: the capture runs as the writer, who has none on `sync`, and this is
//! the only way it writes there. Nothing here runs user-defined code, except through the
//! executor path, as the log's owner, which is whoever added what made it necessary.

use crate::roles::as_role;
use pgrx::prelude::*;
use pgrx::spi::Spi;
use pgrx::PgMemoryContexts;
use std::cell::{Cell, RefCell};
use std::ffi::CStr;

/// The columns of `sync.change_history`, in table order, as written here.
const COLUMNS: [&str; 16] = [
    "id",
    "table_name",
    "entity_code",
    "op",
    "entity_id",
    "data",
    "old_data",
    "changed_columns",
    "client_id",
    "txid",
    "lsn",
    "schema_version",
    "source",
    "captured_at",
    "tx_first",
    "tracking",
];

/// The attribute number of `tx_first`.
const TX_FIRST: i32 = 15;

/// The op of a transaction's closing row when its last change was rolled back.
pub const END: &str = "END";

/// Rows longer than this are TOASTed when inserted (`TOAST_TUPLE_THRESHOLD`,
/// access/heaptoast.h: a quarter of a page, less the page header and four line pointers).
const TOAST_THRESHOLD: usize = ((pg_sys::BLCKSZ as usize - 40) / 4) & !7;

/// Rows held back before a batch is written (and at most this many bytes of them).
const BATCH_ROWS: usize = 1000;
const BATCH_BYTES: usize = 4 << 20;

/// One change to record. Datums are owned by the current memory context.
pub struct LogRow<'a> {
    pub table_name: &'a str,
    pub entity_code: &'a str,
    pub op: &'a str,
    pub entity_id: Option<String>,
    pub data: Option<pg_sys::Datum>,
    pub old_data: Option<pg_sys::Datum>,
    pub changed_columns: Option<Vec<String>>,
    pub schema_version: i32,
    /// The tracking of the table that wrote it (`sync.tracked.tracking`).
    pub tracking: Option<i64>,
    /// The writer's origin tag.
    pub client_id: Option<String>,
    /// `trigger` or `wal`.
    pub source: &'a str,
    /// The commit LSN, for WAL capture.
    pub lsn: Option<u64>,
}

/// The log table, resolved once per cached capture.
#[derive(Clone, Copy, PartialEq)]
pub struct LogTable {
    relid: pg_sys::Oid,
    sequence: pg_sys::Oid,
}

#[derive(Debug, thiserror::Error)]
pub enum LogTableError {
    #[error("pg_sync: sync.change_history or its id sequence is missing")]
    Missing,
    #[error("pg_sync: sync.change_history does not have the columns this version writes")]
    Shape,
}

impl LogTable {
    /// Finds the log table and checks its columns.
    pub fn resolve() -> Result<Self, LogTableError> {
        // SAFETY: catalog lookups by name; the relation is opened and closed with a lock.
        unsafe {
            let schema = pg_sys::get_namespace_oid(c"sync".as_ptr(), true);
            let relid = pg_sys::get_relname_relid(c"change_history".as_ptr(), schema);
            let sequence = pg_sys::get_relname_relid(c"change_history_id_seq".as_ptr(), schema);
            if relid == pg_sys::InvalidOid || sequence == pg_sys::InvalidOid {
                return Err(LogTableError::Missing);
            }
            let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as i32);
            let shape = Layout::of(rel);
            pg_sys::table_close(rel, pg_sys::NoLock as i32);
            shape.map(|_| LogTable { relid, sequence })
        }
    }

    /// Appends one row, with its id taken now from the log's sequence; returns the id. The
    /// row reaches the table at the latest when the transaction commits (see the module).
    ///
    /// # Safety
    /// The datums in `row` must be valid values of the columns' types.
    pub unsafe fn append(&self, row: LogRow<'_>) -> i64 {
        if CLOSING.get() {
            error!("pg_sync: a trigger on sync.change_history may not change a tracked table");
        }
        let id = self.next_id();
        let values = values(id, row);
        IN_FLIGHT.with(|f| {
            let mut f = f.borrow_mut();
            let transaction = match f.as_mut() {
                Some(transaction) if transaction.log == *self => transaction,
                _ => f.insert(InFlight::start(*self, id)),
            };
            let layout = transaction.writer.layout;
            let tuple = transaction.writer.form(&values[..layout.columns()]);
            if layout == Layout::V1 {
                transaction.writer.write(&mut vec![tuple]);
                return;
            }
            let here = pg_sys::GetCurrentSubTransactionId();
            if transaction.unwritten.len() >= BATCH_ROWS || transaction.held_bytes >= BATCH_BYTES {
                transaction.write_rows_of(here);
            }
            transaction.hold(Unwritten {
                tuple,
                bytes: (*tuple).t_len as usize,
                id,
                at: here,
            });
        });
        id
    }

    unsafe fn next_id(&self) -> i64 {
        pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| nextval_internal(self.sequence, false))
    }
}

/// A log row's columns, in table order (`tx_first` left NULL), for the current transaction.
unsafe fn values(id: i64, row: LogRow<'_>) -> [Option<pg_sys::Datum>; 16] {
    [
        Some(pg_sys::Datum::from(id)),
        row.table_name.into_datum(),
        row.entity_code.into_datum(),
        row.op.into_datum(),
        row.entity_id.into_datum(),
        row.data,
        row.old_data,
        row.changed_columns.into_datum(),
        row.client_id.into_datum(),
        Some(pg_sys::Datum::from(pg_sys::GetTopFullTransactionId().value)),
        row.lsn.map(pg_sys::Datum::from),
        row.schema_version.into_datum(),
        row.source.into_datum(),
        Some(pg_sys::Datum::from(
            pg_sys::GetCurrentTransactionStartTimestamp(),
        )),
        None,
        row.tracking.map(pg_sys::Datum::from),
    ]
}

/// The log opened for writing, for the rest of the transaction: opened and closed under the
/// top transaction's resource owner, so subtransactions come and go around it.
struct Writer {
    rel: pg_sys::Relation,
    /// The log's indexes, when rows go straight into the heap; null for the executor path.
    indexes: pg_sys::CatalogIndexState,
    /// Slots for multi-row inserts, made once, over a copy of the log's row descriptor that
    /// they need not pin (pinning a thousand was a tenth of an ingest's time).
    slots: Vec<*mut pg_sys::TupleTableSlot>,
    desc: pg_sys::TupleDesc,
    /// See `Layout`; decided per transaction, as an update adds columns under a lock.
    layout: Layout,
}

impl Writer {
    unsafe fn open(relid: pg_sys::Oid) -> Self {
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

    unsafe fn close(self) {
        in_top_transaction(|| {
            if !self.indexes.is_null() {
                pg_sys::CatalogCloseIndexes(self.indexes);
            }
            pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
        })
    }

    /// A row of the log, formed where it outlives the call (it may be written at commit).
    unsafe fn form(&self, values: &[Option<pg_sys::Datum>]) -> pg_sys::HeapTuple {
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
    unsafe fn write(&mut self, tuples: &mut Vec<pg_sys::HeapTuple>) {
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
    unsafe fn end_row(&self, log: &LogTable) -> pg_sys::HeapTuple {
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
    unsafe fn marked(&self, last: pg_sys::HeapTuple, first_id: i64) -> pg_sys::HeapTuple {
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

/// The log's columns, by the version that made them: until `ALTER EXTENSION pg_sync UPDATE`
/// has run, capture writes the log as the installed version's schema has it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// 0.1.0: no `tx_first`; rows are written at once, unmarked (the update marks them).
    V1,
    /// 0.2.0: `tx_first`; rows are held back to mark each transaction's last.
    V2,
    /// 0.3.0: and `tracking`.
    V3,
}

impl Layout {
    /// The layout of the log `rel`; an error when its columns are none of them.
    unsafe fn of(rel: pg_sys::Relation) -> Result<Layout, LogTableError> {
        let desc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let names: Vec<&str> = desc.iter().map(|a| a.name()).collect();
        [Layout::V3, Layout::V2, Layout::V1]
            .into_iter()
            .find(|layout| names == COLUMNS[..layout.columns()])
            .ok_or(LogTableError::Shape)
    }

    fn columns(self) -> usize {
        match self {
            Layout::V1 => 14,
            Layout::V2 => 15,
            Layout::V3 => 16,
        }
    }
}

/// Runs `f` under the top transaction's resource owner and memory context.
unsafe fn in_top_transaction<T>(f: impl FnOnce() -> T) -> T {
    let owner = pg_sys::CurrentResourceOwner;
    pg_sys::CurrentResourceOwner = pg_sys::TopTransactionResourceOwner;
    let result = PgMemoryContexts::TopTransactionContext.switch_to(|_| f());
    pg_sys::CurrentResourceOwner = owner;
    result
}

/// Whether every index of the log is plain (no expressions, no predicate) and the log has
/// no trigger and no CHECK constraint: what `CatalogTuplesMultiInsertWithInfo` maintains is
/// then all there is to maintain.
unsafe fn only_plain_indexes(rel: pg_sys::Relation, indexes: pg_sys::CatalogIndexState) -> bool {
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

/// A row formed but not yet in the table, and the subtransaction it belongs to.
struct Unwritten {
    tuple: pg_sys::HeapTuple,
    /// The tuple's size, toward the batch's byte bound.
    bytes: usize,
    id: i64,
    at: pg_sys::SubTransactionId,
}

/// What the current transaction has logged.
///
/// A row is written only while the subtransaction it belongs to is the current one (written
/// inside a child, a rollback of the child would take the parent's row with it; the first
/// version did that, and lost rows). A row belongs to the subtransaction that appended it
/// until that one commits into its parent. Subtransaction ids grow, so a rollback of `s`
/// discards exactly what belongs to `s` or to a later id. Held rows are at most a batch per
/// open nesting level: a subtransaction's rows are written when it commits, an enclosing
/// level's when its batch is full.
struct InFlight {
    log: LogTable,
    writer: Writer,
    /// The first id the transaction took (a lower bound of its rows' ids).
    first_id: i64,
    unwritten: Vec<Unwritten>,
    /// The size of the rows in `unwritten`.
    held_bytes: usize,
    /// The highest id written, per subtransaction.
    written: Vec<(pg_sys::SubTransactionId, i64)>,
}

impl InFlight {
    unsafe fn start(log: LogTable, first_id: i64) -> Self {
        InFlight {
            log,
            writer: Writer::open(log.relid),
            first_id,
            unwritten: Vec::new(),
            held_bytes: 0,
            written: Vec::new(),
        }
    }

    fn hold(&mut self, row: Unwritten) {
        self.held_bytes += row.bytes;
        self.unwritten.push(row);
    }

    fn recount(&mut self) {
        self.held_bytes = self.unwritten.iter().map(|row| row.bytes).sum();
    }

    /// Writes the rows that belong to `here`, the current subtransaction.
    unsafe fn write_rows_of(&mut self, here: pg_sys::SubTransactionId) {
        let (now, later): (Vec<_>, Vec<_>) =
            self.unwritten.drain(..).partition(|row| row.at == here);
        self.unwritten = later;
        self.recount();
        if let Some(newest) = now.iter().map(|row| row.id).max() {
            self.wrote(here, newest);
        }
        self.writer
            .write(&mut now.into_iter().map(|row| row.tuple).collect());
    }

    fn wrote(&mut self, at: pg_sys::SubTransactionId, id: i64) {
        match self.written.iter_mut().find(|(level, _)| *level == at) {
            Some((_, max)) => *max = (*max).max(id),
            None => self.written.push((at, id)),
        }
    }

    /// A subtransaction rolled back: what belongs to it is gone.
    fn forget(&mut self, subtransaction: pg_sys::SubTransactionId) {
        self.unwritten.retain(|row| row.at < subtransaction);
        self.written.retain(|(at, _)| *at < subtransaction);
        self.recount();
    }

    /// A subtransaction commits into `parent`: its rows are written now, while it is still
    /// current, and what it wrote belongs to `parent` from here on.
    unsafe fn commit_into(
        &mut self,
        subtransaction: pg_sys::SubTransactionId,
        parent: pg_sys::SubTransactionId,
    ) {
        self.write_rows_of(subtransaction);
        let moved = self
            .written
            .iter()
            .filter(|(at, _)| *at >= subtransaction)
            .map(|(_, id)| *id)
            .max();
        self.written.retain(|(at, _)| *at < subtransaction);
        if let Some(id) = moved {
            self.wrote(parent, id);
        }
    }

    /// At commit: writes what is left, the newest row marked as the transaction's last; or,
    /// when a row already written is newer, a closing END row. Nothing for a transaction
    /// whose changes all rolled back, so an END row always closes a transaction with changes.
    unsafe fn close(mut self) {
        let newest_written = self.written.iter().map(|(_, id)| *id).max();
        let newest = (0..self.unwritten.len()).max_by_key(|&i| self.unwritten[i].id);
        let last = match newest {
            Some(i) if newest_written.is_none_or(|w| self.unwritten[i].id > w) => {
                Some(self.unwritten.swap_remove(i).tuple)
            }
            _ if newest_written.is_some() => Some(self.writer.end_row(&self.log)),
            _ => None,
        };
        let mut rows: Vec<_> = self.unwritten.drain(..).map(|row| row.tuple).collect();
        if let Some(last) = last.filter(|_| self.writer.layout != Layout::V1) {
            rows.push(self.writer.marked(last, self.first_id));
        }
        self.writer.write(&mut rows);
        self.writer.close();
    }
}

thread_local! {
    static IN_FLIGHT: RefCell<Option<InFlight>> = const { RefCell::new(None) };
    /// The transaction's last rows are being written: a change captured now (by a trigger
    /// on the log) would come after the transaction's last row, where no reader looks.
    static CLOSING: Cell<bool> = const { Cell::new(false) };
}

/// Called from `_PG_init`: the transaction callbacks that write the held rows.
pub fn init() {
    // SAFETY: registers callbacks for the life of the backend.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_transaction), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subtransaction), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_transaction(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => {
            if let Some(transaction) = IN_FLIGHT.with(|f| f.borrow_mut().take()) {
                CLOSING.set(true);
                transaction.close();
                CLOSING.set(false);
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PREPARE | XACT_EVENT_PARALLEL_ABORT => {
            // The rows' memory went with the transaction's context, the open log with its
            // resource owner.
            IN_FLIGHT.with(|f| f.borrow_mut().take());
            CLOSING.set(false);
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subtransaction(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    IN_FLIGHT.with(|f| {
        let mut f = f.borrow_mut();
        let Some(transaction) = f.as_mut() else {
            return;
        };
        match event {
            SUBXACT_EVENT_ABORT_SUB => transaction.forget(subtransaction),
            SUBXACT_EVENT_PRE_COMMIT_SUB => transaction.commit_into(subtransaction, parent),
            _ => {}
        }
    });
}

/// Writes the rows held back that belong to the current subtransaction (the newest one then
/// stays unmarked, and the transaction ends with an END row): for a transaction that reads
/// the log it writes.
#[pg_extern(name = "_flush_log", volatile, parallel_unsafe)]
fn flush_log() {
    flush();
}

/// Writes the rows held back now (see `_flush_log`).
pub fn flush() {
    IN_FLIGHT.with(|f| {
        if let Some(transaction) = f.borrow_mut().as_mut() {
            // SAFETY: rows formed by `append` for this log.
            unsafe { transaction.write_rows_of(pg_sys::GetCurrentSubTransactionId()) };
        }
    });
}

unsafe extern "C-unwind" {
    /// commands/sequence.h; `check_permissions = false` skips the USAGE/UPDATE check that
    /// `nextval()` makes for the current user.
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// A setting's value (`SET sync.client_id = ...`), None when unset or empty.
pub fn setting(name: &CStr) -> Option<String> {
    // SAFETY: GetConfigOption returns NULL or a string owned by the GUC machinery.
    unsafe {
        let value = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        if value.is_null() {
            return None;
        }
        let value = CStr::from_ptr(value).to_string_lossy();
        (!value.is_empty()).then(|| value.into_owned())
    }
}
