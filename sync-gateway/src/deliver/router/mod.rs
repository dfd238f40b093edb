//! The router: which connection receives which change. Pure state, no I/O: it owns every
//! subscription, gets batches already judged (`access::stage`), and decides who gets what
//! (`access::judge::decide`), in log order, so that each connection's messages follow the
//! log's order. Its decisions leave through queues it never waits on: each connection's
//! byte-bounded send queue (a full one closes the connection, which resumes from its
//! cursor), the subscription mirror, the replays to start, and its live position.
//!
//! Its parts: `index` (who wants which changes of an entity), `limits` (what a connection
//! and a user may hold), `replaying` (a subscription's replay and the live changes held back
//! meanwhile), `awaits` (AWAIT answered once the stream passed a cursor).

mod awaits;
mod index;
mod limits;
mod replaying;
#[cfg(test)]
mod tests;

use super::command::{Command, ConnId, ReplayStart, SubId, SubscribeRequest};
use super::mirror::{MirrorOp, SubscriptionRow};
use super::outbox::{Outbox, RunCache};
use super::queue::{Outbound, Refused};
use crate::access::judge::{decide, Subscriber, Verdict};
use crate::access::roles::{GroupId, UserContext};
use crate::access::stage::JudgedBatch;
use crate::metrics::Metrics;
use crate::model::change::Op;
use crate::model::cursor::Cursor;
use crate::model::filter::Condition;
use crate::model::protocol::{ErrorCode, ResyncReason, ServerMessage};
use crate::model::subscription::{Judgement, Subscription, Target};
use awaits::Awaits;
use axum::extract::ws::Utf8Bytes;
use index::EntityIndex;
pub use limits::Limits;
use replaying::Replay;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Where the router's decisions go; none of them waits.
pub struct Outlets {
    pub mirror: mpsc::UnboundedSender<MirrorOp>,
    pub replays: mpsc::UnboundedSender<ReplayStart>,
    pub position: watch::Sender<Option<Cursor>>,
    pub metrics: Arc<Metrics>,
}

struct Conn {
    /// The connection's id in `sync.subscription`.
    name: String,
    user: Arc<UserContext>,
    group: GroupId,
    client_id: Option<String>,
    queue: Outbound,
    kick: CancellationToken,
    subs: HashMap<SubId, SubState>,
    /// The last change this connection was given, so that a change several of its
    /// subscriptions match goes out once.
    last_change: i64,
    /// Whether it ever had rows in the mirror (else closing it writes nothing there).
    mirrored: bool,
    awaits: Awaits,
}

impl Conn {
    fn subscriber(&self) -> Subscriber<'_> {
        Subscriber {
            sub: &self.user.sub,
            client_id: self.client_id.as_deref(),
            group: self.group,
        }
    }

    fn replaying(&self) -> bool {
        self.subs.values().any(|s| s.replay.is_some())
    }
}

struct SubState {
    subscription: Subscription,
    /// Some while replaying.
    replay: Option<Replay>,
}

pub struct Router {
    gateway_id: String,
    limits: Limits,
    connections: HashMap<ConnId, Conn>,
    index: HashMap<String, EntityIndex>,
    next_sub: SubId,
    /// Where the live stream stands; None until the reader's first read.
    position: Option<Cursor>,
    /// The last batch ended inside a batch of the log (a full page): not a place a replay
    /// can end, so replays start when the drain ends.
    mid_drain: bool,
    deferred: Vec<SubscribeRequest>,
    out: Outlets,
}

impl Router {
    pub fn new(gateway_id: String, limits: Limits, out: Outlets) -> Self {
        Router {
            gateway_id,
            limits,
            connections: HashMap::new(),
            index: HashMap::new(),
            next_sub: 1,
            position: None,
            mid_drain: false,
            deferred: Vec::new(),
            out,
        }
    }

