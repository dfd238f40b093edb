//! The WAL path: tables tracked with `capture => 'wal'` have no trigger; their changes are
//! decoded from the write-ahead log by wal2json (format version 2) and enriched into the same
//! log rows the trigger writes.
//!
//! - `enrich`: one decoded change to log rows. Values are typed as `to_jsonb` types them (each
//!   column's text goes through its type's input function and then `to_jsonb`), so a
//!   consumer cannot tell the paths apart except by `source`. An UPDATE's unchanged TOASTed
//!   columns, absent from wal2json's `columns`, are taken from the old row (`identity`, full
//!   under REPLICA IDENTITY FULL): never recorded as NULL.
//! - `sync.ingest_wal`: peek, store, and only then let the slot move. The slot moves at the
//!   *start* of the next call, to just past the last commit LSN stored (kept in `sync.state`
//!   by the storing transaction itself): moving it in the storing transaction would lose the
//!   changes if that transaction then failed, because slots are not transactional. A call
//!   that finds already-stored transactions again (after a failure between the two steps)
//!   skips them by their commit LSN: nothing is stored twice.
//!
//! Decoded rows stream through an SPI cursor, so a transaction of a million rows is stored
//! whole with bounded memory. Known wal2json limits: a numeric NaN or ±Infinity arrives as
//! JSON null (recorded as NULL); a logical message's content ends at a NUL byte.

use crate::gucs::test_ingest_fault;
use crate::jsonb::{to_value, ToJsonb};
use crate::log::{LogRow, LogTable};
use crate::roles::as_role;
use crate::wakeup;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::ops::ControlFlow;

/// The replication slot pg_sync reads.
pub const SLOT: &str = "pg_sync";
/// The logical-message prefix of origin tags (`sync.tag_origin`).
pub const MESSAGE_PREFIX: &str = "pg_sync";
/// Held (transaction-scoped) by an ingest, so two never run at once.
const INGEST_LOCK: i64 = 7_378_659_443;
/// Decoded rows fetched from the cursor at a time.
const FETCH: i64 = 1000;

/// A table tracked with WAL capture, as enrichment needs it.
pub struct Tracked {
    pub entity_code: String,
    pub schema_version: i32,
    /// The published columns; None: all.
    pub published: Option<Vec<String>>,
    /// The primary key's columns in key order.
    pub key: Vec<String>,
    /// The table's owner: its values are typed with the owner's rights, not the
    /// extension's (type input functions, domain checks and casts to json are user code).
    pub owner: pg_sys::Oid,
}

impl Tracked {
    fn publishes(&self, column: &str) -> bool {
        self.published
            .as_ref()
            .is_none_or(|p| p.iter().any(|c| c == column) || self.key.iter().any(|k| k == column))
    }
}

/// Tracked tables by (schema, table); `wal_only` keeps those tracked with WAL capture.
fn tracked_tables(client: &SpiClient<'_>, wal_only: bool) -> HashMap<(String, String), Tracked> {
    let rows = client
        .select(
            "SELECT n.nspname::text, c.relname::text, t.entity_code, t.schema_version, t.columns,
                    ARRAY(SELECT a.attname::text FROM pg_catalog.pg_index i
                           CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY u(attnum, o)
                            JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.attnum
                           WHERE i.indrelid = t.relid AND i.indisprimary ORDER BY u.o),
                    c.relowner
               FROM sync.tracked t
               JOIN pg_catalog.pg_class c ON c.oid = t.relid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE NOT $1 OR t.capture = 'wal'",
            None,
            &[wal_only.into()],
        )
        .expect("reading sync.tracked");
    rows.map(|r| {
        let key = (
            r.get::<String>(1).unwrap().unwrap(),
            r.get::<String>(2).unwrap().unwrap(),
        );
        let tracked = Tracked {
            entity_code: r.get(3).unwrap().unwrap(),
            schema_version: r.get(4).unwrap().unwrap(),
            published: r.get(5).unwrap(),
            key: r.get(6).unwrap().unwrap_or_default(),
            owner: r.get(7).unwrap().unwrap(),
        };
        (key, tracked)
    })
    .collect()
}

