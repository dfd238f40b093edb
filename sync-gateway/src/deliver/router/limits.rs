//! What a connection and a user may hold (SPEC 2.4), checked when a subscription is added:
//! subscriptions per connection and per user, filter conditions and listed values per user
//! (what routing a change costs grows with them), replays per connection.

use super::{Conn, ConnId, SubId, SubState};
use crate::access::limits::Cap;
use crate::deliver::command::SubscribeRequest;
use crate::model::filter::Condition;
use crate::model::subscription::Target;
use std::sync::Arc;

/// Bounds per connection and per user.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Subscriptions of one connection (an id counts one).
    pub subscriptions: usize,
    /// Subscriptions of one user, over all its connections.
    pub subscriptions_per_user: usize,
    /// Filter conditions, over all subscriptions of one user (all its connections).
    pub conditions: usize,
    /// Values listed by `in` conditions, over all of them.
    pub in_values: usize,
    /// Replays in flight.
    pub replays: usize,
    /// Live changes a replaying subscription may hold before its connection counts as too
    /// slow.
    pub replay_buffer: usize,
    /// Subscription rows queued for the mirror and not yet written, in total and per user: a
    /// SUBSCRIBE beyond is refused (retry later), so churning subscriptions faster than the
    /// database takes them costs the churner, not the gateway's memory.
    pub mirror_backlog: Arc<Cap>,
    /// AWAITs one connection may have waiting.
    pub awaits: usize,
}

impl Limits {
    /// Whether connection `conn_id` may add the subscription `request` asks for, else why
    /// not; `replacing` (a subscription it replaces) does not count.
    /// `users_conns`: the connections of `conn`'s user, `conn` among them.
    pub(super) fn admits<'a>(
        &self,
        conn_id: ConnId,
        conn: &Conn,
        users_conns: impl Iterator<Item = (ConnId, &'a Conn)>,
        request: &SubscribeRequest,
        replacing: Option<(ConnId, SubId)>,
    ) -> Result<(), String> {
        let held: usize = kept_subs(conn_id, conn, replacing)
            .map(|s| s.subscription.target.size())
            .sum();
        if held + request.subscription.target.size() > self.subscriptions {
            return Err(format!(
                "a connection holds at most {} subscriptions",
                self.subscriptions
            ));
        }
        let (held_by_user, conditions, values) = users_conns
            .flat_map(|(id, c)| kept_subs(id, c, replacing))
            .map(|s| &s.subscription)
            .chain([&request.subscription])
            .map(|s| match &s.target {
                Target::Rows(Some(filter)) => (s.target.size(), filter_cost(filter)),
                _ => (s.target.size(), (0, 0)),
            })
            .fold((0, 0, 0), |(n, c, v), (n2, (c2, v2))| {
                (n + n2, c + c2, v + v2)
            });
        if held_by_user > self.subscriptions_per_user {
            return Err(format!(
                "a user holds at most {} subscriptions over all its connections",
                self.subscriptions_per_user
            ));
        }
        if conditions > self.conditions || values > self.in_values {
            return Err(format!(
                "the filters of one user hold at most {} conditions and {} listed values",
                self.conditions, self.in_values
            ));
        }
        if request.since.is_some() && running_replays(conn_id, conn, replacing) >= self.replays {
            return Err(self.too_many_replays());
        }
        Ok(())
    }

    /// Whether connection `conn` may defer a SUBSCRIBE with `since` to the drain's end,
    /// `waiting` being how many other requests it deferred: each starts a replay there, so
    /// they count with the replays it runs (but not the one of `replacing`, the subscription
    /// the request would replace). This bounds what a connection can queue while a drain
    /// lasts.
    pub(super) fn admits_deferred(
        &self,
        conn_id: ConnId,
        conn: &Conn,
        waiting: usize,
        replacing: Option<(ConnId, SubId)>,
    ) -> Result<(), String> {
        if running_replays(conn_id, conn, replacing) + waiting >= self.replays {
            return Err(self.too_many_replays());
        }
        Ok(())
    }

    fn too_many_replays(&self) -> String {
        format!(
            "a connection replays at most {} subscriptions at once",
            self.replays
        )
    }
}

/// The replays `conn` runs, but the one of `replacing`.
fn running_replays(conn_id: ConnId, conn: &Conn, replacing: Option<(ConnId, SubId)>) -> usize {
    kept_subs(conn_id, conn, replacing)
        .filter(|s| s.replay.is_some())
        .count()
}

/// The subscriptions of `conn` but `replacing`.
fn kept_subs(
    conn_id: ConnId,
    conn: &Conn,
    replacing: Option<(ConnId, SubId)>,
) -> impl Iterator<Item = &SubState> {
    conn.subs
        .iter()
        .filter(move |(id, _)| replacing != Some((conn_id, **id)))
        .map(|(_, s)| s)
}

/// Conditions and listed values of a filter, which evaluating it costs.
fn filter_cost(filter: &[Condition]) -> (usize, usize) {
    let values = filter
        .iter()
        .map(|c| {
            c.value
                .as_ref()
                .and_then(|v| v.as_array())
                .map_or(0, Vec::len)
        })
        .sum();
    (filter.len(), values)
}
