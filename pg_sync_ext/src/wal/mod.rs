//! The WAL path: tables tracked with `capture => 'wal'` have no trigger; their changes are
//! decoded from the write-ahead log by wal2json (format version 2) and enriched into the same
//! log rows the trigger writes.
//!
//! - `enrich`: one decoded change to log rows, typed as the trigger types them.
//! - `sync.ingest_wal`: peek, store, and only then let the slot move. The slot moves at the
//!   *start* of the next call, to just past the last commit LSN stored (kept in `sync.state`
//!   by the storing transaction itself): moving it in the storing transaction would lose the
//!   changes if that transaction then failed, because slots are not transactional. A call
//!   that finds already-stored transactions again (after a failure between the two steps)
//!   skips them by their commit LSN: nothing is stored twice.
//!
//! Decoded rows stream through an SPI cursor, so a transaction of a million rows is stored
//! whole with bounded memory (what one change allocates is freed before the next). Known
//! wal2json limits: a numeric NaN or ±Infinity arrives as JSON null (recorded as NULL); a
//! logical message's content ends at a NUL byte.

mod enrich;

use crate::gucs::test_ingest_fault;
use crate::jsonb::to_value;
use crate::log::{LogRow, LogTable};
use crate::roles::as_role;
use crate::wakeup;
use enrich::{Change, Enricher, Publication};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::Value;
use std::collections::HashMap;
use std::ops::ControlFlow;

/// The replication slot pg_sync reads.
pub const SLOT: &str = "pg_sync";
/// The logical-message prefix of origin tags (`sync.tag_origin`).
pub const MESSAGE_PREFIX: &str = "pg_sync";
/// The ingest lock: `sync_lock.ingest` (schema.sql) in EXCLUSIVE mode, held by an ingest
/// and by slot creation for their transaction, so that two never run at once. A table lock
/// in a schema no other role may use, not an advisory key, which any role could hold.
mod ingest_lock {
    use pgrx::pg_sys;

    const MODE: pg_sys::LOCKMODE = pg_sys::ExclusiveLock as pg_sys::LOCKMODE;

    fn table() -> pg_sys::Oid {
        // SAFETY: catalog lookups by name; the extension's script created both.
        let oid = unsafe {
            let schema = pg_sys::get_namespace_oid(c"sync_lock".as_ptr(), false);
            pg_sys::get_relname_relid(c"ingest".as_ptr(), schema)
        };
        assert!(oid != pg_sys::InvalidOid, "sync_lock.ingest exists");
        oid
    }

    /// Takes it, waiting for whoever holds it.
    pub fn take() {
        // SAFETY: a lock on an existing relation, released at transaction end.
        unsafe { pg_sys::LockRelationOid(table(), MODE) }
    }

    /// Takes it if it is free now.
    pub fn try_take() -> bool {
        // SAFETY: as `take`, without waiting.
        unsafe { pg_sys::ConditionalLockRelationOid(table(), MODE) }
    }

    /// Gives it back before the transaction ends.
    pub fn release() {
        // SAFETY: releases the lock `try_take` took in this transaction.
        unsafe { pg_sys::UnlockRelationOid(table(), MODE) }
    }
}
/// Decoded rows fetched from the cursor at a time.
const FETCH: i64 = 1000;

/// A tracked table, as enrichment needs it.
pub struct Tracked {
    pub schema: String,
    /// `schema.table`, as the log names it.
    pub name: String,
    pub entity_code: String,
    pub schema_version: i32,
    /// `sync.tracked.tracking` when the change is ingested.
    pub tracking: i64,
    /// The published columns; None: all.
    pub published: Option<Vec<String>>,
    /// The primary key's columns in key order.
    pub key: Vec<String>,
    /// The table's owner: its values are typed with the owner's rights, not the
    /// extension's (type input functions, domain checks and casts to json are user code).
    pub owner: pg_sys::Oid,
}

impl Tracked {
    fn publication(&self) -> Publication<'_> {
        Publication {
            columns: self.published.as_deref(),
            key: &self.key,
        }
    }
}

/// Tracked tables by table name (then schema).
#[derive(Default)]
pub struct TrackedTables(HashMap<String, Vec<Tracked>>);

