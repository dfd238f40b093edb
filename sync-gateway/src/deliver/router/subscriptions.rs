//! Subscriptions as the router holds them: a SUBSCRIBE admitted (or refused under the
//! limits), indexed, mirrored into `sync.subscription` and, with `since`, handed to a replay;
//! UNSUBSCRIBE of ids, of an entity or of everything; a connection's group changing with
//! its token; a connection gone.

use super::{Conn, ConnId, Replay, Router, SubId, SubState};
use crate::access::roles::{GroupId, UserContext};
use crate::deliver::command::{ReplayStart, SubscribeRequest};
use crate::deliver::mirror::{MirrorOp, SubscriptionRow};
use crate::model::filter::Condition;
use crate::model::protocol::{ErrorCode, ResyncReason, ServerMessage};
use crate::model::subscription::{Subscription, Target};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

impl Router {
    pub(super) fn reauth(&mut self, conn_id: ConnId, user: Arc<UserContext>, group: GroupId) {
        let Some(conn) = self.connections.get_mut(&conn_id) else {
            return;
        };
        let old = conn.group;
        if conn.user.sub != user.sub {
            forget(&mut self.users, &conn.user.sub, conn_id);
            self.users
                .entry(user.sub.clone())
                .or_default()
                .insert(conn_id);
        }
        conn.user = user;
        conn.group = group;
        let rows: Vec<(String, SubId, Target)> = conn
            .subs
            .iter()
            .filter(|(_, s)| matches!(s.subscription.target, Target::Rows(_)))
            .map(|(id, s)| {
                let subscription = &s.subscription;
                (
                    subscription.entity_code.clone(),
                    *id,
                    subscription.target.clone(),
                )
            })
            .collect();
        for (entity, sub, target) in rows {
            if let Some(entry) = self.index.get_mut(&entity) {
                entry.regroup(&target, old, group, (conn_id, sub));
            }
        }
        if old != group {
            self.end_replays(conn_id);
        }
    }

    /// A refreshed token put the connection in another group: the gaps its subscriptions
    /// still replay are judged for the old token's role and claims, which no longer apply.
    /// They end with RESYNC `access_changed`, to be fetched again under the new token.
    fn end_replays(&mut self, conn_id: ConnId) {
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        let replaying: Vec<(ConnId, SubId, String)> = conn
            .subs
            .iter()
            .filter(|(_, s)| s.replay.is_some())
            .map(|(id, s)| (conn_id, *id, s.subscription.entity_code.clone()))
            .collect();
        self.end_with_resync(replaying, ResyncReason::AccessChanged);
    }

    /// Ends these subscriptions (connection, subscription, entity), each connection told
    /// RESYNC `reason` once per entity.
    pub(super) fn end_with_resync(
        &mut self,
        ended: Vec<(ConnId, SubId, String)>,
        reason: ResyncReason,
    ) {
        let mut told = HashSet::new();
        for (conn, sub, entity_code) in ended {
            if told.insert((conn, entity_code.clone())) {
                self.send(
                    conn,
                    &ServerMessage::Resync {
                        entity_code,
                        reason,
                    },
                );
            }
            self.end_sub(conn, sub);
        }
    }

    /// Keeps a SUBSCRIBE with `since` that arrived mid-drain for the drain's end, unless the
    /// connection has as many replays running and waiting as it may (ERROR then). The same
    /// subscription again takes the place of the one waiting, as it would replace it once
    /// made (the one it replaces is not answered).
    pub(super) fn defer(&mut self, request: SubscribeRequest) {
        let Some(conn) = self.connections.get(&request.conn) else {
            return;
        };
        let waiting = self.deferred.entry(request.conn).or_default();
        if let Some(twin) = waiting
            .iter_mut()
            .find(|r| r.subscription == request.subscription)
        {
            *twin = request;
            return;
        }
        let replacing = held_as(request.conn, conn, &request.subscription);
        match self
            .limits
            .admits_deferred(request.conn, conn, waiting.len(), replacing)
        {
            Ok(()) => waiting.push(request),
            Err(message) => {
                let code = ErrorCode::TooManySubscriptions;
                let error = ServerMessage::error(code, message, request.reference);
                self.send(request.conn, &error);
            }
        }
    }

