//! pg_sync, the PostgreSQL extension: an ordered, gap-free change log of tracked tables for
//! applications that keep a local copy of their data.
//!
//! Data flows through the modules in this order:
//! - `capture`: the trigger that turns each change of a tracked table into a log row;
//! - `log`: appends rows to `sync.change_history` without the executor;
//! - `wakeup`: readers are woken after the writers commit, without writers paying for NOTIFY;
//! - `pg_sync_core::cursor` (the workspace's `core/` crate): what a position in the log is (a
//!   snapshot), as pure Rust shared with the gateway;
//! - `changes`: reading the log from a cursor.
//!
//! Beside them: `wal` (capture from the WAL through wal2json), `policy` (row-level security
//! judged on row images, for the gateway), `roles` (whose rights each piece runs with: SPEC
//! 1.9) and `gucs` (settings).
//!
//! The tables live in `sql/schema.sql`, the PL/pgSQL part of the API (tracking, pruning,
//! status and the error-raising wrapper of `changes_since`) in `sql/api.sql`.

use pgrx::prelude::*;

mod capture;
mod changes;
mod gucs;
mod jsonb;
mod log;
mod policy;
mod roles;
mod wakeup;
mod wal;

pgrx::pg_module_magic!();

extension_sql_file!("sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("sql/api.sql", name = "api", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    log::init();
    wakeup::init();
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Set-up of the cluster that `cargo pgrx test` starts.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_sync'",
            "wal_level = logical",
        ]
    }
}