/// Input and output functions and `to_jsonb` of the types met so far.
#[derive(Default)]
pub struct Types(HashMap<u32, TypeIo>);

struct TypeIo {
    input: pg_sys::Oid,
    ioparam: pg_sys::Oid,
    output: pg_sys::Oid,
    to_jsonb: ToJsonb,
}

impl Types {
    fn io(&mut self, type_oid: u32) -> &TypeIo {
        self.0.entry(type_oid).or_insert_with(|| {
            let oid = pg_sys::Oid::from(type_oid);
            let (mut input, mut ioparam, mut output, mut varlena) = (
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                false,
            );
            // SAFETY: catalog lookups of an existing type (wal2json named it).
            unsafe {
                pg_sys::getTypeInputInfo(oid, &mut input, &mut ioparam);
                pg_sys::getTypeOutputInfo(oid, &mut output, &mut varlena);
                TypeIo {
                    input,
                    ioparam,
                    output,
                    to_jsonb: ToJsonb::new(oid),
                }
            }
        })
    }

    /// A wal2json value of a type: its JSON as `to_jsonb` would write it, and its text as
    /// the type's output function writes it.
    fn typed(&mut self, value: &Value, type_oid: u32) -> (Value, Option<String>) {
        let text = match value {
            Value::Null => return (Value::Null, None),
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            other => other.to_string(), // numbers keep their digits (arbitrary_precision)
        };
        let io = self.io(type_oid);
        let text = CString::new(text).unwrap_or_default();
        // SAFETY: the text is a value of the type, as PostgreSQL wrote it for wal2json.
        unsafe {
            let datum =
                pg_sys::OidInputFunctionCall(io.input, text.as_ptr().cast_mut(), io.ioparam, -1);
            let out = pg_sys::OidOutputFunctionCall(io.output, datum);
            let canonical = CStr::from_ptr(out).to_string_lossy().into_owned();
            (to_value(io.to_jsonb.call(datum)), Some(canonical))
        }
    }

    /// wal2json's `columns` or `identity` as a row: name → (json, text).
    fn row(&mut self, columns: Option<&Value>) -> HashMap<String, (Value, Option<String>)> {
        let mut row = HashMap::new();
        for c in columns.and_then(Value::as_array).into_iter().flatten() {
            let (Some(name), Some(type_oid)) = (c["name"].as_str(), c["typeoid"].as_u64()) else {
                continue;
            };
            row.insert(name.to_owned(), self.typed(&c["value"], type_oid as u32));
        }
        row
    }
}

/// A log row made from a decoded change.
#[derive(Debug, PartialEq)]
pub struct Enriched {
    pub table_name: String,
    pub entity_code: String,
    pub op: &'static str,
    pub entity_id: Option<String>,
    pub data: Option<Map<String, Value>>,
    pub old_data: Option<Map<String, Value>>,
    pub changed: Option<Vec<String>>,
    pub schema_version: i32,
}