    /// Handles commands until every sender is gone; replay events go before commands, so a
    /// replay's pages keep flowing.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut replays: mpsc::Receiver<super::command::ReplayEvent>,
    ) {
        let (mut commands_open, mut replays_open) = (true, true);
        while commands_open || replays_open {
            tokio::select! {
                biased;
                event = replays.recv(), if replays_open => match event {
                    Some(event) => self.handle(Command::Replay(event)),
                    None => replays_open = false,
                },
                command = commands.recv(), if commands_open => match command {
                    Some(command) => self.handle(command),
                    None => commands_open = false,
                },
            }
        }
    }

    pub fn handle(&mut self, command: Command) {
        match command {
            Command::Connect(c) => {
                let conn = Conn {
                    name: format!("{}:{}", self.gateway_id, c.id),
                    user: c.user,
                    group: c.group,
                    client_id: c.client_id,
                    queue: c.queue,
                    kick: c.kick,
                    subs: HashMap::new(),
                    last_change: i64::MIN,
                    mirrored: false,
                    awaits: Awaits::default(),
                };
                self.connections.insert(c.id, conn);
            }
            Command::Disconnect(conn) => self.drop_connection(conn),
            Command::Reauth { conn, user, group } => self.reauth(conn, user, group),
            Command::Subscribe(request) if request.since.is_some() && self.mid_drain => {
                self.deferred.push(request);
            }
            Command::Subscribe(request) => self.subscribe(request),
            Command::Unsubscribe {
                conn,
                entity_code,
                entity_ids,
            } => self.unsubscribe(conn, Some(&entity_code), entity_ids.as_deref()),
            Command::UnsubscribeAll(conn) => self.unsubscribe(conn, None, None),
            Command::Await {
                conn,
                cursor,
                reference,
            } => self.wait_for(conn, cursor, reference),
            Command::Batch(batch) => self.route(&batch),
            Command::Reset(position) => self.reset(position),
            Command::Replaced(codes) => self.replaced(&codes),
            Command::Replay(event) => self.replay_event(event),
        }
    }

    fn reauth(&mut self, conn_id: ConnId, user: Arc<UserContext>, group: GroupId) {
        let Some(conn) = self.connections.get_mut(&conn_id) else {
            return;
        };
        let old = conn.group;
        conn.user = user;
        conn.group = group;
        let rows: Vec<(String, SubId)> = conn
            .subs
            .iter()
            .filter(|(_, s)| matches!(s.subscription.target, Target::Rows(_)))
            .map(|(id, s)| (s.subscription.entity_code.clone(), *id))
            .collect();
        for (entity, sub) in rows {
            if let Some(entry) = self.index.get_mut(&entity) {
                entry.regroup(old, group, (conn_id, sub));
            }
        }
    }

    fn subscribe(&mut self, request: SubscribeRequest) {
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
        let same = conn
            .subs
            .iter()
            .find(|(_, s)| s.subscription == request.subscription)
            .map(|(id, _)| (conn_id, *id));
        if let Err(message) = self
            .limits
            .admits(&self.connections, conn_id, &request, same)
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
        };
        if self.send(conn_id, &answer) {
            if let Some(replay) = replay {
                self.out.replays.send(replay).ok();
            }
        }
    }

    fn unsubscribe(&mut self, conn_id: ConnId, entity_code: Option<&str>, ids: Option<&[String]>) {
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
            match (ids, &mut sub.subscription.target) {
                (Some(ids), Target::Ids(held)) => {
                    for id in ids {
                        if held.remove(id) {
                            removed_ids.push((
                                *sub_id,
                                sub.subscription.entity_code.clone(),
                                id.clone(),
                            ));
                        }
                    }
                    if held.is_empty() {
                        emptied.push(*sub_id);
                    }
                }
                (Some(_), Target::Rows(_)) => {}
                (None, _) => emptied.push(*sub_id),
            }
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
    fn remove_sub(&mut self, conn_id: ConnId, sub_id: SubId) -> Option<Subscription> {
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
        self.answer_awaits(conn_id);
        Some(subscription)
    }

    /// Ends one subscription: gone from the index and the mirror.
    fn end_sub(&mut self, conn_id: ConnId, sub_id: SubId) {
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

    fn drop_connection(&mut self, conn_id: ConnId) {
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        let (name, mirrored) = (conn.name.clone(), conn.mirrored);
        let subs: Vec<SubId> = conn.subs.keys().copied().collect();
        for sub in subs {
            self.remove_sub(conn_id, sub);
        }
        self.connections.remove(&conn_id);
        if mirrored {
            self.out.mirror.send(MirrorOp::RemoveConnection(name)).ok();
        }
    }

    fn reset(&mut self, position: Cursor) {
        self.set_position(position, true);
        let entities: HashSet<(ConnId, String)> = self
            .connections
            .iter()
            .flat_map(|(id, c)| {
                c.subs
                    .values()
                    .map(|s| (*id, s.subscription.entity_code.clone()))
            })
            .collect();
        for (conn, entity_code) in entities {
            let message = ServerMessage::Resync {
                entity_code,
                reason: ResyncReason::CursorExpired,
            };
            self.send(conn, &message);
        }
    }

    /// Entities replaced under their code: every subscription of them ends with RESYNC
    /// `entity_changed` (the rows held are another table's; refetch and subscribe again).
    fn replaced(&mut self, codes: &[String]) {
        for code in codes {
            let ended: Vec<(ConnId, SubId)> = self
                .connections
                .iter()
                .flat_map(|(id, c)| {
                    c.subs
                        .iter()
                        .filter(|(_, s)| s.subscription.entity_code == *code)
                        .map(move |(sub, _)| (*id, *sub))
                })
                .collect();
            let mut told = HashSet::new();
            for (conn, sub) in ended {
                if told.insert(conn) {
                    let message = ServerMessage::Resync {
                        entity_code: code.clone(),
                        reason: ResyncReason::EntityChanged,
                    };
                    self.send(conn, &message);
                }
                self.end_sub(conn, sub);
            }
        }
    }

    fn set_position(&mut self, position: Cursor, complete: bool) {
        self.position = Some(position.clone());
        self.mid_drain = !complete;
        self.out.position.send_replace(Some(position));
        if complete {
            for request in std::mem::take(&mut self.deferred) {
                self.subscribe(request);
            }
            let waiting: Vec<ConnId> = self
                .connections
                .iter()
                .filter(|(_, c)| !c.awaits.is_empty())
                .map(|(id, _)| *id)
                .collect();
            for conn in waiting {
                self.answer_awaits(conn);
            }
        }
    }

    /// Routes one batch: every change to every subscription that sees it.
    fn route(&mut self, batch: &JudgedBatch) {
        let page = &batch.page;
        let mut outboxes: HashMap<ConnId, Outbox> = HashMap::new();
        for (entity, group, why) in &page.refused {
            self.refuse(entity, *group, why, &mut outboxes);
        }
        let mut candidates: Vec<(ConnId, SubId)> = Vec::new();
        // Connections given a change of the transaction under way, and replaying
        // subscriptions that held one back: told where it ends.
        let mut in_transaction: HashSet<ConnId> = HashSet::new();
        let mut held_in_transaction: HashSet<(ConnId, SubId)> = HashSet::new();
        let mut ended: Vec<(ConnId, SubId)> = Vec::new();
        for (change, verdict) in page.changes.iter().zip(&page.verdicts) {
            if let Some(entry) = self.index.get(&change.entity_code) {
                candidates.clear();
                match (change.op, verdict) {
                    (Op::Truncate | Op::Access, _) | (_, Verdict::Replaced) => {
                        entry.all(&mut candidates)
                    }
                    (_, Verdict::Seen(None)) => entry.every_group(change, &mut candidates),
                    (_, Verdict::Seen(Some(s))) => {
                        let mut groups: Vec<GroupId> =
                            s.before.iter().chain(&s.after).copied().collect();
                        groups.sort_unstable();
                        groups.dedup();
                        entry.groups(change, &groups, &mut candidates)
                    }
                }
                for &(conn_id, sub_id) in &candidates {
                    let Some(conn) = self.connections.get_mut(&conn_id) else {
                        continue;
                    };
                    if conn.last_change == change.id {
                        continue; // already given by another of its subscriptions
                    }
                    let subscriber = conn.subscriber();
                    let Some(state) = conn.subs.get(&sub_id) else {
                        continue;
                    };
                    let judgement =
                        decide(change, verdict, &subscriber, &state.subscription.target);
                    let state = conn.subs.get_mut(&sub_id).expect("found above");
                    match judgement {
                        Judgement::Skip => {}
                        Judgement::Resync(reason) => {
                            conn.last_change = change.id;
                            outboxes
                                .entry(conn_id)
                                .or_default()
                                .resync(&change.entity_code, reason);
                            if reason == ResyncReason::EntityChanged {
                                ended.push((conn_id, sub_id));
                            }
                        }
                        Judgement::Deliver(action) => match &mut state.replay {
                            Some(replay) => {
                                replay.hold(change.clone(), action);
                                held_in_transaction.insert((conn_id, sub_id));
                            }
                            None => {
                                conn.last_change = change.id;
                                in_transaction.insert(conn_id);
                                outboxes.entry(conn_id).or_default().push(
                                    &state.subscription.shape,
                                    change,
                                    action,
                                );
                            }
                        },
                    }
                }
            }
            if change.tx_end {
                for conn in in_transaction.drain() {
                    if let Some(out) = outboxes.get_mut(&conn) {
                        out.end_transaction();
                    }
                }
                for (conn, sub) in held_in_transaction.drain() {
                    let replay = self
                        .connections
                        .get_mut(&conn)
                        .and_then(|c| c.subs.get_mut(&sub))
                        .and_then(|s| s.replay.as_mut());
                    if let Some(replay) = replay {
                        replay.end_transaction();
                    }
                }
            }
        }
        for (conn, sub) in ended {
            self.end_sub(conn, sub);
        }
        let mut cache = RunCache::new();
        for (conn, out) in outboxes {
            self.deliver(conn, out, &mut cache);
        }
        let overflowing: Vec<ConnId> = self
            .connections
            .iter()
            .filter(|(_, c)| {
                c.subs.values().any(|s| {
                    s.replay
                        .as_ref()
                        .is_some_and(|r| r.held() > self.limits.replay_buffer)
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for conn in overflowing {
            self.kick(conn);
        }
        if let Some(last) = page.changes.last() {
            self.out
                .metrics
                .record_routed(page.changes.len(), &last.captured_at, batch.read_at);
        }
        self.set_position(batch.end.clone(), batch.complete);
    }

    /// `group` may no longer read `entity`: its subscriptions to it end with ERROR forbidden.
    fn refuse(
        &mut self,
        entity: &str,
        group: GroupId,
        why: &str,
        outboxes: &mut HashMap<ConnId, Outbox>,
    ) {
        let ended: Vec<(ConnId, SubId)> = self
            .connections
            .iter()
            .filter(|(_, c)| c.group == group)
            .flat_map(|(id, c)| {
                c.subs
                    .iter()
                    .filter(|(_, s)| s.subscription.entity_code == entity)
                    .map(move |(sub, _)| (*id, *sub))
            })
            .collect();
        let mut told = HashSet::new();
        for (conn, sub) in ended {
            if told.insert(conn) {
                outboxes
                    .entry(conn)
                    .or_default()
                    .message(ServerMessage::forbidden(entity, why));
            }
            self.end_sub(conn, sub);
        }
    }

    fn deliver(&mut self, conn: ConnId, out: Outbox, cache: &mut RunCache) {
        for text in out.render(cache) {
            if !self.queue(conn, text) {
                return;
            }
        }
    }

    fn send(&mut self, conn: ConnId, message: &ServerMessage) -> bool {
        self.queue(conn, message.to_json().into())
    }

    /// Queues a message for a connection; false when the connection is gone or was closed
    /// for being too slow.
    fn queue(&mut self, conn: ConnId, text: Utf8Bytes) -> bool {
        let Some(state) = self.connections.get(&conn) else {
            return false;
        };
        match state.queue.try_push(text) {
            Ok(()) => true,
            Err(Refused::Full) => {
                self.kick(conn);
                false
            }
            Err(Refused::Closed) => false,
        }
    }

    /// Closes a connection that does not keep up (4008) and frees what it held at once.
    fn kick(&mut self, conn: ConnId) {
        if let Some(state) = self.connections.get(&conn) {
            tracing::info!(conn, "closing a connection that does not keep up");
            state.kick.cancel();
            self.drop_connection(conn);
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
