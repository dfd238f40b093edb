//! pg_sync's replication slot: made before anything of a WAL-tracked table can be missed
//! (`sync.create_wal_slot`, which `track` calls), made again when lost (its gap announced as
//! a TRUNCATE of every WAL entity), and the lock that keeps slot creation and ingests apart.

use super::tracked::TrackedTables;
use super::{append, format_lsn, parse_lsn, Transaction, SLOT};
use crate::log::{LogRow, LogTable};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

/// The ingest lock: `sync_lock.ingest` (schema.sql) in EXCLUSIVE mode, held by an ingest
/// and by slot creation for their transaction, so that two never run at once. A table lock
/// in a schema no other role may use, not an advisory key, which any role could hold.
pub(super) mod ingest_lock {
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

pub(super) fn slot_exists(client: &SpiClient<'_>) -> bool {
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
pub(super) fn create_slot(
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
