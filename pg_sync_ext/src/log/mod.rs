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

mod held;
mod writer;

pub use held::{flush, init};
use held::{InFlight, Unwritten, CLOSING, IN_FLIGHT};
use pgrx::prelude::*;
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

unsafe extern "C-unwind" {
    /// commands/sequence.h; `check_permissions = false` skips the USAGE/UPDATE check that
    /// `nextval()` makes for the current user.
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}