impl TrackedTables {
    /// The tracked tables; `wal_only` keeps those tracked with WAL capture.
    fn read(client: &SpiClient<'_>, wal_only: bool) -> Self {
        let rows = client
            .select(
                "SELECT n.nspname::text, c.relname::text, t.entity_code, t.schema_version, t.columns,
                        ARRAY(SELECT a.attname::text FROM pg_catalog.pg_index i
                               CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY u(attnum, o)
                                JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.attnum
                               WHERE i.indrelid = t.relid AND i.indisprimary ORDER BY u.o),
                        c.relowner, t.tracking
                   FROM sync.tracked t
                   JOIN pg_catalog.pg_class c ON c.oid = t.relid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE NOT $1 OR t.capture = 'wal'",
                None,
                &[wal_only.into()],
            )
            .expect("reading sync.tracked");
        let mut tables = TrackedTables::default();
        for r in rows {
            let schema: String = r.get(1).unwrap().unwrap();
            let table: String = r.get(2).unwrap().unwrap();
            let tracked = Tracked {
                name: format!("{schema}.{table}"),
                schema,
                entity_code: r.get(3).unwrap().unwrap(),
                schema_version: r.get(4).unwrap().unwrap(),
                published: r.get(5).unwrap(),
                key: r.get(6).unwrap().unwrap_or_default(),
                owner: r.get(7).unwrap().unwrap(),
                tracking: r.get(8).unwrap().unwrap(),
            };
            tables.0.entry(table).or_default().push(tracked);
        }
        tables
    }