    pub(super) fn subscribe(&mut self, request: SubscribeRequest) {
        let conn_id = request.conn;
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        let Some(position) = self.position.clone() else {
            return;
        };
        let reference = request.reference.clone();
        // The same subscription again replaces the one held (once the new one is admitted):
        // one entry each, however often a client sends it.
        let same = held_as(conn_id, conn, &request.subscription);
        let users_conns = self.users.get(&conn.user.sub).into_iter().flatten();
        let users_conns = users_conns.filter_map(|id| Some((*id, self.connections.get(id)?)));
        if let Err(message) = self
            .limits
            .admits(conn_id, conn, users_conns, &request, same)
        {
            let error = ServerMessage::error(ErrorCode::TooManySubscriptions, message, reference);
            self.send(conn_id, &error);
            return;
        }
        let subscription = request.subscription;
        let rows = mirror_rows(conn, &subscription);
        let place = match self
            .limits
            .mirror_backlog
            .take_n(&conn.user.sub, rows.len())
        {
            Ok(place) => place,
            Err(busy) => {
                let error = ServerMessage::error(ErrorCode::Internal, busy.to_string(), reference);
                self.send(conn_id, &error);
                return;
            }
        };
        let group = conn.group;
        if let Some((_, same)) = same {
            self.end_sub(conn_id, same);
        }
        if let Some(conn) = self.connections.get_mut(&conn_id) {
            conn.mirrored = true;
        }
        let sub_id = self.next_sub;
        self.next_sub += 1;
        let count = subscription.target.size();
        self.out.mirror.send(MirrorOp::Add(rows, place)).ok();
        self.out.metrics.subscriptions.inc_by(count as i64);
        self.index
            .entry(subscription.entity_code.clone())
            .or_default()
            .add(&subscription.target, group, (conn_id, sub_id));
        let entity_code = subscription.entity_code.clone();
        let replay = request.since.as_ref().map(|since| {
            let conn = &self.connections[&conn_id];
            ReplayStart {
                conn: conn_id,
                sub: sub_id,
                user: conn.user.clone(),
                group,
                client_id: conn.client_id.clone(),
                subscription: subscription.clone(),
                since: since.clone(),
                until: position.clone(),
                queue: conn.queue.clone(),
                cancel: CancellationToken::new(),
            }
        });
        let state = SubState {
            subscription,
            replay: replay
                .as_ref()
                .map(|r| Replay::new(r.until.clone(), reference.clone(), r.cancel.clone())),
        };
        self.connections
            .get_mut(&conn_id)
            .expect("checked")
            .subs
            .insert(sub_id, state);
        let answer = ServerMessage::Subscribed {
            entity_code,
            count,
            cursor: request.since.unwrap_or(position),
            reference,
            tx_ends: true,
        };
        if self.send(conn_id, &answer) {
            if let Some(replay) = replay {
                self.out.replays.send(replay).ok();
            }
        }
    }

    pub(super) fn unsubscribe(
        &mut self,
        conn_id: ConnId,
        entity_code: Option<&str>,
        ids: Option<&[String]>,
    ) {
        let Some(conn) = self.connections.get_mut(&conn_id) else {
            return;
        };
        let name = conn.name.clone();
        let mut emptied = Vec::new();
        let mut removed_ids = Vec::new();
        for (sub_id, sub) in conn.subs.iter_mut() {
            if entity_code.is_some_and(|e| e != sub.subscription.entity_code) {
                continue;
            }
            let (removed, empty) = unsubscribed(&mut sub.subscription.target, ids);
            let entity = &sub.subscription.entity_code;
            removed_ids.extend(removed.into_iter().map(|id| (*sub_id, entity.clone(), id)));
            if empty {
                emptied.push(*sub_id);
            }
        }
        // A request deferred to the drain's end came before this: it is narrowed or dropped
        // likewise (made as it was, it would outlive the UNSUBSCRIBE).
        if let Some(waiting) = self.deferred.get_mut(&conn_id) {
            waiting.retain_mut(|request| {
                if entity_code.is_some_and(|e| e != request.subscription.entity_code) {
                    return true;
                }
                let (_, empty) = unsubscribed(&mut request.subscription.target, ids);
                !empty
            });
        }
        if removed_ids.is_empty() && emptied.is_empty() {
            return; // nothing held: nothing for the mirror either
        }
        let ids_removed: Vec<String> = removed_ids.iter().map(|(_, _, id)| id.clone()).collect();
        for (sub_id, entity, id) in removed_ids {
            self.out.metrics.subscriptions.dec();
            if let Some(entry) = self.index.get_mut(&entity) {
                entry.remove_id(&id, (conn_id, sub_id));
            }
        }
        for sub_id in emptied {
            self.remove_sub(conn_id, sub_id);
        }
        self.out
            .mirror
            .send(match (entity_code, ids) {
                (None, _) => MirrorOp::RemoveConnection(name),
                (Some(entity_code), None) => MirrorOp::RemoveEntity {
                    connection_id: name,
                    entity_code: entity_code.into(),
                },
                (Some(entity_code), Some(_)) => MirrorOp::RemoveIds {
                    connection_id: name,
                    entity_code: entity_code.into(),
                    entity_ids: ids_removed,
                },
            })
            .ok();
    }

