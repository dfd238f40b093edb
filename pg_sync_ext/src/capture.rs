//! The capture trigger `sync.capture()`: turns each INSERT, UPDATE, DELETE and TRUNCATE of a
//! tracked table into rows of `sync.change_history`, inside the writing transaction.
//!
//! It owns the row-to-log mapping and nothing else: which tables are tracked and with which
//! options is decided by `sync.track` (api.sql), which passes the options as trigger
//! arguments, so the hot path never looks anything up. What it needs from the catalog (the
//! primary key, the published columns, an insert plan) is computed once per trigger and
//! backend and cached by trigger OID; any change of options or of the table's shape recreates
//! the trigger, which gives it a new OID. Rows reach the log through `log.rs`, without SPI.
//!
//! Decisions made here:
//! - an UPDATE that changes no published column writes no row (compared by value, after
//!   detoasting, so `SET x = x` is not a change);
//! - an UPDATE that changes the primary key is a DELETE of the old id and an INSERT of the new
//!   one, because clients key their caches by id;
//! - `data`/`old_data` are `to_jsonb` of the row minus unpublished columns;
//! - `entity_id` is the key's text, or for a composite key the JSON array of the columns' texts
//!   (`["7","u1"]`).
//!
//! It runs as the writer (not SECURITY DEFINER: `to_jsonb` calls user-defined casts, which
//! must not run with the extension owner's rights) and needs no privilege on `sync`: the log
//! is written by `log.rs` without asking for any. It runs no SQL, so a writer's search_path
//! cannot reach into it. Because anyone could attach it to a table of their own, it writes
//! only for a table and options recorded in `sync.tracked` (SPEC 1.9), checked when its
//! cache entry is built.

use crate::jsonb::ToJsonb;
use crate::log::{setting, LogRow, LogTable, LogTableError};
use crate::wakeup;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgMemoryContexts, PgRelation, PgTupleDesc};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

/// What the trigger needs to know about one tracked table, built once per backend.
struct TableCapture {
    relid: pg_sys::Oid,
    natts: usize,
    table_name: String,
    entity_code: String,
    schema_version: i32,
    /// `sync.tracked.tracking` (None: a trigger made before 0.3.0, until the update).
    tracking: Option<i64>,
    /// Per attribute (by attnum - 1): its name when published, None when unpublished or dropped.
    published: Vec<Option<String>>,
    /// The primary key's attributes in key order, with their output functions.
    key: Vec<(usize, pg_sys::Oid)>,
    to_json: RowToJson,
    log: LogTable,
}

thread_local! {
    static CACHE: RefCell<HashMap<pg_sys::Oid, Rc<TableCapture>>> = RefCell::new(HashMap::new());
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("sync.capture must be called as an AFTER trigger by a table tracked with sync.track")]
    Misused,
    #[error("sync.capture: the trigger arguments of {0} are damaged; run sync.track again")]
    BadArguments(String),
    #[error("sync.capture: {0} is not tracked with these options; only sync.track installs capture triggers")]
    NotTracked(String),
    #[error("sync.capture: {0} has no primary key")]
    NoPrimaryKey(String),
    #[error(transparent)]
    Log(#[from] LogTableError),
}