    fn find(&self, schema: &str, table: &str) -> Option<&Tracked> {
        self.0.get(table)?.iter().find(|t| t.schema == schema)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (table, tracked) pairs.
    fn iter(&self) -> impl Iterator<Item = (&str, &Tracked)> {
        self.0
            .iter()
            .flat_map(|(table, all)| all.iter().map(move |t| (table.as_str(), t)))
    }

    fn retain(&mut self, keep: impl Fn(&Tracked) -> bool) {
        for all in self.0.values_mut() {
            all.retain(&keep);
        }
        self.0.retain(|_, all| !all.is_empty());
    }
}

/// One wal2json format-version-2 change as the log rows it becomes (a JSON array, empty when
/// the table is not tracked or an UPDATE changed nothing published). Runs as the caller,
/// who needs to read `sync.tracked`.
#[pg_extern(name = "enrich_wal2json", stable, parallel_safe)]
fn enrich_wal2json(change: JsonB) -> JsonB {
    let line = change.0.to_string();
    let change = Change::parse(&line);
    let tables = Spi::connect(|client| TrackedTables::read(client, false));
    let Some(tracked) = tables.find(&change.schema, &change.table) else {
        return JsonB(Value::Array(vec![]));
    };
    let mut enricher = Enricher::new();
    let rows = enricher.in_change(|e| {
        e.enrich(&change, &tracked.publication())
            .into_iter()
            .map(|r| {
                // SAFETY: jsonb datums made just now, alive until the next change.
                let json = |d: Option<pg_sys::Datum>| d.map(|d| unsafe { to_value(d) });
                serde_json::json!({
                    "table_name": tracked.name, "entity_code": tracked.entity_code, "op": r.op,
                    "entity_id": r.entity_id, "data": json(r.data), "old_data": json(r.old_data),
                    "changed_columns": r.changed, "lsn": change.lsn, "schema_version": tracked.schema_version,
                    "source": "wal",
                })
            })
            .collect()
    });
    JsonB(Value::Array(rows))
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
    if !ingest_lock::try_take() {
        return 0;
    }
    let tables = TrackedTables::read(client, true);
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
    let log = LogTable::resolve().expect("sync.change_history");
    let mut enricher = Enricher::new();
    let mut tx = Transaction::default();
    let mut last_commit = None;
    // Tags that came after some of their transaction's rows: (first id, last id, tag),
    // applied to those rows at the end.
    let mut late_tags: Vec<(i64, i64, String)> = Vec::new();
    // Reads everything up to `max_changes` (whole transactions): never breaks.
    let _ = peek(client, &tables, Some(max_changes), |_, change| {
        match change.action.as_ref() {
            "B" => {
                let commit = change.lsn.as_deref().map(parse_lsn);
                tx = Transaction {
                    commit,
                    skip: already_stored(commit, stored),
                    ..Default::default()
                };
            }
            "C" if !tx.skip => {
                last_commit = tx.commit.or(last_commit);
                if let (Some(first), Some(last), Some(client_id)) =
                    (tx.tag_from, tx.last_id, &tx.client_id)
                {
                    late_tags.push((first, last, client_id.clone()));
                }
            }
            "M" if !tx.skip
                && change.prefix.as_deref() == Some(MESSAGE_PREFIX)
                && change.transactional =>
            {
                tx.client_id = change.content.as_deref().map(str::to_owned);
                tx.tag_from = tx.first_id;
            }
            "I" | "U" | "D" | "T" if !tx.skip => {
                if let Some(tracked) = tables.find(&change.schema, &change.table) {
                    enricher.in_change(|e| {
                        let rows =
                            as_role(tracked.owner, || e.enrich(change, &tracked.publication()));
                        for r in rows {
                            let id = append(
                                &log,
                                LogRow {
                                    table_name: &tracked.name,
                                    entity_code: &tracked.entity_code,
                                    op: r.op,
                                    entity_id: r.entity_id,
                                    data: r.data,
                                    old_data: r.old_data,
                                    changed_columns: r.changed,
                                    schema_version: tracked.schema_version,
                                    tracking: Some(tracked.tracking),
                                    client_id: None,
                                    source: "wal",
                                    lsn: None,
                                },
                                &tx,
                            );
                            tx.first_id.get_or_insert(id);
                            tx.last_id = Some(id);
                            added += 1;
                        }
                    });
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
        // This ingest's rows of that transaction only: trigger-captured rows of concurrent
        // transactions may hold ids in the same range.
        client
            .update(
                "UPDATE sync.change_history SET client_id = $1
                  WHERE id BETWEEN $2 AND $3 AND client_id IS NULL
                    AND txid OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id()",
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
                "UPDATE sync.state SET wal_stored_lsn = $1::pg_lsn, last_ingest_at = pg_catalog.now()",
                None,
                &[format_lsn(commit).into()],
            )
            .unwrap();
    } else {
        client
            .update(
                "UPDATE sync.state SET last_ingest_at = pg_catalog.now()",
                None,
                &[],
            )
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
        // Without the lock when there is nothing to do: `track` calls this, and a table's
        // owner who left that transaction open would otherwise hold every ingest back.
        if slot_exists(client) {
            return false;
        }
        // One creator at a time, and not while an ingest reads the slot.
        ingest_lock::take();
        if slot_exists(client) {
            return false;
        }
        let tables = TrackedTables::read(client, true);
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
    tables: &TrackedTables,
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
    let mut tables = Spi::connect(|client| TrackedTables::read(client, true));
    tables.retain(|t| t.entity_code == entity_code);
    if tables.is_empty() {
        return true;
    }
    if !ingest_lock::try_take() {
        return false; // an ingest holds the slot
    }
    // Released at once, not at the end of the caller's (long) snapshot transaction; on an
    // error, the transaction's end releases it.
    let settled = Spi::connect(|client| no_pending_change(client, &tables));
    ingest_lock::release();
    settled
}

/// No change of `tables` visible to the transaction's snapshot waits in the slot unstored.
fn no_pending_change(client: &SpiClient<'_>, tables: &TrackedTables) -> bool {
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
        match change.action.as_ref() {
            "B" => {
                let commit = change.lsn.as_deref().map(parse_lsn);
                // SAFETY: a valid snapshot; xid of a committed transaction.
                let visible = !unsafe {
                    pg_sys::XidInMVCCSnapshot(pg_sys::TransactionId::from(xid), snapshot)
                };
                pending = visible && !already_stored(commit, stored);
            }
            "I" | "U" | "D" | "T" if pending => return ControlFlow::Break(()),
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
    tables: &TrackedTables,
    upto: Option<i32>,
    mut each: impl FnMut(u32, &Change<'_>) -> ControlFlow<()>,
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
            let xid = row.get::<&str>(1).unwrap().and_then(|x| x.parse().ok());
            let data: &str = row.get(2).unwrap().unwrap();
            each(xid.unwrap_or(0), &Change::parse(data))?;
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

/// Appends a row of the transaction read from the slot, with its origin tag and commit LSN.
fn append(log: &LogTable, row: LogRow<'_>, tx: &Transaction) -> i64 {
    // SAFETY: the datums are jsonb values made by enrichment, alive until the next change.
    unsafe {
        log.append(LogRow {
            client_id: tx.client_id.clone(),
            lsn: tx.commit,
            ..row
        })
    }
}

/// One TRUNCATE row per WAL-tracked entity, for a slot that was lost.
fn mark_slot_lost(client: &mut SpiClient<'_>, tables: &TrackedTables) -> i64 {
    client
        .update(
            "UPDATE sync.state SET wal_slot_lost_at = pg_catalog.now()",
            None,
            &[],
        )
        .unwrap();
    client
        .update("SELECT pg_catalog.pg_current_xact_id()", None, &[])
        .unwrap();
    let log = LogTable::resolve().expect("sync.change_history");
    let mut added = 0;
    for (_, tracked) in tables.iter() {
        let row = LogRow {
            table_name: &tracked.name,
            entity_code: &tracked.entity_code,
            op: "TRUNCATE",
            entity_id: None,
            data: None,
            old_data: None,
            changed_columns: None,
            schema_version: tracked.schema_version,
            tracking: Some(tracked.tracking),
            client_id: None,
            source: "wal",
            lsn: None,
        };
        append(&log, row, &Transaction::default());
        added += 1;
    }
    added
}

/// wal2json's options: format 2 with what enrichment needs, only the WAL-tracked tables
/// (so the log's own writes never come back) and only pg_sync's messages.
fn peek_options(tables: &TrackedTables) -> String {
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
        .iter()
        .map(|(table, t)| format!("{}.{}", escape(&t.schema), escape(table)))
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