/// One wal2json change as log rows: none for an UPDATE that changes no published column,
/// two (DELETE, INSERT) for an UPDATE of the primary key, else one.
pub fn enrich(change: &Value, tracked: &Tracked, types: &mut Types) -> Vec<Enriched> {
    let table_name = format!(
        "{}.{}",
        change["schema"].as_str().unwrap_or(""),
        change["table"].as_str().unwrap_or("")
    );
    let new = types.row(change.get("columns"));
    let old = types.row(change.get("identity"));
    let published = |row: &HashMap<String, (Value, Option<String>)>| -> Map<String, Value> {
        row.iter()
            .filter(|(k, _)| tracked.publishes(k))
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    };
    let entity_id = |row: &HashMap<String, (Value, Option<String>)>| -> Option<String> {
        let parts: Vec<String> = tracked
            .key
            .iter()
            .map(|k| row.get(k).and_then(|(_, t)| t.clone()).unwrap_or_default())
            .collect();
        match parts.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            many => Some(serde_json::to_string(many).expect("strings serialize")),
        }
    };
    let row = |op: &'static str, entity_id, data, old_data, changed| Enriched {
        table_name: table_name.clone(),
        entity_code: tracked.entity_code.clone(),
        op,
        entity_id,
        data,
        old_data,
        changed,
        schema_version: tracked.schema_version,
    };
    match change["action"].as_str() {
        Some("I") => vec![row(
            "INSERT",
            entity_id(&new),
            Some(published(&new)),
            None,
            None,
        )],
        Some("D") => vec![row(
            "DELETE",
            entity_id(&old),
            None,
            Some(published(&old)),
            None,
        )],
        Some("T") => vec![row("TRUNCATE", None, None, None, None)],
        Some("U") => {
            // Unchanged TOASTed columns are absent from `columns`: they are as they were.
            let mut new = new;
            for (name, value) in &old {
                new.entry(name.clone()).or_insert_with(|| value.clone());
            }
            let (new_id, old_id) = (entity_id(&new), entity_id(&old));
            if !old.is_empty() && new_id != old_id {
                return vec![
                    row("DELETE", old_id, None, Some(published(&old)), None),
                    row("INSERT", new_id, Some(published(&new)), None, None),
                ];
            }
            let (data, old_data) = (published(&new), published(&old));
            let mut changed: Vec<String> = data
                .iter()
                .filter(|(k, v)| old_data.get(*k) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
            changed.sort();
            if changed.is_empty() && !old.is_empty() {
                return vec![];
            }
            let old_data = (!old.is_empty()).then_some(old_data);
            vec![row("UPDATE", new_id, Some(data), old_data, Some(changed))]
        }
        _ => vec![],
    }
}

/// One wal2json format-version-2 change as the log rows it becomes (a JSON array, empty when
/// the table is not tracked or an UPDATE changed nothing published). Runs as the caller,
/// who needs to read `sync.tracked`.
#[pg_extern(name = "enrich_wal2json", stable, parallel_safe)]
fn enrich_wal2json(change: JsonB) -> JsonB {
    let change = change.0;
    let key = (
        change["schema"].as_str().unwrap_or("").to_owned(),
        change["table"].as_str().unwrap_or("").to_owned(),
    );
    let rows = Spi::connect(|client| {
        let tables = tracked_tables(client, false);
        tables
            .get(&key)
            .map(|t| enrich(&change, t, &mut Types::default()))
            .unwrap_or_default()
    });
    let lsn = change.get("lsn").cloned().unwrap_or(Value::Null);
    JsonB(Value::Array(
        rows.into_iter()
            .map(|r| {
                serde_json::json!({
                    "table_name": r.table_name, "entity_code": r.entity_code, "op": r.op,
                    "entity_id": r.entity_id, "data": r.data, "old_data": r.old_data,
                    "changed_columns": r.changed, "lsn": lsn, "schema_version": r.schema_version,
                    "source": "wal",
                })
            })
            .collect(),
    ))
}

/// Stores the committed changes of WAL-tracked tables that the `pg_sync` slot holds, whole
/// transactions at a time, stopping after the transaction that holds the `max_changes`th
/// change; returns the log rows added (0 when another ingest is running or nothing waits).
#[pg_extern(volatile, parallel_unsafe)]
fn ingest_wal(max_changes: default!(i32, 10000)) -> i64 {
    if max_changes < 1 {
        crate::changes::invalid_parameter(format!(
            "max_changes must be positive, not {max_changes}"
        ));
    }
    Spi::connect_mut(|client| ingest(client, max_changes))
}