impl CaptureError {
    /// Raises the error with its SQLSTATE.
    fn report(self) -> ! {
        let code = match self {
            CaptureError::NotTracked(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            CaptureError::NoPrimaryKey(_) => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            CaptureError::Misused | CaptureError::BadArguments(_) => {
                PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION
            }
            CaptureError::Log(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        };
        ErrorReport::new(code, self.to_string(), "sync.capture").report(PgLogLevel::ERROR);
        unreachable!("an ERROR does not return")
    }
}

#[pg_trigger]
fn capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    if let Err(e) = capture_change(trigger) {
        e.report();
    }
    Ok(None)
}

fn capture_change(trigger: &PgTrigger<'_>) -> Result<(), CaptureError> {
    let data = trigger.trigger_data();
    let event = data.tg_event;
    let truncate = pgrx::trigger_support::trigger_fired_by_truncate(event);
    if !pgrx::trigger_support::trigger_fired_after(event)
        || truncate == pgrx::trigger_support::trigger_fired_for_row(event)
    {
        return Err(CaptureError::Misused); // AFTER, per row, or per statement for TRUNCATE
    }
    // SAFETY: PostgreSQL hands the trigger an open relation and tuples that live until the
    // trigger returns.
    unsafe {
        let table = table_capture(trigger)?;
        let tupdesc = (*data.tg_relation).rd_att;
        if truncate {
            table.log("TRUNCATE", None, None, None, None);
        } else if pgrx::trigger_support::trigger_fired_by_insert(event) {
            let new = data.tg_trigtuple;
            table.log(
                "INSERT",
                Some(table.entity_id(new, tupdesc)),
                Some((new, tupdesc)),
                None,
                None,
            );
        } else if pgrx::trigger_support::trigger_fired_by_delete(event) {
            let old = data.tg_trigtuple;
            table.log(
                "DELETE",
                Some(table.entity_id(old, tupdesc)),
                None,
                Some((old, tupdesc)),
                None,
            );
        } else {
            let (old, new) = (data.tg_trigtuple, data.tg_newtuple);
            let (old_id, new_id) = (table.entity_id(old, tupdesc), table.entity_id(new, tupdesc));
            if old_id != new_id {
                table.log("DELETE", Some(old_id), None, Some((old, tupdesc)), None);
                table.log("INSERT", Some(new_id), Some((new, tupdesc)), None, None);
            } else {
                let changed = table.changed_columns(old, new, tupdesc);
                if !changed.is_empty() {
                    table.log(
                        "UPDATE",
                        Some(new_id),
                        Some((new, tupdesc)),
                        Some((old, tupdesc)),
                        Some(changed),
                    );
                }
            }
        }
    }
    Ok(())
}

/// The cached capture of the firing trigger, built on first use.
unsafe fn table_capture(trigger: &PgTrigger<'_>) -> Result<Rc<TableCapture>, CaptureError> {
    let tgoid = trigger.trigger().tgoid;
    let rel = trigger.trigger_data().tg_relation;
    let natts = (*(*rel).rd_att).natts as usize;
    if let Some(found) = CACHE.with(|c| c.borrow().get(&tgoid).cloned()) {
        if found.natts == natts {
            return Ok(found);
        }
    }
    let built = Rc::new(TableCapture::build(trigger)?);
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        cache.retain(|_, t| t.relid != built.relid);
        cache.insert(tgoid, built.clone());
    });
    Ok(built)
}

impl TableCapture {
    unsafe fn build(trigger: &PgTrigger<'_>) -> Result<Self, CaptureError> {
        let rel = PgRelation::from_pg(trigger.trigger_data().tg_relation);
        let table_name = format!("{}.{}", rel.namespace(), rel.name());
        let args = trigger
            .extra_args()
            .map_err(|_| CaptureError::BadArguments(table_name.clone()))?;
        let (Some(entity_code), Some(version)) = (args.first(), args.get(1)) else {
            return Err(CaptureError::BadArguments(table_name));
        };
        // `schema_version@tracking` (a trigger of 0.2.0 carries the version alone).
        let (version, tracking) = match version.split_once('@') {
            Some((version, tracking)) => (version, Some(tracking)),
            None => (version.as_str(), None),
        };
        let bad = || CaptureError::BadArguments(table_name.clone());
        let schema_version = version.parse().map_err(|_| bad())?;
        let tracking = tracking
            .map(|t| t.parse::<i64>().map_err(|_| bad()))
            .transpose()?;
        let allow_list = &args[2..];
        let tracked = TrackedRow::find(rel.oid());
        let matches = tracked.as_ref().is_some_and(|t| {
            t.capture == "trigger"
                && t.entity_code == *entity_code
                && t.schema_version == schema_version
                && t.tracking == tracking
                && t.columns.as_deref().unwrap_or_default() == allow_list
        });
        if !matches {
            return Err(CaptureError::NotTracked(table_name));
        }

        let key = primary_key(rel.as_ptr());
        if key.is_empty() {
            return Err(CaptureError::NoPrimaryKey(table_name));
        }
        let tupdesc = PgTupleDesc::from_pg_unchecked(rel.rd_att);
        let mut published = Vec::with_capacity(tupdesc.len());
        let mut hidden = Vec::new();
        for (i, att) in tupdesc.iter().enumerate() {
            let name = att.name().to_owned();
            let in_key = key.iter().any(|&(k, _)| k == i);
            if att.is_dropped() {
                published.push(None);
            } else if allow_list.is_empty() || in_key || allow_list.contains(&name) {
                published.push(Some(name));
            } else {
                published.push(None);
                hidden.push(name);
            }
        }
        let key = key
            .into_iter()
            .map(|(i, typid)| {
                let (mut out, mut varlena) = (pg_sys::InvalidOid, false);
                pg_sys::getTypeOutputInfo(typid, &mut out, &mut varlena);
                (i, out)
            })
            .collect();
        let rowtype = rel.rd_rel.as_ref().expect("relation form").reltype;
        Ok(TableCapture {
            relid: rel.oid(),
            natts: tupdesc.len(),
            table_name,
            entity_code: entity_code.clone(),
            schema_version,
            tracking,
            published,
            key,
            to_json: RowToJson::new(rowtype, &hidden),
            log: LogTable::resolve()?,
        })
    }

