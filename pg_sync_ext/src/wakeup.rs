//! Waking readers after changes commit, without making writers pay for NOTIFY.
//!
//! NOTIFY takes a database-wide lock at commit that serialises every notifying transaction
//! (8 writers: 10.3k TPS fall to 4.4k TPS when each notifies). So when pg_sync is in
//! `shared_preload_libraries`, a writing transaction only registers a commit callback; at
//! commit the callback counts the commit in shared memory and sets the latch of a notifier
//! worker of its database, and that worker sends one `NOTIFY sync_changes` for however many
//! commits arrived since its last one. Without preloading there is no shared memory, and the
//! writing transaction notifies itself (`sync.status()` reports the mode).
//!
//! Notifier workers are dynamic background workers, one per database with recent writes,
//! started on demand and gone after two idle seconds: a worker connected to a database would
//! otherwise block `DROP DATABASE`. The hand-over between an exiting worker and a committing
//! writer cannot lose a wake-up: the worker withdraws its latch before its last look at the
//! counter, and a writer that counts after that look sees no latch and starts a new worker.
//!
//! Readers must still poll as a fallback: NOTIFY is lost while they are disconnected.

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgXactCallbackEvent};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The channel readers LISTEN on.
pub const CHANNEL: &str = "sync_changes";

/// Databases that can have a notifier at once; writes in further databases notify in their
/// own transaction.
const SLOTS: usize = 32;

/// A notifier worker that saw no commit for this long exits.
const IDLE_EXIT: Duration = Duration::from_secs(2);

/// At most one NOTIFY per this interval: commits arriving meanwhile share the next one. Each
/// NOTIFY is a transaction of its own; unthrottled, 8 busy writers made the worker send one per
/// 1.6 commits (4.2k/s), which cost the writers WAL and lock traffic.
const MIN_NOTIFY_INTERVAL: Duration = Duration::from_millis(4);

/// A requested worker that has not started after this long is requested again.
const LAUNCH_RETRY_SECS: u64 = 10;

/// One database's notifier, in shared memory.
#[derive(Default)]
pub struct NotifierSlot {
    /// The database this slot serves; 0 while free.
    database: AtomicU32,
    /// The running worker's pgprocno + 1; 0 while no worker listens to its latch.
    procno: AtomicI32,
    /// Commits not yet announced.
    pending: AtomicU64,
    /// When a worker was last requested (Unix seconds); 0 once it runs or exited.
    launched_at: AtomicU64,
}

// SAFETY: only atomics, valid in any process that maps the segment.
unsafe impl PGRXSharedMemory for NotifierSlot {}

static NOTIFIERS: PgAtomic<[NotifierSlot; SLOTS]> = unsafe { PgAtomic::new(c"pg_sync_notifiers") };

/// Set in the postmaster when loaded by shared_preload_libraries, inherited by every backend.
static PRELOADED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The transaction that already arranged its wake-up.
    static ARRANGED_FOR: Cell<u64> = const { Cell::new(0) };
}

/// Called from `_PG_init`.
pub fn init() {
    // SAFETY: read once in _PG_init, which runs in the process loading the library.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg_shmem_init!(NOTIFIERS);
        PRELOADED.store(true, SeqCst);
    }
}

/// `worker` when a notifier worker wakes readers, `transaction` when writers notify.
#[pg_extern(name = "_wakeup_mode", stable, parallel_safe)]
fn wakeup_mode() -> &'static str {
    if PRELOADED.load(SeqCst) {
        "worker"
    } else {
        "transaction"
    }
}

/// Arranges, once per transaction, that readers are woken when it commits.
pub fn note_log_write() {
    // SAFETY: the caller is writing, so the transaction has an id.
    let xid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
    if ARRANGED_FOR.get() == xid {
        return;
    }
    ARRANGED_FOR.set(xid);
    match claim_slot() {
        Some(slot) => {
            pgrx::register_xact_callback(PgXactCallbackEvent::Commit, move || {
                announce_commit(slot)
            });
        }
        None => notify_now(),
    }
}

/// This database's slot, claimed if it has none; None when not preloaded or all are taken.
fn claim_slot() -> Option<usize> {
    if !PRELOADED.load(SeqCst) {
        return None;
    }
    // SAFETY: MyDatabaseId is set for the life of a backend that runs triggers.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let slots = NOTIFIERS.get();
    if let Some(i) = slots
        .iter()
        .position(|s| s.database.load(SeqCst) == database)
    {
        return Some(i);
    }
    slots.iter().position(|s| {
        s.database
            .compare_exchange(0, database, SeqCst, SeqCst)
            .is_ok()
            || s.database.load(SeqCst) == database
    })
}