fn ingest(client: &mut SpiClient<'_>, max_changes: i32) -> i64 {
    let locked: bool = client
        .select(
            "SELECT pg_catalog.pg_try_advisory_xact_lock($1)",
            None,
            &[INGEST_LOCK.into()],
        )
        .unwrap()
        .first()
        .get_one()
        .unwrap()
        .unwrap_or(false);
    if !locked {
        return 0;
    }
    let tables = tracked_tables(client, true);
    if tables.is_empty() {
        return 0;
    }
    let mut stored: Option<String> = client
        .select("SELECT wal_stored_lsn::text FROM sync.state", None, &[])
        .unwrap()
        .first()
        .get_one()
        .unwrap();
    let mut added = 0;
    if !slot_exists(client) {
        let (lost, start) = create_slot(client, &tables, stored.is_some());
        added += lost;
        stored = Some(start);
    } else if let Some(stored) = &stored {
        if test_ingest_fault().as_deref() != Some("skip_advance") {
            client
                .update(
                    "SELECT pg_catalog.pg_replication_slot_advance($1, $2::pg_lsn + 1)
                       FROM pg_catalog.pg_replication_slots
                      WHERE slot_name = $1 AND confirmed_flush_lsn <= $2::pg_lsn",
                    None,
                    &[SLOT.into(), stored.as_str().into()],
                )
                .expect("advancing the pg_sync slot");
        }
    }
    // The transaction's xid before any log id (see cursor/src/lib.rs).
    client
        .update("SELECT pg_catalog.pg_current_xact_id()", None, &[])
        .unwrap();
    let stored: Option<u64> = stored.map(|s| parse_lsn(&s));
    let log = crate::log::LogTable::resolve().expect("sync.change_history");
    let mut types = Types::default();
    let mut tx = Transaction::default();
    let mut last_commit = None;
    // Tags that came after some of their transaction's rows: (first id, last id, tag),
    // applied to those rows at the end.
    let mut late_tags: Vec<(i64, i64, String)> = Vec::new();
    // Reads everything up to `max_changes` (whole transactions): never breaks.
    let _ = peek(client, &tables, Some(max_changes), |_, change| {
        match change["action"].as_str() {
            Some("B") => {
                let commit = change["lsn"].as_str().map(parse_lsn);
                tx = Transaction {
                    commit,
                    skip: already_stored(commit, stored),
                    ..Default::default()
                };
            }
            Some("C") if !tx.skip => {
                last_commit = tx.commit.or(last_commit);
                if let (Some(first), Some(last), Some(client_id)) =
                    (tx.tag_from, tx.last_id, &tx.client_id)
                {
                    late_tags.push((first, last, client_id.clone()));
                }
            }
            Some("M")
                if !tx.skip
                    && change["prefix"] == MESSAGE_PREFIX
                    && change["transactional"] == true =>
            {
                tx.client_id = change["content"].as_str().map(str::to_owned);
                tx.tag_from = tx.first_id;
            }
            Some("I" | "U" | "D" | "T") if !tx.skip => {
                let key = (
                    change["schema"].as_str().unwrap_or("").to_owned(),
                    change["table"].as_str().unwrap_or("").to_owned(),
                );
                if let Some(tracked) = tables.get(&key) {
                    for r in as_role(tracked.owner, || enrich(&change, tracked, &mut types)) {
                        let id = append(&log, r, &tx);
                        tx.first_id.get_or_insert(id);
                        tx.last_id = Some(id);
                        added += 1;
                    }
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    });
    if !late_tags.is_empty() {
        crate::log::flush(); // the UPDATE below must see every row it tags
    }
    for (first, last, client_id) in late_tags {
        client
            .update(
                "UPDATE sync.change_history SET client_id = $1 WHERE id BETWEEN $2 AND $3 AND client_id IS NULL",
                None,
                &[client_id.as_str().into(), first.into(), last.into()],
            )
            .expect("tagging stored rows");
    }
    if test_ingest_fault().as_deref() == Some("fail_after_store") {
        error!("sync.test_ingest_fault: failing after storing, before the slot moves");
    }
    if let Some(commit) = last_commit {
        client
            .update(
                "UPDATE sync.state SET wal_stored_lsn = $1::pg_lsn, last_ingest_at = now()",
                None,
                &[format_lsn(commit).into()],
            )
            .unwrap();
    } else {
        client
            .update("UPDATE sync.state SET last_ingest_at = now()", None, &[])
            .unwrap();
    }
    if added > 0 {
        wakeup::note_log_write();
    }
    added
}

/// Creates pg_sync's replication slot unless it exists, so that no WAL change committed
/// from now on is missed (SPEC 1.5); true when it made one. `sync.track(..., capture =>
/// 'wal')` calls it before it writes anything, and so can an administrator, in a transaction
/// of its own, where `track` cannot (its transaction has already written).
#[pg_extern(volatile, parallel_unsafe)]
fn create_wal_slot() -> bool {
    Spi::connect_mut(|client| {
        // One creator at a time, and not while an ingest reads the slot.
        client
            .select(
                "SELECT pg_catalog.pg_advisory_xact_lock($1)",
                None,
                &[INGEST_LOCK.into()],
            )
            .expect("taking the ingest lock");
        if slot_exists(client) {
            return false;
        }
        let tables = tracked_tables(client, true);
        let stored: Option<String> = client
            .select("SELECT wal_stored_lsn::text FROM sync.state", None, &[])
            .unwrap()
            .first()
            .get_one()
            .unwrap();
        create_slot(client, &tables, stored.is_some());
        true
    })
}

fn slot_exists(client: &SpiClient<'_>) -> bool {
    client
        .select(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = $1)",
            None,
            &[SLOT.into()],
        )
        .unwrap()
        .first()
        .get_one()
        .unwrap()
        .unwrap_or(false)
}

/// Creates the slot; `was_read` says an earlier slot had been read from, so that its loss
/// is announced. Returns the log rows that announcement added and the LSN now counted as
/// stored (just before the new slot's start).
fn create_slot(
    client: &mut SpiClient<'_>,
    tables: &HashMap<(String, String), Tracked>,
    was_read: bool,
) -> (i64, String) {
    // SAFETY: reads the current transaction's state.
    if unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_sync: WAL capture needs its replication slot, and a transaction that has \
             already written cannot create one",
            function_name!(),
        )
        .set_hint("Run SELECT sync.create_wal_slot(); in a transaction of its own first.")
        .report(PgLogLevel::ERROR);
    }
    // `select` runs it without first giving the transaction an xid (pgrx's `update` would).
    let start: String = client
        .select(
            "SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot($1, 'wal2json')",
            None,
            &[SLOT.into()],
        )
        .and_then(|rows| rows.first().get_one())
        .expect("creating the pg_sync slot")
        .expect("a new slot has a start");
    let lost = if was_read {
        // The slot was lost after changes were read from it: what happened in between is
        // gone. Clients must not believe they are current, so each WAL entity gets a
        // TRUNCATE (a RESYNC for them), and sync.status() says when.
        mark_slot_lost(client, tables)
    } else {
        0
    };
    // Everything before the new slot's start counts as stored: the slot is then just past
    // what is stored, as after any ingest, which `_wal_settled` relies on.
    let before_start = format_lsn(parse_lsn(&start) - 1);
    client
        .update(
            "UPDATE sync.state SET wal_stored_lsn = $1::pg_lsn",
            None,
            &[before_start.as_str().into()],
        )
        .expect("recording the new slot's start");
    (lost, before_start)
}

