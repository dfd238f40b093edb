//! AWAIT: a client (after a write, say) asks to be told once everything up to a cursor has
//! been sent to it. Answered with REACHED when the live stream's position has passed the
//! cursor and none of the connection's subscriptions is still replaying (what a replay holds
//! back is not sent yet); a cursor of another log is refused.

use super::{ConnId, Router};
use crate::model::cursor::Cursor;
use crate::model::protocol::{ErrorCode, ServerMessage};

/// The AWAITs of one connection not answered yet.
#[derive(Default)]
pub(super) struct Awaits(Vec<(Cursor, Option<String>)>);

impl Awaits {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Router {
    pub(super) fn wait_for(&mut self, conn_id: ConnId, cursor: Cursor, reference: Option<String>) {
        let Some(conn) = self.connections.get_mut(&conn_id) else {
            return;
        };
        let refusal = if self.position.as_ref().is_some_and(|p| !p.same_log(&cursor)) {
            Some("the cursor is of another database".to_owned())
        } else if conn.awaits.0.len() >= self.limits.awaits {
            Some(format!(
                "a connection awaits at most {} cursors at once",
                self.limits.awaits
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            self.send(
                conn_id,
                &ServerMessage::error(ErrorCode::BadRequest, why, reference),
            );
            return;
        }
        conn.awaits.0.push((cursor, reference));
        self.answer_awaits(conn_id);
    }

    /// Answers the connection's AWAITs that its stream has passed.
    pub(super) fn answer_awaits(&mut self, conn_id: ConnId) {
        let (Some(conn), Some(position)) = (self.connections.get_mut(&conn_id), &self.position)
        else {
            return;
        };
        if conn.awaits.is_empty() || self.mid_drain || conn.replaying() {
            return;
        }
        let (reached, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut conn.awaits.0)
            .into_iter()
            .partition(|(cursor, _)| position.reaches(cursor));
        conn.awaits.0 = waiting;
        let position = position.clone();
        for (_, reference) in reached {
            let message = ServerMessage::Reached {
                cursor: position.clone(),
                reference,
            };
            self.send(conn_id, &message);
        }
    }
}