    /// The key's text; a composite key as a JSON array of texts.
    unsafe fn entity_id(&self, tuple: pg_sys::HeapTuple, tupdesc: pg_sys::TupleDesc) -> String {
        let mut parts = self.key.iter().map(|&(i, out)| {
            let mut is_null = false;
            let datum = pg_sys::heap_getattr(tuple, i as i32 + 1, tupdesc, &mut is_null);
            if is_null {
                String::new() // a primary key column is NOT NULL; kept total anyway
            } else {
                let text = pg_sys::OidOutputFunctionCall(out, datum);
                let owned = CStr::from_ptr(text).to_string_lossy().into_owned();
                pg_sys::pfree(text.cast());
                owned
            }
        });
        if self.key.len() == 1 {
            parts.next().unwrap_or_default()
        } else {
            serde_json::to_string(&parts.collect::<Vec<_>>()).expect("strings serialize")
        }
    }

    /// The published columns whose values differ between the two versions of a row.
    unsafe fn changed_columns(
        &self,
        old: pg_sys::HeapTuple,
        new: pg_sys::HeapTuple,
        tupdesc: pg_sys::TupleDesc,
    ) -> Vec<String> {
        let desc = PgTupleDesc::from_pg_unchecked(tupdesc);
        let mut changed = Vec::new();
        for (i, name) in self.published.iter().enumerate() {
            let Some(name) = name else { continue };
            let att = desc.get(i).expect("attribute in range");
            let (mut old_null, mut new_null) = (false, false);
            let a = pg_sys::heap_getattr(old, i as i32 + 1, tupdesc, &mut old_null);
            let b = pg_sys::heap_getattr(new, i as i32 + 1, tupdesc, &mut new_null);
            let same = match (old_null, new_null) {
                (true, true) => true,
                (false, false) => same_value(a, b, att.attlen, att.attbyval),
                _ => false,
            };
            if !same {
                changed.push(name.clone());
            }
        }
        changed
    }

    /// Appends one log row and arranges the wake-up of readers.
    unsafe fn log(
        &self,
        op: &str,
        entity_id: Option<String>,
        data: Option<(pg_sys::HeapTuple, pg_sys::TupleDesc)>,
        old_data: Option<(pg_sys::HeapTuple, pg_sys::TupleDesc)>,
        changed_columns: Option<Vec<String>>,
    ) {
        self.log.append(LogRow {
            table_name: &self.table_name,
            entity_code: &self.entity_code,
            op,
            entity_id,
            data: data.map(|(t, d)| self.to_json.convert(t, d)),
            old_data: old_data.map(|(t, d)| self.to_json.convert(t, d)),
            changed_columns,
            schema_version: self.schema_version,
            tracking: self.tracking,
            client_id: setting(c"sync.client_id"), // the writer's origin tag
            source: "trigger",
            lsn: None,
        });
        wakeup::note_log_write();
    }
}

/// Appends an ACCESS row for `tbl`'s entity: who may read it changed here, so that every
/// reader meets the change in the log's order (`sync._note_access` calls it; granted to no
/// one else). Its subscribers all refetch there.
#[pg_extern(name = "_log_access", volatile, parallel_unsafe)]
fn log_access(tbl: pg_sys::Oid) {
    append_access(tbl, None);
}