/// Whether a snapshot of `entity_code` taken by the calling REPEATABLE READ transaction may
/// be paired with its `current_cursor()`: false while a WAL change of that entity, committed
/// before the transaction's snapshot, is not yet stored in the log as the snapshot sees it.
/// Its row would be in the snapshot but its log row after the cursor, reaching the client
/// twice. True for trigger-captured entities, which log in the writing transaction. False
/// also when it cannot tell (an ingest runs, or moved the slot after the snapshot): retry.
/// (Internal: the gateway's snapshot endpoint waits for this.)
#[pg_extern(name = "_wal_settled", volatile, parallel_unsafe)]
fn wal_settled(entity_code: &str) -> bool {
    let tables: HashMap<_, _> = Spi::connect(|client| tracked_tables(client, true))
        .into_iter()
        .filter(|(_, t)| t.entity_code == entity_code)
        .collect();
    if tables.is_empty() {
        return true;
    }
    let locked = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.pg_try_advisory_lock($1)",
        &[INGEST_LOCK.into()],
    );
    if locked != Ok(Some(true)) {
        return false; // an ingest holds the slot
    }
    PgTryBuilder::new(|| Spi::connect(|client| no_pending_change(client, &tables)))
        .finally(|| {
            Spi::run_with_args(
                "SELECT pg_catalog.pg_advisory_unlock($1)",
                &[INGEST_LOCK.into()],
            )
            .expect("releasing the ingest lock");
        })
        .execute()
}