    /// Removes one subscription from the connection and the index (not from the mirror).
    pub(super) fn remove_sub(&mut self, conn_id: ConnId, sub_id: SubId) -> Option<Subscription> {
        let conn = self.connections.get_mut(&conn_id)?;
        let group = conn.group;
        let state = conn.subs.remove(&sub_id)?;
        if let Some(replay) = &state.replay {
            replay.cancel();
        }
        let subscription = state.subscription;
        self.out
            .metrics
            .subscriptions
            .dec_by(subscription.target.size() as i64);
        if let Some(entry) = self.index.get_mut(&subscription.entity_code) {
            entry.remove(&subscription.target, group, (conn_id, sub_id));
        }
        // A transaction under way of an entity the connection no longer follows: its end
        // is no message of the connection's (a subscription of it made again would be told
        // the end of a transaction it saw no part of).
        self.held_open.remove(&(conn_id, sub_id));
        let follows = conn
            .subs
            .values()
            .any(|s| s.subscription.entity_code == subscription.entity_code);
        if !follows
            && self
                .open_elsewhere
                .get(&conn_id)
                .is_some_and(|run| run.entity_code() == subscription.entity_code)
        {
            self.open_elsewhere.remove(&conn_id);
        }
        self.answer_awaits(conn_id);
        Some(subscription)
    }

    /// Ends one subscription: gone from the index and the mirror.
    pub(super) fn end_sub(&mut self, conn_id: ConnId, sub_id: SubId) {
        let Some(name) = self.connections.get(&conn_id).map(|c| c.name.clone()) else {
            return;
        };
        let Some(subscription) = self.remove_sub(conn_id, sub_id) else {
            return;
        };
        let entity_code = subscription.entity_code;
        self.out
            .mirror
            .send(match subscription.target {
                Target::Ids(ids) => MirrorOp::RemoveIds {
                    connection_id: name,
                    entity_code,
                    entity_ids: ids.into_iter().collect(),
                },
                Target::Rows(filter) => MirrorOp::RemoveRows {
                    connection_id: name,
                    entity_code,
                    filter: filter_json(filter.as_deref()),
                },
            })
            .ok();
    }

    pub(super) fn drop_connection(&mut self, conn_id: ConnId) {
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        let (name, mirrored, user) = (conn.name.clone(), conn.mirrored, conn.user.sub.clone());
        let subs: Vec<SubId> = conn.subs.keys().copied().collect();
        for sub in subs {
            self.remove_sub(conn_id, sub);
        }
        self.connections.remove(&conn_id);
        self.deferred.remove(&conn_id);
        forget(&mut self.users, &user, conn_id);
        if mirrored {
            self.out.mirror.send(MirrorOp::RemoveConnection(name)).ok();
        }
    }
}

/// `conn` is no longer one of `user`'s connections.
fn forget(users: &mut HashMap<String, HashSet<ConnId>>, user: &str, conn: ConnId) {
    if let Some(conns) = users.get_mut(user) {
        conns.remove(&conn);
        if conns.is_empty() {
            users.remove(user);
        }
    }
}

/// A filter as `sync.subscription.filter` stores it.
fn filter_json(filter: Option<&[Condition]>) -> Option<serde_json::Value> {
    filter.map(|f| serde_json::to_value(f).expect("filters serialize"))
}

fn mirror_rows(conn: &Conn, subscription: &Subscription) -> Vec<SubscriptionRow> {
    let row = |entity_id: Option<String>, filter| SubscriptionRow {
        connection_id: conn.name.clone(),
        user_id: conn.user.sub.clone(),
        entity_code: subscription.entity_code.clone(),
        entity_id,
        filter,
        mode: subscription.shape.mode,
    };
    match &subscription.target {
        Target::Ids(ids) => ids.iter().map(|id| row(Some(id.clone()), None)).collect(),
        Target::Rows(filter) => vec![row(None, filter_json(filter.as_deref()))],
    }
}

/// The subscription of `conn` that is `subscription`: a SUBSCRIBE of it again replaces it.
fn held_as(conn_id: ConnId, conn: &Conn, subscription: &Subscription) -> Option<(ConnId, SubId)> {
    conn.subs
        .iter()
        .find(|(_, s)| s.subscription == *subscription)
        .map(|(id, _)| (conn_id, *id))
}

/// Takes what an UNSUBSCRIBE of `ids` (None: all of it) takes from `target`; returns the ids
/// removed, and whether nothing is left (an UNSUBSCRIBE of ids leaves a filter's rows as
/// they were).
fn unsubscribed(target: &mut Target, ids: Option<&[String]>) -> (Vec<String>, bool) {
    match (ids, target) {
        (Some(ids), Target::Ids(held)) => {
            let removed = ids.iter().filter(|id| held.remove(*id)).cloned().collect();
            (removed, held.is_empty())
        }
        (Some(_), Target::Rows(_)) => (Vec::new(), false),
        (None, _) => (Vec::new(), true),
    }
}
