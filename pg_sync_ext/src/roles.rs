//! Whose rights pg_sync's code runs with (SPEC 1.9).
//!
//! The rule: no code a user can define (casts, type input and output functions, domain
//! checks, operators, policies) runs with more rights than the user who caused it. The
//! capture trigger is not SECURITY DEFINER: it runs as the writer, and writes the log
//! without asking for privileges (`log.rs`). The functions that must run as the extension's
//! owner (`track`, `ingest_wal`, the event triggers) either run no user code, or switch to
//! the table owner's rights around it (`as_role`), as PostgreSQL itself does for index
//! expressions and `REFRESH MATERIALIZED VIEW`.
//!
//! Also here: who called a SECURITY DEFINER function (`_require_owner`), and the flag that
//! tells the event triggers that an ALTER TABLE is pg_sync's own (`_internal_ddl`), which no
//! user can set.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::cell::Cell;

/// Runs `f` with `role`'s rights, in a security-restricted operation (no SET ROLE, no
/// temporary objects inside), under `search_path = pg_catalog, pg_temp` and in a GUC nest
/// level of its own, and restores the caller's rights and every setting afterwards, also on
/// error: as PostgreSQL runs index expressions for the table owner. Without the nest level,
/// code of `role`'s (a domain check, a cast) could `set_config('search_path', …)` and have
/// the setting outlive the switch back, to capture the names the extension owner's own SQL
/// uses next (found by a review: a table owner's way to superuser through `ingest_wal`).
/// (An error here aborts the transaction, so whatever `f` leaves half-done is not used again:
/// it is asserted unwind-safe.)
pub fn as_role<T>(role: pg_sys::Oid, f: impl FnOnce() -> T) -> T {
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: reads and sets the backend's current user and settings, restored in `finally`.
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            role,
            context | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        nest
    };
    PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .finally(|| unsafe {
            pg_sys::AtEOXact_GUC(false, nest);
            pg_sys::SetUserIdAndSecContext(user, context);
        })
        .execute()
}

/// Raises SQLSTATE 42501 unless the role that called (the session's current role, not the
/// owner of the SECURITY DEFINER function running this) owns `tbl`, as ALTER TABLE would.
#[pg_extern(name = "_require_owner", volatile, parallel_unsafe)]
fn require_owner(tbl: pg_sys::Oid) {
    // SAFETY: catalog lookups of an existing relation (a regclass argument).
    let (owns, name) = unsafe {
        let caller = pg_sys::GetOuterUserId();
        let owns = pg_sys::pg_class_ownercheck(tbl, caller);
        let name = std::ffi::CStr::from_ptr(pg_sys::get_rel_name(tbl))
            .to_string_lossy()
            .into_owned();
        (owns, name)
    };
    if !owns {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be owner of table {name}"),
            function_name!(),
        )
        .report(PgLogLevel::ERROR);
    }
}

thread_local! {
    /// The (local transaction, subtransaction) in which pg_sync runs DDL of its own.
    static INTERNAL_DDL: Cell<Option<(u32, pg_sys::SubTransactionId)>> = const { Cell::new(None) };
}

/// Where the backend stands: its local transaction and current subtransaction. A flag tied
/// to it is dropped by any rollback, which starts a new one or returns to the parent.
fn here() -> (u32, pg_sys::SubTransactionId) {
    // SAFETY: MyProc is this backend's PGPROC.
    unsafe { ((*pg_sys::MyProc).lxid, pg_sys::GetCurrentSubTransactionId()) }
}

/// Marks the start (true) or end (false) of pg_sync's own DDL on a tracked table, which the
/// event triggers must not count as a schema change. (Internal: `_install_capture`, `untrack`,
/// `_watch_policy_inputs`.)
#[pg_extern(name = "_internal_ddl", volatile, parallel_unsafe)]
fn internal_ddl(on: bool) {
    INTERNAL_DDL.with(|flag| flag.set(on.then(here)));
}

/// Whether the DDL being run is pg_sync's own. (Internal: `_on_alter_table`, `_note_access`.)
#[pg_extern(name = "_in_internal_ddl", volatile, parallel_unsafe)]
fn in_internal_ddl() -> bool {
    INTERNAL_DDL.with(|flag| flag.get() == Some(here()))
}