/// No change of `tables` visible to the transaction's snapshot waits in the slot unstored.
fn no_pending_change(client: &SpiClient<'_>, tables: &HashMap<(String, String), Tracked>) -> bool {
    let state = client
        .select(
            "SELECT s.wal_stored_lsn::text,
                    (SELECT r.confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots r
                      WHERE r.slot_name = $1)
               FROM sync.state s",
            None,
            &[SLOT.into()],
        )
        .expect("reading sync.state")
        .first()
        .get_two::<String, String>()
        .expect("reading sync.state");
    let (stored, Some(confirmed)) = state else {
        return true; // no slot yet: nothing was decoded that the log lacks
    };
    let stored = stored.map(|s| parse_lsn(&s));
    // The slot moves only past stored changes (to just past them); past what this snapshot
    // sees stored, it moved after the snapshot and hides changes this snapshot may see.
    // (Before the first store the slot has not moved.)
    if stored.is_some_and(|s| parse_lsn(&confirmed) > s + 1) {
        return false;
    }
    // SAFETY: the transaction snapshot of the calling (REPEATABLE READ) transaction, valid
    // until it ends.
    let snapshot = unsafe { pg_sys::GetTransactionSnapshot() };
    let mut pending = false;
    let outcome = peek(client, tables, None, |xid, change| {
        match change["action"].as_str() {
            Some("B") => {
                let commit = change["lsn"].as_str().map(parse_lsn);
                // SAFETY: a valid snapshot; xid of a committed transaction.
                let visible = !unsafe {
                    pg_sys::XidInMVCCSnapshot(pg_sys::TransactionId::from(xid), snapshot)
                };
                pending = visible && !already_stored(commit, stored);
            }
            Some("I" | "U" | "D" | "T") if pending => return ControlFlow::Break(()),
            _ => {}
        }
        ControlFlow::Continue(())
    });
    outcome.is_continue()
}

/// Whether a transaction with this commit LSN was stored by an earlier ingest (whose last
/// stored commit is `stored`).
fn already_stored(commit: Option<u64>, stored: Option<u64>) -> bool {
    commit.is_some_and(|c| stored.is_some_and(|s| c <= s))
}

/// Streams what the slot holds for `tables` (peeked, so the slot does not move; through a
/// cursor, so memory stays flat), at most `upto` changes when given, to `each` with its
/// transaction's xid, until `each` breaks; says whether it did.
fn peek(
    client: &SpiClient<'_>,
    tables: &HashMap<(String, String), Tracked>,
    upto: Option<i32>,
    mut each: impl FnMut(u32, Value) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let sql = format!(
        "SELECT xid::text, data FROM pg_catalog.pg_logical_slot_peek_changes($1, NULL, $2, {})",
        peek_options(tables)
    );
    let mut cursor = client.open_cursor(sql.as_str(), &[SLOT.into(), upto.into()]);
    loop {
        let rows = cursor.fetch(FETCH).expect("reading decoded changes");
        if rows.is_empty() {
            return ControlFlow::Continue(());
        }
        for row in rows {
            let xid = row.get::<String>(1).unwrap().and_then(|x| x.parse().ok());
            let data: String = row.get(2).unwrap().unwrap();
            let change: Value = serde_json::from_str(&data).expect("wal2json writes JSON");
            each(xid.unwrap_or(0), change)?;
        }
    }
}

