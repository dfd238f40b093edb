//! A transaction's log rows held back until its end (or a full batch), so that its last row
//! can say it is the last (`tx_first`): the transaction callbacks that write them, and what a
//! subtransaction's rollback takes away with it.

use super::writer::Writer;
use super::{Layout, LogTable};
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};

/// A row formed but not yet in the table, and the subtransaction it belongs to.
pub(super) struct Unwritten {
    pub(super) tuple: pg_sys::HeapTuple,
    /// The tuple's size, toward the batch's byte bound.
    pub(super) bytes: usize,
    pub(super) id: i64,
    pub(super) at: pg_sys::SubTransactionId,
}

/// What the current transaction has logged.
///
/// A row is written only while the subtransaction it belongs to is the current one (written
/// inside a child, a rollback of the child would take the parent's row with it; the first
/// version did that, and lost rows). A row belongs to the subtransaction that appended it
/// until that one commits into its parent. Subtransaction ids grow, so a rollback of `s`
/// discards exactly what belongs to `s` or to a later id. Held rows are at most a batch per
/// open nesting level: a subtransaction's rows are written when it commits, an enclosing
/// level's when its batch is full.
pub(super) struct InFlight {
    pub(super) log: LogTable,
    pub(super) writer: Writer,
    /// The first id the transaction took (a lower bound of its rows' ids).
    pub(super) first_id: i64,
    pub(super) unwritten: Vec<Unwritten>,
    /// The size of the rows in `unwritten`.
    pub(super) held_bytes: usize,
    /// The highest id written, per subtransaction.
    pub(super) written: Vec<(pg_sys::SubTransactionId, i64)>,
}

impl InFlight {
    pub(super) unsafe fn start(log: LogTable, first_id: i64) -> Self {
        InFlight {
            log,
            writer: Writer::open(log.relid),
            first_id,
            unwritten: Vec::new(),
            held_bytes: 0,
            written: Vec::new(),
        }
    }

    pub(super) fn hold(&mut self, row: Unwritten) {
        self.held_bytes += row.bytes;
        self.unwritten.push(row);
    }

    fn recount(&mut self) {
        self.held_bytes = self.unwritten.iter().map(|row| row.bytes).sum();
    }

    /// Writes the rows that belong to `here`, the current subtransaction.
    pub(super) unsafe fn write_rows_of(&mut self, here: pg_sys::SubTransactionId) {
        let (now, later): (Vec<_>, Vec<_>) =
            self.unwritten.drain(..).partition(|row| row.at == here);
        self.unwritten = later;
        self.recount();
        if let Some(newest) = now.iter().map(|row| row.id).max() {
            self.wrote(here, newest);
        }
        self.writer
            .write(&mut now.into_iter().map(|row| row.tuple).collect());
    }

    fn wrote(&mut self, at: pg_sys::SubTransactionId, id: i64) {
        match self.written.iter_mut().find(|(level, _)| *level == at) {
            Some((_, max)) => *max = (*max).max(id),
            None => self.written.push((at, id)),
        }
    }

    /// A subtransaction rolled back: what belongs to it is gone.
    fn forget(&mut self, subtransaction: pg_sys::SubTransactionId) {
        self.unwritten.retain(|row| row.at < subtransaction);
        self.written.retain(|(at, _)| *at < subtransaction);
        self.recount();
    }

    /// A subtransaction commits into `parent`: its rows are written now, while it is still
    /// current, and what it wrote belongs to `parent` from here on.
    unsafe fn commit_into(
        &mut self,
        subtransaction: pg_sys::SubTransactionId,
        parent: pg_sys::SubTransactionId,
    ) {
        self.write_rows_of(subtransaction);
        let moved = self
            .written
            .iter()
            .filter(|(at, _)| *at >= subtransaction)
            .map(|(_, id)| *id)
            .max();
        self.written.retain(|(at, _)| *at < subtransaction);
        if let Some(id) = moved {
            self.wrote(parent, id);
        }
    }

    /// At commit: writes what is left, the newest row marked as the transaction's last; or,
    /// when a row already written is newer, a closing END row. Nothing for a transaction
    /// whose changes all rolled back, so an END row always closes a transaction with changes.
    unsafe fn close(mut self) {
        let newest_written = self.written.iter().map(|(_, id)| *id).max();
        let newest = (0..self.unwritten.len()).max_by_key(|&i| self.unwritten[i].id);
        let last = match newest {
            Some(i) if newest_written.is_none_or(|w| self.unwritten[i].id > w) => {
                Some(self.unwritten.swap_remove(i).tuple)
            }
            _ if newest_written.is_some() => Some(self.writer.end_row(&self.log)),
            _ => None,
        };
        let mut rows: Vec<_> = self.unwritten.drain(..).map(|row| row.tuple).collect();
        if let Some(last) = last.filter(|_| self.writer.layout != Layout::V1) {
            rows.push(self.writer.marked(last, self.first_id));
        }
        self.writer.write(&mut rows);
        self.writer.close();
    }
}

thread_local! {
    pub(super) static IN_FLIGHT: RefCell<Option<InFlight>> = const { RefCell::new(None) };
    /// The transaction's last rows are being written: a change captured now (by a trigger
    /// on the log) would come after the transaction's last row, where no reader looks.
    pub(super) static CLOSING: Cell<bool> = const { Cell::new(false) };
}

/// Called from `_PG_init`: the transaction callbacks that write the held rows.
pub fn init() {
    // SAFETY: registers callbacks for the life of the backend.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_transaction), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subtransaction), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_transaction(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => {
            if let Some(transaction) = IN_FLIGHT.with(|f| f.borrow_mut().take()) {
                CLOSING.set(true);
                transaction.close();
                CLOSING.set(false);
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PREPARE | XACT_EVENT_PARALLEL_ABORT => {
            // The rows' memory went with the transaction's context, the open log with its
            // resource owner.
            IN_FLIGHT.with(|f| f.borrow_mut().take());
            CLOSING.set(false);
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subtransaction(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    IN_FLIGHT.with(|f| {
        let mut f = f.borrow_mut();
        let Some(transaction) = f.as_mut() else {
            return;
        };
        match event {
            SUBXACT_EVENT_ABORT_SUB => transaction.forget(subtransaction),
            SUBXACT_EVENT_PRE_COMMIT_SUB => transaction.commit_into(subtransaction, parent),
            _ => {}
        }
    });
}

/// Writes the rows held back that belong to the current subtransaction (the newest one then
/// stays unmarked, and the transaction ends with an END row): for a transaction that reads
/// the log it writes.
#[pg_extern(name = "_flush_log", volatile, parallel_unsafe)]
fn flush_log() {
    flush();
}

/// Writes the rows held back now (see `_flush_log`).
pub fn flush() {
    IN_FLIGHT.with(|f| {
        if let Some(transaction) = f.borrow_mut().as_mut() {
            // SAFETY: rows formed by `append` for this log.
            unsafe { transaction.write_rows_of(pg_sys::GetCurrentSubTransactionId()) };
        }
    });
}