/// The commit callback: count the commit and wake (or start) the database's notifier. Runs
/// after the commit is visible, so it must not fail.
fn announce_commit(slot: usize) {
    let slot_ref = &NOTIFIERS.get()[slot];
    slot_ref.pending.fetch_add(1, SeqCst);
    let procno = slot_ref.procno.load(SeqCst);
    if procno > 0 {
        // SAFETY: procno came from a live worker's MyProc; PGPROCs live as long as the cluster.
        unsafe {
            let proc_ = (*pg_sys::ProcGlobal).allProcs.add(procno as usize - 1);
            pg_sys::SetLatch(&raw mut (*proc_).procLatch);
        }
    } else {
        launch_worker(slot);
    }
}

fn launch_worker(slot: usize) {
    let slot_ref = &NOTIFIERS.get()[slot];
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    let last = slot_ref.launched_at.load(SeqCst);
    if last != 0 && now.saturating_sub(last) < LAUNCH_RETRY_SECS {
        return; // one is on its way
    }
    if slot_ref
        .launched_at
        .compare_exchange(last, now, SeqCst, SeqCst)
        .is_err()
    {
        return;
    }
    let started = BackgroundWorkerBuilder::new("pg_sync notifier")
        .set_type("pg_sync notifier")
        .set_library("pg_sync")
        .set_function("pg_sync_notifier_main")
        .set_argument(Some(pg_sys::Datum::from(slot)))
        .enable_spi_access()
        .set_restart_time(None)
        .load_dynamic();
    if started.is_err() {
        pgrx::log!(
            "pg_sync: no background worker slot for a notifier; readers fall back to polling"
        );
    }
}

/// The writer's own NOTIFY, when no notifier can do it.
fn notify_now() {
    // SAFETY: pg_notify is a plain V1 function taking two texts.
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::pg_notify,
            &[CHANNEL.into_datum(), "".into_datum()],
        );
    }
}

/// The notifier worker: sends one NOTIFY per wake-up while commits keep coming.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_sync_notifier_main(arg: pg_sys::Datum) {
    let slot = arg.value();
    let slot_ref = &NOTIFIERS.get()[slot];
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: registered before connecting, so a failed connection frees the slot too.
    unsafe { pg_sys::before_shmem_exit(Some(release_slot), arg) };
    let database = pg_sys::Oid::from(slot_ref.database.load(SeqCst));
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    CONNECTED.store(true, SeqCst);
    // The NOTIFY transaction needs no flush to disk: it carries no data.
    BackgroundWorker::transaction(|| Spi::run("SET synchronous_commit = off"))
        .expect("setting synchronous_commit");
    // SAFETY: MyProc is this worker's PGPROC.
    slot_ref
        .procno
        .store(unsafe { (*pg_sys::MyProc).pgprocno } + 1, SeqCst);
    slot_ref.launched_at.store(0, SeqCst);

    let mut last_work = Instant::now();
    loop {
        if slot_ref.pending.load(SeqCst) > 0 {
            // Let the commits of the next few milliseconds join this NOTIFY. Not waiting on
            // the latch meanwhile also spares committers the signal that wakes a sleeper.
            let since = last_work.elapsed();
            if since < MIN_NOTIFY_INTERVAL {
                sleep_ignoring_latch(MIN_NOTIFY_INTERVAL - since);
            }
            slot_ref.pending.store(0, SeqCst);
            announce();
            last_work = Instant::now();
        } else if last_work.elapsed() >= IDLE_EXIT {
            // Withdraw the latch first: a commit counted after the look below starts a new
            // worker instead of waking this one.
            slot_ref.procno.store(0, SeqCst);
            if slot_ref.pending.swap(0, SeqCst) > 0 {
                announce();
            }
            return;
        }
        if !BackgroundWorker::wait_latch(Some(IDLE_EXIT / 4)) {
            return;
        }
    }
}

fn sleep_ignoring_latch(duration: Duration) {
    // SAFETY: a plain timed wait of this process.
    unsafe {
        pg_sys::WaitLatch(
            std::ptr::null_mut(),
            (pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            duration.as_millis() as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
    }
}

static CONNECTED: AtomicBool = AtomicBool::new(false);

fn announce() {
    BackgroundWorker::transaction(|| Spi::run(&format!("NOTIFY {CHANNEL}"))).expect("NOTIFY");
}

/// On any exit of a notifier: stop receiving wake-ups, allow a new launch, and give up the
/// slot entirely when the database could not be joined (it may have been dropped).
#[pg_guard]
unsafe extern "C-unwind" fn release_slot(_code: i32, arg: pg_sys::Datum) {
    let slot_ref = &NOTIFIERS.get()[arg.value()];
    slot_ref.procno.store(0, SeqCst);
    slot_ref.launched_at.store(0, SeqCst);
    if !CONNECTED.load(SeqCst) {
        slot_ref.database.store(0, SeqCst);
    }
}