/// The transaction being read from the slot.
#[derive(Default)]
struct Transaction {
    /// Its commit LSN (wal2json's `lsn` of B and C).
    commit: Option<u64>,
    /// Stored by an earlier call.
    skip: bool,
    client_id: Option<String>,
    /// The log ids of its first and last rows stored by this call.
    first_id: Option<i64>,
    last_id: Option<i64>,
    /// Its tag came after the rows from this id on were stored without it.
    tag_from: Option<i64>,
}

fn append(log: &LogTable, r: Enriched, tx: &Transaction) -> i64 {
    let json = |m: Option<Map<String, Value>>| m.and_then(|m| JsonB(Value::Object(m)).into_datum());
    // SAFETY: the datums are jsonb values made just now.
    unsafe {
        log.append(LogRow {
            table_name: &r.table_name,
            entity_code: &r.entity_code,
            op: r.op,
            entity_id: r.entity_id,
            data: json(r.data),
            old_data: json(r.old_data),
            changed_columns: r.changed,
            schema_version: r.schema_version,
            client_id: tx.client_id.clone(),
            source: "wal",
            lsn: tx.commit,
        })
    }
}

/// One TRUNCATE row per WAL-tracked entity, for a slot that was lost.
fn mark_slot_lost(client: &mut SpiClient<'_>, tables: &HashMap<(String, String), Tracked>) -> i64 {
    client
        .update("UPDATE sync.state SET wal_slot_lost_at = now()", None, &[])
        .unwrap();
    client
        .update("SELECT pg_catalog.pg_current_xact_id()", None, &[])
        .unwrap();
    let log = LogTable::resolve().expect("sync.change_history");
    for ((schema, table), tracked) in tables {
        let r = Enriched {
            table_name: format!("{schema}.{table}"),
            entity_code: tracked.entity_code.clone(),
            op: "TRUNCATE",
            entity_id: None,
            data: None,
            old_data: None,
            changed: None,
            schema_version: tracked.schema_version,
        };
        append(&log, r, &Transaction::default());
    }
    tables.len() as i64
}

/// wal2json's options: format 2 with what enrichment needs, only the WAL-tracked tables
/// (so the log's own writes never come back) and only pg_sync's messages.
fn peek_options(tables: &HashMap<(String, String), Tracked>) -> String {
    // wal2json splits `add-tables` at commas and dots; other characters are literal after a
    // backslash.
    let escape = |name: &str| -> String {
        name.chars()
            .flat_map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    vec![c]
                } else {
                    vec!['\\', c]
                }
            })
            .collect()
    };
    let list: Vec<String> = tables
        .keys()
        .map(|(s, t)| format!("{}.{}", escape(s), escape(t)))
        .collect();
    let literal = |s: &str| pgrx::spi::quote_literal(s);
    [
        ("format-version", "2".to_owned()),
        ("include-xids", "1".into()),
        ("include-lsn", "1".into()),
        ("include-timestamp", "1".into()),
        ("include-pk", "1".into()),
        ("include-transaction", "1".into()),
        ("include-type-oids", "1".into()),
        ("add-tables", list.join(",")),
        ("add-msg-prefixes", MESSAGE_PREFIX.into()),
    ]
    .iter()
    .map(|(k, v)| format!("{}, {}", literal(k), literal(v)))
    .collect::<Vec<_>>()
    .join(", ")
}

fn parse_lsn(text: &str) -> u64 {
    let (high, low) = text.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(high, 16).unwrap_or(0) << 32) | u64::from_str_radix(low, 16).unwrap_or(0)
}

fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip() {
        assert_eq!(parse_lsn("0/65154A90"), 0x6515_4A90);
        assert_eq!(parse_lsn("1A/10"), (0x1A << 32) | 0x10);
        assert_eq!(format_lsn(parse_lsn("1A/FF0")), "1A/FF0");
    }
}
