//! A subscription with `since` starts in replay: its live changes wait here while a replay
//! task (`deliver::replay`) reads the gap from the log up to the router's position at that
//! moment (`until`) and hands its pages back, then SYNCED, then what was held back. No
//! change falls in the seam or appears twice, and the replay's messages take the same path
//! as live ones, transaction ends included.

use super::{ConnId, Router, SubId};
use crate::access::judge::decide;
use crate::deliver::command::{ReplayEvent, ReplayItem};
use crate::deliver::outbox::{OpenRun, Outbox, RunCache};
use crate::model::change::{Action, Change};
use crate::model::cursor::Cursor;
use crate::model::protocol::{ResyncReason, ServerMessage};
use crate::model::subscription::Judgement;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A live change held back, the end of a transaction among them, or a RESYNC: sent
/// before the replay's older changes, a RESYNC would have the client refetch and then
/// apply history older than what it fetched.
enum Held {
    Change(Arc<Change>, Action),
    TxEnd,
    Resync(ResyncReason),
}

pub(super) struct Replay {
    /// Live changes, as this subscription sees them, waiting for the replay's end.
    held: Vec<Held>,
    changes: usize,
    until: Cursor,
    reference: Option<String>,
    cancel: CancellationToken,
    /// The replay's changes of a transaction under way went out in an earlier part, without
    /// its end: where to tell it.
    open_run: Option<OpenRun>,
}

impl Replay {
    pub fn new(until: Cursor, reference: Option<String>, cancel: CancellationToken) -> Replay {
        Replay {
            held: Vec::new(),
            changes: 0,
            until,
            reference,
            cancel,
            open_run: None,
        }
    }

    pub fn hold(&mut self, change: Arc<Change>, action: Action) {
        self.held.push(Held::Change(change, action));
        self.changes += 1;
    }

    pub fn hold_resync(&mut self, reason: ResyncReason) {
        self.held.push(Held::Resync(reason));
    }

    /// A transaction ended after a change held since the last end.
    pub fn end_transaction(&mut self) {
        if matches!(self.held.last(), Some(Held::Change(..))) {
            self.held.push(Held::TxEnd);
        }
    }

    /// Changes held back.
    pub fn held(&self) -> usize {
        self.changes
    }

    /// The subscription ended: its replay task stops.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

impl Router {
    /// The replay of a subscription still replaying.
    pub(super) fn replay_of(&mut self, conn: ConnId, sub: SubId) -> Option<&mut Replay> {
        self.connections
            .get_mut(&conn)
            .and_then(|c| c.subs.get_mut(&sub))
            .and_then(|s| s.replay.as_mut())
    }

    pub(super) fn replay_event(&mut self, event: ReplayEvent) {
        match event {
            ReplayEvent::Page {
                conn,
                sub,
                items,
                queued,
            } => {
                self.replayed(conn, sub, items);
                let _ = queued.send(());
            }
            ReplayEvent::Done { conn, sub } => {
                // A transaction it held a change of may go on in the next page: then it ends
                // there, with the live stream's messages.
                let open = self.held_open.remove(&(conn, sub));
                let Some(state) = self
                    .connections
                    .get_mut(&conn)
                    .and_then(|c| c.subs.get_mut(&sub))
                else {
                    return;
                };
                let Some(replay) = state.replay.take() else {
                    return;
                };
                let mut out = Outbox::default();
                out.message(ServerMessage::Synced {
                    entity_code: state.subscription.entity_code.clone(),
                    cursor: replay.until,
                    reference: replay.reference,
                });
                for held in replay.held {
                    match held {
                        Held::Change(change, action) => {
                            out.push(&state.subscription.shape, &change, action)
                        }
                        Held::TxEnd => out.end_transaction(),
                        Held::Resync(reason) => out.resync(&state.subscription.entity_code, reason),
                    }
                }
                if let Some(run) = out.open_run().filter(|_| open) {
                    self.open_elsewhere.insert(conn, run);
                }
                self.deliver(conn, out, &mut RunCache::new());
                self.answer_awaits(conn);
            }
            ReplayEvent::Failed { conn, sub, message } => {
                self.send(conn, &message);
                self.end_sub(conn, sub);
            }
        }
    }

    /// A part of a replay's gap: decided for the subscription as live changes are.
    fn replayed(&mut self, conn: ConnId, sub: SubId, items: Vec<ReplayItem>) {
        let Some(owner) = self.connections.get(&conn) else {
            return;
        };
        let Some(state) = owner.subs.get(&sub) else {
            return;
        };
        let subscriber = owner.subscriber();
        let mut open_run = state.replay.as_ref().and_then(|r| r.open_run.clone());
        let mut out = Outbox::default();
        let mut entity_changed = false;
        for item in items {
            let (change, verdict) = match item {
                ReplayItem::Change(change, verdict) => (change, verdict),
                ReplayItem::TxEnd(last) => {
                    match open_run.take() {
                        // Nothing of it since the last part: the end goes on its own.
                        Some(run) if out.open_run().is_none() => out.end_elsewhere(run, &last),
                        _ => out.end_transaction(),
                    }
                    continue;
                }
            };
            match decide(&change, &verdict, &subscriber, &state.subscription.target) {
                Judgement::Skip => {}
                Judgement::Resync(reason) => {
                    out.resync(&change.entity_code, reason);
                    if reason == ResyncReason::EntityChanged {
                        entity_changed = true;
                        break;
                    }
                }
                Judgement::Deliver(action) => out.push(&state.subscription.shape, &change, action),
            }
        }
        if let Some(run) = out.open_run() {
            open_run = Some(run);
        }
        if let Some(replay) = self.replay_of(conn, sub) {
            replay.open_run = open_run;
        }
        self.deliver(conn, out, &mut RunCache::new());
        if entity_changed {
            // The gap holds another table's history under this code: refetch.
            self.end_sub(conn, sub);
        }
    }
}
