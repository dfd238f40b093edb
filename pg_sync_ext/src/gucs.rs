//! pg_sync's own settings, registered when the library loads.
//!
//! `sync.client_id` (the writer's origin tag, SPEC 1.3) stays a plain placeholder that any
//! writer may set. `sync.test_ingest_fault` makes `ingest_wal` fail on purpose, for the
//! crash tests: only a superuser may set it (a value set by anyone else before the library
//! loaded is discarded when it registers).

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// `fail_after_store` or `skip_advance`: see `wal.rs`.
pub static TEST_INGEST_FAULT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

pub fn init() {
    GucRegistry::define_string_guc(
        c"sync.test_ingest_fault",
        c"Makes sync.ingest_wal fail at a chosen step (tests only).",
        c"fail_after_store: after storing, before the slot moves; skip_advance: never move the slot.",
        &TEST_INGEST_FAULT,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
}

/// The fault to inject, if a superuser asked for one.
pub fn test_ingest_fault() -> Option<String> {
    TEST_INGEST_FAULT
        .get()
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
}
