//! Whether a snapshot of a WAL-captured entity may be paired with its cursor: no change of
//! it visible to the snapshot still waits in the slot unstored (`sync._wal_settled`).

use super::slot::ingest_lock;
use super::tracked::TrackedTables;
use super::{already_stored, parse_lsn, peek, SLOT};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::ops::ControlFlow;

/// Whether a snapshot of `entity_code` taken by the calling REPEATABLE READ transaction may
/// be paired with its `current_cursor()`: false while a WAL change of that entity, committed
/// before the transaction's snapshot, is not yet stored in the log as the snapshot sees it.
/// Its row would be in the snapshot but its log row after the cursor, reaching the client
/// twice. True for trigger-captured entities, which log in the writing transaction. False
/// also when it cannot tell (an ingest runs, or moved the slot after the snapshot): retry.
/// On a hot standby, which has no slot, raises 25006 for a WAL-captured entity.
/// (Internal: the gateway's snapshot endpoint waits for this.)
#[pg_extern(name = "_wal_settled", volatile, parallel_unsafe)]
fn wal_settled(entity_code: &str) -> bool {
    let mut tables = Spi::connect(|client| TrackedTables::read(client, true));
    tables.retain(|t| t.entity_code == entity_code);
    if tables.is_empty() {
        return true;
    }
    // SAFETY: reads a flag of shared memory.
    if unsafe { pg_sys::RecoveryInProgress() } {
        // The slot, and so what waits in it, lives on the primary only.
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("pg_sync: a hot standby cannot tell whether WAL changes of {entity_code} are in the log yet"),
            function_name!(),
        )
        .set_hint("Read snapshots of WAL-captured entities on the primary.")
        .report(PgLogLevel::ERROR);
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