/// Appends an ACCESS row for `tbl`'s entity, naming in `data` the membership rows whose
/// write it marks (`Scope`), or nothing (None): then everyone refetches.
fn append_access(tbl: pg_sys::Oid, data: Option<&serde_json::Value>) {
    let Some(tracked) = TrackedRow::find(tbl) else {
        return;
    };
    let log = LogTable::resolve().unwrap_or_else(|e| CaptureError::from(e).report());
    // SAFETY: names read from the syscache (NULL when the table is gone), and a row of no
    // datums but its JSON. No lock on the table: writers of a table a policy reads must not
    // wait for whoever holds the tracked table.
    unsafe {
        let text = |name: *mut std::ffi::c_char| {
            (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
        };
        let (Some(schema), Some(name)) = (
            text(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(tbl))),
            text(pg_sys::get_rel_name(tbl)),
        ) else {
            return;
        };
        let table_name = format!("{schema}.{name}");
        log.append(LogRow {
            table_name: &table_name,
            entity_code: &tracked.entity_code,
            op: "ACCESS",
            entity_id: None,
            data: data.and_then(|d| pgrx::JsonB(d.clone()).into_datum()),
            old_data: None,
            changed_columns: None,
            schema_version: tracked.schema_version,
            tracking: tracked.tracking,
            client_id: None,
            source: "trigger",
            lsn: None,
        });
    }
    wakeup::note_log_write();
}

/// The most changed rows of one statement whose ACCESS rows name them: past it, one ACCESS
/// row naming nothing (everyone refetches) and none for the rest, so that a bulk write of a
/// membership table puts a bounded number of rows into the log.
const NAMED_PER_STATEMENT: u32 = 100;

/// A statement of this backend: local transaction, subtransaction, command.
type Statement = (u32, u32, u32);

thread_local! {
    /// Per `_policy_input` trigger (its oid: a partition's copy and a trigger of its own
    /// count apart, and so do two tables a statement alternates between): the statement
    /// (local transaction, subtransaction, command) whose changed rows it last wrote ACCESS
    /// rows for, and how many of its rows did. The subtransaction: an inner write rolled back
    /// with its ACCESS row (an EXCEPTION block) shares the outer statement's command id. The
    /// local transaction id: a transaction writing only to a foreign partition has no xid.
    static ACCESS_NOTED: RefCell<HashMap<u32, (Statement, u32)>> =
        RefCell::new(HashMap::new());
}

/// What `sync._watch_policy_inputs` passes a `_policy_input` trigger first: the watched
/// table, and the columns of it that the policies read (None: they read it whole, or read no
/// column of it, so no row can be named).
#[derive(serde::Deserialize)]
struct Watched {
    input: u32,
    columns: Option<Vec<String>>,
}

/// The triggers `sync._policy_input(watched, relid, ...)` that `sync._watch_policy_inputs`
/// puts on each table a tracked table's policies read (a membership table): rows of the
/// tracked tables named by its arguments enter or leave users' sight when it changes,
/// without changing themselves, so each gets an ACCESS row at this point of the log. A row
/// trigger (INSERT, UPDATE, DELETE) writes one per changed row, naming the row's old and
/// new values of the columns the policies read (as text), so that only the subscribers a
/// policy matches with them refetch (`AccessScope` in the gateway); past
/// `NAMED_PER_STATEMENT` rows, one naming nothing. An UPDATE of other columns writes one
/// too: the column list may be older than a policy that reads more (its update waits for a
/// lock at most 1 s), and a row lacking a column a policy compares concerns everyone. A
/// statement that changes nothing writes nothing; TRUNCATE (the statement trigger) names
/// nothing, nor does a database whose encoding is not UTF-8. It runs as the writer (the
/// columns' output functions too, as a SELECT of them by the writer would), runs no SQL,
/// and writes only for tables that are tracked; attaching it elsewhere needs EXECUTE on it,
/// which no one is granted.
#[pg_trigger]
fn _policy_input<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    let args = trigger.extra_args().unwrap_or_default();
    // Triggers made before the first argument named the watched table pass relids only.
    let (watched, relids) = match args.first().map(|a| serde_json::from_str::<Watched>(a)) {
        Some(Ok(watched)) => (Some(watched), &args[1..]),
        _ => (None, &args[..]),
    };
    let mut data = None;
    if matches!(trigger.level(), PgTriggerLevel::Row) {
        // SAFETY: reads of this backend's transaction state; MyProc is set in a backend.
        let statement = unsafe {
            (
                (*pg_sys::MyProc).lxid,
                pg_sys::GetCurrentSubTransactionId(),
                pg_sys::GetCurrentCommandId(false),
            )
        };
        let tgoid = u32::from(trigger.trigger().tgoid);
        let written = ACCESS_NOTED.with_borrow(|noted| match noted.get(&tgoid) {
            Some((noted, written)) if *noted == statement => *written,
            _ => 0,
        });
        if written > NAMED_PER_STATEMENT {
            return Ok(None);
        }
        if written < NAMED_PER_STATEMENT {
            // SAFETY: the row trigger's own tuples and relation, live until it returns.
            let named = unsafe { watched.as_ref().and_then(|w| named_rows(trigger, w)) };
            data = named
                .zip(watched.as_ref())
                .map(|(rows, w)| serde_json::json!({"input": w.input, "rows": rows}));
        }
        // A row naming nothing refetches everyone: the statement's later rows need none.
        let written = match data {
            Some(_) => written + 1,
            None => NAMED_PER_STATEMENT + 1,
        };
        ACCESS_NOTED.with_borrow_mut(|noted| noted.insert(tgoid, (statement, written)));
    }
    for relid in relids.iter().filter_map(|a| a.parse::<u32>().ok()) {
        append_access(pg_sys::Oid::from(relid), data.as_ref());
    }
    Ok(None)
}

