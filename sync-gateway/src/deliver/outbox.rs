//! The messages for one connection, built change by change and serialized at the end.
//!
//! A message holds a run of consecutive changes of one entity (at most 256); its cursor is
//! the position after its last change. A message whose last change is the last of a database
//! transaction (of what this connection receives) says so (`txEnd`), so that a client can
//! apply whole transactions. A run goes on past a transaction's end: several small
//! transactions of one entity in a read make one message (one per transaction made the
//! gateway's fan-out of single-row commits send one frame per change).
//!
//! Runs are kept as (change, action) until delivery, and runs that are the same for many
//! connections (every whole-table subscriber of a batch, say) are serialized once and their
//! text shared: with 10,000 subscribers, serializing per connection was the gateway's
//! bottleneck.

use crate::model::change::{Action, Change};
use crate::model::protocol::{ChangeOut, Mode, ResyncReason, ServerMessage};
use crate::model::subscription::Shape;
use axum::extract::ws::Utf8Bytes;
use std::collections::HashMap;
use std::sync::Arc;

/// Changes in one message at most: a longer run is split, each part with its own cursor.
pub const MAX_CHANGES_PER_MESSAGE: usize = 256;

enum Part {
    Message(ServerMessage),
    Run {
        shape: Shape,
        changes: Vec<(Arc<Change>, Action)>,
        tx_end: bool,
    },
}

/// Serialized runs of one batch, by what they hold.
pub type RunCache = HashMap<(Shape, Vec<(i64, Action)>, bool), Utf8Bytes>;

/// Where a connection's messages of a transaction under way went: see `Outbox::open_run`.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenRun {
    entity_code: String,
    mode: Mode,
}

impl OpenRun {
    pub fn entity_code(&self) -> &str {
        &self.entity_code
    }
}

#[derive(Default)]
pub struct Outbox {
    parts: Vec<Part>,
    /// A change was pushed since the last transaction's end.
    in_transaction: bool,
}

impl Outbox {
    /// Adds a change, extending the last run when it is of the same entity and shape (also
    /// past a transaction's end: the run then ends inside the new one until it ends too).
    pub fn push(&mut self, shape: &Shape, change: &Arc<Change>, action: Action) {
        self.in_transaction = true;
        if let Some(Part::Run {
            shape: last,
            changes,
            tx_end,
        }) = self.parts.last_mut()
        {
            if last == shape
                && changes[0].0.entity_code == change.entity_code
                && changes.len() < MAX_CHANGES_PER_MESSAGE
            {
                changes.push((change.clone(), action));
                *tx_end = false;
                return;
            }
        }
        self.parts.push(Part::Run {
            shape: shape.clone(),
            changes: vec![(change.clone(), action)],
            tx_end: false,
        });
    }

    /// A database transaction ended: the last run pushed since the previous end says so.
    pub fn end_transaction(&mut self) {
        if !std::mem::take(&mut self.in_transaction) {
            return;
        }
        let last_run = self.parts.iter_mut().rev().find_map(|part| match part {
            Part::Run { tx_end, .. } => Some(tx_end),
            Part::Message(_) => None,
        });
        if let Some(tx_end) = last_run {
            *tx_end = true;
        }
    }

    /// The entity and mode of the run that went out without its transaction's end, when a
    /// change was pushed since the last end: what an end met later is told on
    /// (`end_elsewhere`).
    pub fn open_run(&self) -> Option<OpenRun> {
        if !self.in_transaction {
            return None;
        }
        self.parts.iter().rev().find_map(|part| match part {
            Part::Run { shape, changes, .. } => Some(OpenRun {
                entity_code: changes[0].0.entity_code.clone(),
                mode: shape.mode,
            }),
            Part::Message(_) => None,
        })
    }

    /// A transaction ends at `last`, its last change, after this connection's changes of it
    /// went out in an earlier message (`run`) without the end: a message of no changes says
    /// so, with the position after `last`.
    pub fn end_elsewhere(&mut self, run: OpenRun, last: &Change) {
        self.in_transaction = false;
        let end = changes_message(run.mode, run.entity_code, Vec::new(), last, true);
        self.message(end);
    }

    /// Whether nothing was pushed or added.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Tells the client to refetch the entity, unless this outbox already does with nothing of
    /// the entity since: 100 statements on a membership table in one read of the log (each an
    /// ACCESS row) make one refetch, not 100.
    pub fn resync(&mut self, entity_code: &str, reason: ResyncReason) {
        for part in self.parts.iter().rev() {
            match part {
                Part::Run { changes, .. } if changes[0].0.entity_code == entity_code => break,
                Part::Message(ServerMessage::Resync {
                    entity_code: told,
                    reason: why,
                }) if told == entity_code && *why == reason => return,
                _ => {}
            }
        }
        self.message(ServerMessage::Resync {
            entity_code: entity_code.to_owned(),
            reason,
        });
    }

    pub fn message(&mut self, message: ServerMessage) {
        self.parts.push(Part::Message(message));
    }

    /// The messages' texts, reusing those of identical runs already in `cache`.
    pub fn render(self, cache: &mut RunCache) -> Vec<Utf8Bytes> {
        self.parts
            .into_iter()
            .map(|part| match part {
                Part::Message(message) => message.to_json().into(),
                Part::Run {
                    shape,
                    changes,
                    tx_end,
                } => {
                    let key = (
                        shape,
                        changes.iter().map(|(c, a)| (c.id, *a)).collect(),
                        tx_end,
                    );
                    if let Some(text) = cache.get(&key) {
                        return text.clone();
                    }
                    let text: Utf8Bytes = run_message(&key.0, &changes, tx_end).to_json().into();
                    cache.insert(key, text.clone());
                    text
                }
            })
            .collect()
    }
}

fn run_message(shape: &Shape, changes: &[(Arc<Change>, Action)], tx_end: bool) -> ServerMessage {
    let last = &changes[changes.len() - 1].0;
    let rendered = changes.iter().map(|(c, a)| shape.render(c, *a)).collect();
    changes_message(shape.mode, last.entity_code.clone(), rendered, last, tx_end)
}

/// A DELTA or INVALIDATE of `entity_code`, as `mode` says, at the position after `last`.
fn changes_message(
    mode: Mode,
    entity_code: String,
    changes: Vec<ChangeOut>,
    last: &Change,
    tx_end: bool,
) -> ServerMessage {
    let (timestamp, cursor) = (last.captured_at.clone(), last.cursor.clone());
    match mode {
        Mode::Delta => ServerMessage::Delta {
            entity_code,
            changes,
            timestamp,
            cursor,
            tx_end,
        },
        Mode::Invalidate => ServerMessage::Invalidate {
            entity_code,
            changes,
            timestamp,
            cursor,
            tx_end,
        },
    }
}
