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
mod settled;
mod slot;
mod tracked;

use crate::gucs::test_ingest_fault;
use crate::jsonb::to_value;
use crate::log::{LogRow, LogTable};
use crate::roles::as_role;
use crate::wakeup;
use enrich::{Change, Enricher};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::Value;
use slot::{create_slot, ingest_lock, slot_exists};
use std::ops::ControlFlow;
use tracked::TrackedTables;

/// The replication slot pg_sync reads.
pub const SLOT: &str = "pg_sync";
/// The logical-message prefix of origin tags (`sync.tag_origin`).
pub const MESSAGE_PREFIX: &str = "pg_sync";
/// Decoded rows fetched from the cursor at a time.
const FETCH: i64 = 1000;

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