/// The changed row's old and new values (as the writer reads them, text or null) of the
/// columns the policies read, one object per image; None when a column is not found (the
/// table changed since its trigger was made: everyone refetches), or when the text is not
/// UTF-8 (another server encoding: the gateway compares it with its claims' UTF-8).
unsafe fn named_rows(
    trigger: &PgTrigger<'_>,
    watched: &Watched,
) -> Option<Vec<serde_json::Map<String, serde_json::Value>>> {
    let columns = watched.columns.as_ref()?;
    if pg_sys::GetDatabaseEncoding() != pg_sys::pg_enc::PG_UTF8 as i32 {
        return None;
    }
    let data = trigger.trigger_data();
    let event = data.tg_event;
    let desc = (*data.tg_relation).rd_att;
    let images = if pgrx::trigger_support::trigger_fired_by_update(event) {
        vec![data.tg_trigtuple, data.tg_newtuple]
    } else {
        vec![data.tg_trigtuple]
    };
    images
        .into_iter()
        .map(|tuple| {
            columns
                .iter()
                .map(|column| {
                    let name = std::ffi::CString::new(column.as_str()).ok()?;
                    let attnum = pg_sys::SPI_fnumber(desc, name.as_ptr());
                    if attnum <= 0 {
                        return None;
                    }
                    let value = pg_sys::SPI_getvalue(tuple, desc, attnum);
                    let value = match value.is_null() {
                        true => serde_json::Value::Null,
                        false => serde_json::Value::String(
                            CStr::from_ptr(value).to_str().ok()?.to_owned(),
                        ),
                    };
                    Some((column.clone(), value))
                })
                .collect()
        })
        .collect()
}

/// A table's row of `sync.tracked`, read without SQL and without privileges (the writer has
/// none on `sync`), as of the latest snapshot, like the trigger that fired.
struct TrackedRow {
    entity_code: String,
    capture: String,
    columns: Option<Vec<String>>,
    schema_version: i32,
    /// None before the 0.3.0 update added the column.
    tracking: Option<i64>,
}

impl TrackedRow {
    fn find(relid: pg_sys::Oid) -> Option<TrackedRow> {
        // SAFETY: a scan of sync.tracked by its first column (relid), opened and closed here;
        // the columns are read by their position in schema.sql.
        unsafe {
            let schema = pg_sys::get_namespace_oid(c"sync".as_ptr(), true);
            let table = pg_sys::get_relname_relid(c"tracked".as_ptr(), schema);
            if table == pg_sys::InvalidOid {
                return None;
            }
            let rel = pg_sys::table_open(table, pg_sys::AccessShareLock as i32);
            let mut key = pg_sys::ScanKeyData::default();
            pg_sys::ScanKeyInit(
                &mut key,
                1,
                pg_sys::BTEqualStrategyNumber as u16,
                pg_sys::Oid::from(pg_sys::F_OIDEQ),
                pg_sys::Datum::from(relid),
            );
            let scan = pg_sys::systable_beginscan(
                rel,
                pg_sys::InvalidOid,
                false,
                pg_sys::GetLatestSnapshot(),
                1,
                &mut key,
            );
            let tuple = pg_sys::systable_getnext(scan);
            let found = (!tuple.is_null()).then(|| {
                let desc = (*rel).rd_att;
                let get = |attnum: i32| {
                    let mut is_null = false;
                    let datum = pg_sys::heap_getattr(tuple, attnum, desc, &mut is_null);
                    (datum, is_null)
                };
                let text = |attnum| {
                    let (d, n) = get(attnum);
                    String::from_datum(d, n).unwrap_or_default()
                };
                let (columns, columns_null) = get(4);
                let (version, version_null) = get(5);
                let tracking = ((*desc).natts >= 7)
                    .then(|| {
                        let (tracking, tracking_null) = get(7);
                        i64::from_datum(tracking, tracking_null)
                    })
                    .flatten();
                TrackedRow {
                    entity_code: text(2),
                    capture: text(3),
                    columns: Vec::<String>::from_datum(columns, columns_null),
                    schema_version: i32::from_datum(version, version_null).unwrap_or_default(),
                    tracking,
                }
            });
            pg_sys::systable_endscan(scan);
            pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
            found
        }
    }
}

/// `to_jsonb(row) - hidden_columns`.
struct RowToJson {
    to_jsonb: ToJsonb,
    /// The unpublished columns' names as a text[], when there are any.
    hidden: Option<pg_sys::Datum>,
}

impl RowToJson {
    unsafe fn new(rowtype: pg_sys::Oid, hidden: &[String]) -> Self {
        let hidden = if hidden.is_empty() {
            None
        } else {
            PgMemoryContexts::TopMemoryContext.switch_to(|_| hidden.to_vec().into_datum())
        };
        RowToJson {
            to_jsonb: ToJsonb::new(rowtype, pg_sys::TopMemoryContext),
            hidden,
        }
    }

    unsafe fn convert(&self, tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) -> pg_sys::Datum {
        let json = self
            .to_jsonb
            .call(pg_sys::heap_copy_tuple_as_datum(tuple, desc));
        match self.hidden {
            None => json,
            Some(hidden) => pgrx::direct_function_call_as_datum(
                pg_sys::jsonb_delete_array,
                &[Some(json), Some(hidden)],
            )
            .expect("jsonb minus keys is not null"),
        }
    }
}

/// The primary key's attributes (0-based) and their types, in key order; empty without one.
unsafe fn primary_key(rel: pg_sys::Relation) -> Vec<(usize, pg_sys::Oid)> {
    let index_oid = pg_sys::RelationGetPrimaryKeyIndex(rel);
    if index_oid == pg_sys::InvalidOid {
        return Vec::new();
    }
    let index = pg_sys::index_open(index_oid, pg_sys::AccessShareLock as i32);
    let form = (*index).rd_index;
    let n = (*form).indnkeyatts as usize;
    let attnums = (*form).indkey.values.as_slice(n);
    let desc = PgTupleDesc::from_pg_unchecked((*rel).rd_att);
    let key = attnums
        .iter()
        .map(|&attnum| {
            let i = attnum as usize - 1;
            (i, desc.get(i).expect("key attribute").atttypid)
        })
        .collect();
    pg_sys::index_close(index, pg_sys::AccessShareLock as i32);
    key
}

/// Whether two non-null values of one attribute are the same value, byte for byte after
/// detoasting (so a value that moved between inline and TOAST storage is unchanged).
pub(crate) unsafe fn same_value(
    a: pg_sys::Datum,
    b: pg_sys::Datum,
    attlen: i16,
    byval: bool,
) -> bool {
    if byval {
        return a == b;
    }
    if a == b {
        return true; // the same pointer
    }
    match attlen {
        -1 => {
            let va = pg_sys::pg_detoast_datum_packed(a.cast_mut_ptr());
            let vb = pg_sys::pg_detoast_datum_packed(b.cast_mut_ptr());
            let (la, lb) = (
                pgrx::varlena::varsize_any_exhdr(va),
                pgrx::varlena::varsize_any_exhdr(vb),
            );
            la == lb
                && std::slice::from_raw_parts(pgrx::varlena::vardata_any(va).cast::<u8>(), la)
                    == std::slice::from_raw_parts(pgrx::varlena::vardata_any(vb).cast::<u8>(), lb)
        }
        -2 => CStr::from_ptr(a.cast_mut_ptr()) == CStr::from_ptr(b.cast_mut_ptr()),
        n => {
            let n = n as usize;
            std::slice::from_raw_parts(a.cast_mut_ptr::<u8>(), n)
                == std::slice::from_raw_parts(b.cast_mut_ptr::<u8>(), n)
        }
    }
}
