//! The router: which connection receives which change. Pure state, no I/O: it owns every
//! subscription, gets batches already judged for row-level security (the visibility stage
//! comes before it), and decides who gets what, in log order, so that each connection's
//! messages follow the log's order. Its decisions leave through queues it never waits on:
//! each connection's byte-bounded send queue (a full one closes the connection, which resumes
//! from its cursor), the subscription mirror, the replays to start, and its live position.
//!
//! A subscription with `since` starts in replay: its live changes wait in a buffer while a
//! replay task reads the gap from the log up to the router's position at that moment
//! (`until`) and hands its pages back here, then SYNCED, then the buffer. No change falls in
//! the seam or appears twice, and the replay's messages take the same path as live ones.
//!
//! Index: entity → (entity id → subscriptions naming it) and (group → the group's
//! whole-entity and filtered subscriptions), so a change of a table with row-level security
//! visits only the subscriptions of the groups that may see it.

use super::mirror::{MirrorOp, SubscriptionRow};
use super::outbox::{Outbox, RunCache};
use super::queue::{Outbound, Refused};
use crate::access::limits::Cap;
use crate::access::roles::{GroupId, UserContext};
use crate::access::visibility::{ChangeSight, JudgedBatch};
use crate::metrics::Metrics;
use crate::model::change::{Action, Change, Op};
use crate::model::cursor::Cursor;
use crate::model::filter::Condition;
use crate::model::protocol::{ErrorCode, ResyncReason, ServerMessage};
use crate::model::subscription::{judge, Judgement, Sight, Subscription, Target};
use axum::extract::ws::Utf8Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub type ConnId = u64;
pub type SubId = u64;

/// What the router is told: by connections (through the visibility stage), by the stage
/// (judged batches), and by replays.
pub enum Command {
    Connect(Connection),
    Disconnect(ConnId),
    /// The connection refreshed its token: later changes are judged for this user and group.
    Reauth {
        conn: ConnId,
        user: Arc<UserContext>,
        group: GroupId,
    },
    Subscribe(SubscribeRequest),
    Unsubscribe {
        conn: ConnId,
        entity_code: String,
        entity_ids: Option<Vec<String>>,
    },
    UnsubscribeAll(ConnId),
    /// Changes in log order, judged, and the position after them.
    Batch(Arc<JudgedBatch>),
    /// The reader lost its place (its cursor expired): everyone resynchronises.
    Reset(Cursor),
    Replay(ReplayEvent),
}

/// A connection as the router sees it.
pub struct Connection {
    pub id: ConnId,
    pub user: Arc<UserContext>,
    pub group: GroupId,
    /// Changes carrying this origin tag (or `<sub>:<tag>`) are not sent back.
    pub client_id: Option<String>,
    pub queue: Outbound,
    /// Cancelled to close the connection (too slow): it resumes from its cursor.
    pub kick: CancellationToken,
}

/// A SUBSCRIBE that the connection checked (admission, names, columns, cursor).
pub struct SubscribeRequest {
    pub conn: ConnId,
    pub subscription: Subscription,
    pub since: Option<Cursor>,
    pub reference: Option<String>,
}

/// What a replay reports.
pub enum ReplayEvent {
    /// Changes of the gap, in log order, with what the subscriber may see of each.
    Page {
        conn: ConnId,
        sub: SubId,
        changes: Vec<(Arc<Change>, Sight)>,
    },
    /// The gap is read up to `until`: SYNCED, then the live changes kept meanwhile.
    Done { conn: ConnId, sub: SubId },
    /// The replay could not run: this message ends the subscription.
    Failed {
        conn: ConnId,
        sub: SubId,
        message: ServerMessage,
    },
}

/// A replay for the replay task to run.
#[derive(Clone)]
pub struct ReplayStart {
    pub conn: ConnId,
    pub sub: SubId,
    pub user: Arc<UserContext>,
    pub group: GroupId,
    pub client_id: Option<String>,
    pub subscription: Subscription,
    pub since: Cursor,
    pub until: Cursor,
    /// The connection's queue, whose room the replay waits for before each page.
    pub queue: Outbound,
    /// Cancelled when the subscription ends before its replay does: the replay stops.
    pub cancel: CancellationToken,
}

/// Bounds per connection and per user (SPEC 2.4).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Subscriptions of one connection (an id counts one).
    pub subscriptions: usize,
    /// Subscriptions of one user, over all its connections.
    pub subscriptions_per_user: usize,
    /// Filter conditions, over all subscriptions of one user (all its connections): what
    /// routing a change costs grows with them.
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
}

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
}

struct SubState {
    subscription: Subscription,
    /// Some while replaying.
    replay: Option<Replay>,
}

struct Replay {
    /// Live changes, as this subscription sees them, waiting for the replay's end.
    buffer: Vec<(Arc<Change>, Action)>,
    until: Cursor,
    reference: Option<String>,
    cancel: CancellationToken,
}

/// Who wants which changes of one entity.
#[derive(Default)]
struct EntityIndex {
    by_id: HashMap<String, HashSet<(ConnId, SubId)>>,
    rows: HashMap<GroupId, HashSet<(ConnId, SubId)>>,
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
        mut replays: mpsc::Receiver<ReplayEvent>,
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
            Command::Batch(batch) => self.route(&batch),
            Command::Reset(position) => self.reset(position),
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
                remove_from(&mut entry.rows, &old, &(conn_id, sub));
                entry.rows.entry(group).or_default().insert((conn_id, sub));
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
        if let Err(message) = self.admits(conn, &request, same) {
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
        self.index_sub(conn_id, sub_id, group, &subscription);
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
            replay: replay.as_ref().map(|r| Replay {
                buffer: Vec::new(),
                until: r.until.clone(),
                reference: reference.clone(),
                cancel: r.cancel.clone(),
            }),
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

    /// Whether `conn` may add this subscription, else why not; `replacing` (a subscription it
    /// replaces) does not count.
    fn admits<'a>(
        &'a self,
        conn: &'a Conn,
        request: &SubscribeRequest,
        replacing: Option<(ConnId, SubId)>,
    ) -> Result<(), String> {
        let limits = &self.limits;
        let kept = |conn_id: ConnId, c: &'a Conn| kept_subs(conn_id, c, replacing);
        let conn_id = request.conn;
        let held: usize = kept(conn_id, conn)
            .map(|s| s.subscription.target.size())
            .sum();
        if held + request.subscription.target.size() > limits.subscriptions {
            return Err(format!(
                "a connection holds at most {} subscriptions",
                limits.subscriptions
            ));
        }
        let users = self
            .connections
            .iter()
            .filter(|(_, c)| c.user.sub == conn.user.sub);
        let (held_by_user, conditions, values) = users
            .flat_map(|(id, c)| kept(*id, c))
            .map(|s| &s.subscription)
            .chain([&request.subscription])
            .map(|s| match &s.target {
                Target::Rows(Some(filter)) => (s.target.size(), filter_cost(filter)),
                _ => (s.target.size(), (0, 0)),
            })
            .fold((0, 0, 0), |(n, c, v), (n2, (c2, v2))| {
                (n + n2, c + c2, v + v2)
            });
        if held_by_user > limits.subscriptions_per_user {
            return Err(format!(
                "a user holds at most {} subscriptions over all its connections",
                limits.subscriptions_per_user
            ));
        }
        if conditions > limits.conditions || values > limits.in_values {
            return Err(format!(
                "the filters of one user hold at most {} conditions and {} listed values",
                limits.conditions, limits.in_values
            ));
        }
        let replays = kept(conn_id, conn).filter(|s| s.replay.is_some()).count();
        if request.since.is_some() && replays >= limits.replays {
            return Err(format!(
                "a connection replays at most {} subscriptions at once",
                limits.replays
            ));
        }
        Ok(())
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
                remove_from(&mut entry.by_id, &id, &(conn_id, sub_id));
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
            replay.cancel.cancel();
        }
        let subscription = state.subscription;
        self.out
            .metrics
            .subscriptions
            .dec_by(subscription.target.size() as i64);
        if let Some(entry) = self.index.get_mut(&subscription.entity_code) {
            match &subscription.target {
                Target::Ids(ids) => {
                    for id in ids {
                        remove_from(&mut entry.by_id, id, &(conn_id, sub_id));
                    }
                }
                Target::Rows(_) => remove_from(&mut entry.rows, &group, &(conn_id, sub_id)),
            }
        }
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

    fn index_sub(&mut self, conn: ConnId, sub: SubId, group: GroupId, subscription: &Subscription) {
        let entry = self
            .index
            .entry(subscription.entity_code.clone())
            .or_default();
        match &subscription.target {
            Target::Ids(ids) => {
                for id in ids {
                    entry
                        .by_id
                        .entry(id.clone())
                        .or_default()
                        .insert((conn, sub));
                }
            }
            Target::Rows(_) => {
                entry.rows.entry(group).or_default().insert((conn, sub));
            }
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

    fn set_position(&mut self, position: Cursor, complete: bool) {
        self.position = Some(position.clone());
        self.mid_drain = !complete;
        self.out.position.send_replace(Some(position));
        if complete {
            for request in std::mem::take(&mut self.deferred) {
                self.subscribe(request);
            }
        }
    }

    /// Routes one batch: every change to every subscription that sees it.
    fn route(&mut self, batch: &JudgedBatch) {
        let mut outboxes: HashMap<ConnId, Outbox> = HashMap::new();
        for (entity, group, why) in &batch.refused {
            self.refuse(entity, *group, why, &mut outboxes);
        }
        let mut candidates: Vec<(ConnId, SubId)> = Vec::new();
        for (change, sight) in batch.changes.iter().zip(&batch.sights) {
            let Some(entry) = self.index.get(&change.entity_code) else {
                continue;
            };
            let sight = sight.as_deref();
            candidates.clear();
            let by_id = change.entity_id.as_ref().and_then(|id| entry.by_id.get(id));
            candidates.extend(by_id.into_iter().flatten());
            match (change.op, sight) {
                (Op::Truncate, _) => {
                    candidates.extend(entry.by_id.values().flatten());
                    candidates.extend(entry.rows.values().flatten());
                }
                (_, None) => candidates.extend(entry.rows.values().flatten()),
                (_, Some(s)) => {
                    let mut groups: Vec<GroupId> =
                        s.before.iter().chain(&s.after).copied().collect();
                    groups.sort_unstable();
                    groups.dedup();
                    for g in groups {
                        candidates.extend(entry.rows.get(&g).into_iter().flatten());
                    }
                }
            }
            for &(conn_id, sub_id) in &candidates {
                let Some(conn) = self.connections.get_mut(&conn_id) else {
                    continue;
                };
                if conn.last_change == change.id {
                    continue; // already given by another of its subscriptions
                }
                let Some(state) = conn.subs.get_mut(&sub_id) else {
                    continue;
                };
                let own = change.written_by(&conn.user.sub, conn.client_id.as_deref());
                let seen = ChangeSight::of(sight, conn.group);
                match judge(change, &state.subscription.target, seen, own) {
                    Judgement::Skip => {}
                    Judgement::Resync => {
                        conn.last_change = change.id;
                        outboxes
                            .entry(conn_id)
                            .or_default()
                            .resync(&change.entity_code, ResyncReason::Truncate);
                    }
                    Judgement::Deliver(action) => match &mut state.replay {
                        Some(replay) => replay.buffer.push((change.clone(), action)),
                        None => {
                            conn.last_change = change.id;
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
                        .is_some_and(|r| r.buffer.len() > self.limits.replay_buffer)
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for conn in overflowing {
            self.kick(conn);
        }
        if let Some(last) = batch.changes.last() {
            self.out
                .metrics
                .record_routed(batch.changes.len(), &last.captured_at, batch.read_at);
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
                    .message(ServerMessage::error(ErrorCode::Forbidden, why, None));
            }
            self.end_sub(conn, sub);
        }
    }

    fn replay_event(&mut self, event: ReplayEvent) {
        match event {
            ReplayEvent::Page { conn, sub, changes } => {
                let Some(state) = self.connections.get(&conn).and_then(|c| c.subs.get(&sub)) else {
                    return;
                };
                let owner = &self.connections[&conn];
                let mut out = Outbox::default();
                for (change, sight) in changes {
                    let own = change.written_by(&owner.user.sub, owner.client_id.as_deref());
                    match judge(&change, &state.subscription.target, sight, own) {
                        Judgement::Skip => {}
                        Judgement::Resync => {
                            out.resync(&change.entity_code, ResyncReason::Truncate)
                        }
                        Judgement::Deliver(action) => {
                            out.push(&state.subscription.shape, &change, action)
                        }
                    }
                }
                self.deliver(conn, out, &mut RunCache::new());
            }
            ReplayEvent::Done { conn, sub } => {
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
                for (change, action) in replay.buffer {
                    out.push(&state.subscription.shape, &change, action);
                }
                self.deliver(conn, out, &mut RunCache::new());
            }
            ReplayEvent::Failed { conn, sub, message } => {
                self.send(conn, &message);
                self.end_sub(conn, sub);
            }
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

fn remove_from<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, HashSet<(ConnId, SubId)>>,
    key: &K,
    entry: &(ConnId, SubId),
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(entry);
        if set.is_empty() {
            map.remove(key);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::queue::{self, Queue};
    use crate::model::change::sample;
    use crate::model::filter::Op as FilterOp;
    use crate::model::protocol::Mode;
    use crate::model::subscription::Shape;
    use serde_json::{json, Value};

    struct Harness {
        router: Router,
        replays: mpsc::UnboundedReceiver<ReplayStart>,
        mirror: mpsc::UnboundedReceiver<MirrorOp>,
        metrics: Arc<Metrics>,
    }

    fn cursor(n: u64) -> Cursor {
        Cursor::from_db(format!("1.ab.{n}_{n}__{n}_{n}"))
    }

    fn harness() -> Harness {
        let (mirror, mirror_rx) = mpsc::unbounded_channel();
        let (replays_tx, replays) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::default());
        let outlets = Outlets {
            mirror,
            replays: replays_tx,
            position: watch::channel(None).0,
            metrics: metrics.clone(),
        };
        let limits = Limits {
            subscriptions: 100,
            subscriptions_per_user: 150,
            conditions: 4,
            in_values: 10,
            replays: 2,
            replay_buffer: 1000,
            mirror_backlog: Cap::new("subscription changes", 100, 10),
        };
        let mut router = Router::new("g".into(), limits, outlets);
        router.handle(Command::Batch(Arc::new(batch(vec![], vec![], 10, true))));
        Harness {
            router,
            replays,
            mirror: mirror_rx,
            metrics,
        }
    }

    fn batch(
        changes: Vec<Change>,
        sights: Vec<Option<ChangeSight>>,
        end: u64,
        complete: bool,
    ) -> JudgedBatch {
        let sights = if sights.is_empty() {
            vec![None; changes.len()]
        } else {
            sights.into_iter().map(|s| s.map(Arc::new)).collect()
        };
        JudgedBatch {
            changes: changes.into_iter().map(Arc::new).collect(),
            sights,
            refused: vec![],
            end: cursor(end),
            complete,
            read_at: tokio::time::Instant::now(),
        }
    }

    fn connect(
        h: &mut Harness,
        id: ConnId,
        group: GroupId,
        queue_bytes: usize,
    ) -> (Queue, CancellationToken) {
        connect_as(h, id, group, queue_bytes, &format!("user{id}"))
    }

    fn connect_as(
        h: &mut Harness,
        id: ConnId,
        group: GroupId,
        queue_bytes: usize,
        sub: &str,
    ) -> (Queue, CancellationToken) {
        let (outbound, queue) = queue::channel(queue_bytes);
        let kick = CancellationToken::new();
        let user = Arc::new(UserContext {
            sub: sub.to_owned(),
            role: Some("app_user".into()),
            claims: "{}".into(),
            claims_json: json!({}),
        });
        h.router.handle(Command::Connect(Connection {
            id,
            user,
            group,
            client_id: None,
            queue: outbound,
            kick: kick.clone(),
        }));
        (queue, kick)
    }

    fn subscribe(h: &mut Harness, conn: ConnId, target: Target, since: Option<Cursor>) {
        h.router.handle(Command::Subscribe(SubscribeRequest {
            conn,
            subscription: Subscription {
                entity_code: "doc".into(),
                target,
                shape: Shape {
                    mode: Mode::Delta,
                    columns: None,
                },
            },
            since,
            reference: None,
        }));
    }

    /// Everything queued for a connection so far.
    async fn drain(queue: &mut Queue) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(Some((text, _))) =
            tokio::time::timeout(std::time::Duration::ZERO, queue.next()).await
        {
            out.push(serde_json::from_str(&text).unwrap());
        }
        out
    }

    /// (type, entity id, action) of each message, changes flattened.
    fn shape(messages: &[Value]) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for m in messages {
            let kind = m["type"].as_str().unwrap().to_owned();
            match m["payload"]["changes"].as_array() {
                Some(changes) => out.extend(changes.iter().map(|c| {
                    let id = c["entityId"].as_str().unwrap().to_owned();
                    (kind.clone(), id, c["action"].as_str().unwrap().to_owned())
                })),
                None => out.push((kind, String::new(), String::new())),
            }
        }
        out
    }

    fn insert(id: &str) -> Change {
        Change {
            id: id.parse().unwrap(),
            ..sample(Op::Insert, id, Some(json!({"id": id, "n": 1})), None)
        }
    }

    /// Routes a complete batch of `changes`, everyone seeing all, ending at `end`.
    fn route(h: &mut Harness, changes: Vec<Change>, end: u64) {
        h.router
            .handle(Command::Batch(Arc::new(batch(changes, vec![], end, true))));
    }

    fn triple(kind: &str, id: &str, action: &str) -> (String, String, String) {
        (kind.into(), id.into(), action.into())
    }

    #[tokio::test]
    async fn a_live_subscription_gets_what_follows_and_nothing_after_unsubscribing() {
        let mut h = harness();
        let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
        subscribe(&mut h, 1, Target::Rows(None), None);
        let subscribed = drain(&mut q).await;
        assert_eq!(subscribed[0]["payload"]["cursor"], cursor(10).as_str());
        route(&mut h, vec![insert("1")], 11);
        assert_eq!(
            shape(&drain(&mut q).await),
            [triple("DELTA", "1", "CREATE")]
        );
        assert_eq!(h.metrics.subscriptions.get(), 1);
        h.router.handle(Command::Unsubscribe {
            conn: 1,
            entity_code: "doc".into(),
            entity_ids: None,
        });
        route(&mut h, vec![insert("2")], 12);
        assert!(drain(&mut q).await.is_empty());
        assert_eq!(h.metrics.subscriptions.get(), 0);
    }

    #[tokio::test]
    async fn a_replay_comes_first_then_synced_then_what_was_held_back() {
        let mut h = harness();
        let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
        subscribe(&mut h, 1, Target::Rows(None), Some(cursor(5)));
        let start = h.replays.try_recv().expect("a replay to run");
        assert_eq!(
            (start.since.clone(), start.until.clone()),
            (cursor(5), cursor(10))
        );
        // A live change while the replay runs waits.
        route(&mut h, vec![insert("9")], 11);
        assert_eq!(shape(&drain(&mut q).await), [triple("SUBSCRIBED", "", "")]);
        let page = vec![
            (Arc::new(insert("6")), Sight::ALL),
            (Arc::new(insert("7")), Sight::ALL),
        ];
        h.router.handle(Command::Replay(ReplayEvent::Page {
            conn: 1,
            sub: start.sub,
            changes: page,
        }));
        h.router.handle(Command::Replay(ReplayEvent::Done {
            conn: 1,
            sub: start.sub,
        }));
        assert_eq!(
            shape(&drain(&mut q).await),
            [
                triple("DELTA", "6", "CREATE"),
                triple("DELTA", "7", "CREATE"),
                triple("SYNCED", "", ""),
                triple("DELTA", "9", "CREATE"),
            ]
        );
        // Live from here on.
        route(&mut h, vec![insert("10")], 12);
        assert_eq!(
            shape(&drain(&mut q).await),
            [triple("DELTA", "10", "CREATE")]
        );
    }

    #[tokio::test]
    async fn a_replay_waits_for_the_end_of_a_drain_to_know_where_it_ends() {
        let mut h = harness();
        let (_q, _) = connect(&mut h, 1, 1, 1 << 20);
        h.router.handle(Command::Batch(Arc::new(batch(
            vec![insert("1")],
            vec![],
            11,
            false,
        ))));
        subscribe(&mut h, 1, Target::Rows(None), Some(cursor(5)));
        assert!(
            h.replays.try_recv().is_err(),
            "not in the middle of a drain"
        );
        route(&mut h, vec![insert("2")], 12);
        assert_eq!(h.replays.try_recv().expect("after it").until, cursor(12));
    }

    #[tokio::test]
    async fn a_connection_over_its_queue_is_closed_and_freed_at_once() {
        let mut h = harness();
        let (_slow, kick) = connect(&mut h, 1, 1, 300);
        let (mut fast, _) = connect(&mut h, 2, 1, 1 << 20);
        subscribe(&mut h, 1, Target::Rows(None), None);
        subscribe(&mut h, 2, Target::Rows(None), None);
        drain(&mut fast).await;
        for n in 0..5 {
            let changes = (0..5).map(|i| insert(&(n * 10 + i).to_string())).collect();
            h.router.handle(Command::Batch(Arc::new(batch(
                changes,
                vec![],
                20 + n,
                true,
            ))));
        }
        assert!(kick.is_cancelled());
        assert_eq!(
            h.metrics.subscriptions.get(),
            1,
            "the slow one's subscription went"
        );
        assert_eq!(
            shape(&drain(&mut fast).await).len(),
            25,
            "the other got everything"
        );
    }

    #[tokio::test]
    async fn each_group_sees_a_change_as_row_level_security_judged_it() {
        let mut h = harness();
        let (mut leaving, _) = connect(&mut h, 1, 1, 1 << 20);
        let (mut entering, _) = connect(&mut h, 2, 2, 1 << 20);
        let (mut outside, _) = connect(&mut h, 3, 3, 1 << 20);
        let (mut by_id, _) = connect(&mut h, 4, 3, 1 << 20);
        for conn in 1..=3 {
            subscribe(&mut h, conn, Target::Rows(None), None);
        }
        subscribe(&mut h, 4, Target::Ids(["5".to_owned()].into()), None);
        for q in [&mut leaving, &mut entering, &mut outside, &mut by_id] {
            drain(q).await;
        }
        let moved = Change {
            id: 5,
            ..sample(
                Op::Update,
                "5",
                Some(json!({"id": 5, "owner": "two"})),
                Some(json!({"id": 5, "owner": "one"})),
            )
        };
        let sight = ChangeSight {
            before: vec![1],
            after: vec![2],
        };
        h.router.handle(Command::Batch(Arc::new(batch(
            vec![moved],
            vec![Some(sight)],
            11,
            true,
        ))));
        assert_eq!(
            shape(&drain(&mut leaving).await),
            [triple("DELTA", "5", "DELETE")]
        );
        let entered = drain(&mut entering).await;
        assert_eq!(shape(&entered), [triple("DELTA", "5", "CREATE")]);
        assert_eq!(entered[0]["payload"]["changes"][0]["data"]["owner"], "two");
        assert!(drain(&mut outside).await.is_empty());
        assert!(
            drain(&mut by_id).await.is_empty(),
            "naming an id shows nothing of it"
        );
    }

    #[tokio::test]
    async fn a_group_refused_loses_its_subscriptions_with_forbidden() {
        let mut h = harness();
        let (mut q, _) = connect(&mut h, 1, 7, 1 << 20);
        subscribe(&mut h, 1, Target::Rows(None), None);
        drain(&mut q).await;
        let mut refused = batch(vec![], vec![], 11, true);
        refused
            .refused
            .push(("doc".into(), 7, "no read access to doc".into()));
        h.router.handle(Command::Batch(Arc::new(refused)));
        let messages = drain(&mut q).await;
        assert_eq!(messages[0]["payload"]["code"], "forbidden");
        route(&mut h, vec![insert("1")], 12);
        assert!(drain(&mut q).await.is_empty());
        assert_eq!(h.metrics.subscriptions.get(), 0);
    }

    #[tokio::test]
    async fn filters_are_bounded_per_user_and_replays_per_connection() {
        let mut h = harness();
        let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
        let condition = |n: i64| crate::model::filter::Condition {
            column: "n".into(),
            op: FilterOp::In,
            value: Some(json!((0..n).collect::<Vec<_>>())),
        };
        let (mut other, _) = connect_as(&mut h, 2, 1, 1 << 20, "user1");
        subscribe(&mut h, 1, Target::Rows(Some(vec![condition(6)])), None);
        // The same user's other connection shares the budget.
        subscribe(&mut h, 2, Target::Rows(Some(vec![condition(6)])), None);
        assert_eq!(
            drain(&mut other).await[0]["payload"]["code"],
            "too_many_subscriptions"
        );
        subscribe(&mut h, 1, Target::Rows(None), Some(cursor(1)));
        subscribe(&mut h, 1, ids(&["a"]), Some(cursor(2)));
        subscribe(&mut h, 1, ids(&["b"]), Some(cursor(3)));
        let answers: Vec<String> = drain(&mut q)
            .await
            .iter()
            .map(|m| {
                m["payload"]["code"]
                    .as_str()
                    .unwrap_or(m["type"].as_str().unwrap())
                    .to_owned()
            })
            .collect();
        assert_eq!(
            answers,
            [
                "SUBSCRIBED",
                "SUBSCRIBED",
                "SUBSCRIBED",
                "too_many_subscriptions"
            ]
        );
    }

    /// The mirror's operations so far, as (kind, rows or ids) pairs; added rows' backlog
    /// places are given back, as the mirror does once it wrote them.
    fn mirrored(h: &mut Harness) -> Vec<(&'static str, usize)> {
        let mut out = Vec::new();
        while let Ok(op) = h.mirror.try_recv() {
            out.push(match op {
                MirrorOp::Add(rows, _) => ("add", rows.len()),
                MirrorOp::RemoveIds { entity_ids, .. } => ("remove ids", entity_ids.len()),
                MirrorOp::RemoveEntity { .. } => ("remove entity", 0),
                MirrorOp::RemoveRows { .. } => ("remove rows", 0),
                MirrorOp::RemoveConnection(_) => ("remove connection", 0),
            });
        }
        out
    }

    fn ids(ids: &[&str]) -> Target {
        Target::Ids(ids.iter().map(|i| i.to_string()).collect())
    }

    #[tokio::test]
    async fn the_same_subscription_again_replaces_the_one_held() {
        let mut h = harness();
        let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
        for _ in 0..3 {
            subscribe(&mut h, 1, Target::Rows(None), None);
        }
        assert_eq!(h.metrics.subscriptions.get(), 1);
        route(&mut h, vec![insert("1")], 11);
        let messages = drain(&mut q).await;
        assert_eq!(
            shape(&messages[3..]),
            [triple("DELTA", "1", "CREATE")],
            "one DELTA, not three"
        );
        assert_eq!(
            mirrored(&mut h),
            [
                ("add", 1),
                ("remove rows", 0),
                ("add", 1),
                ("remove rows", 0),
                ("add", 1)
            ]
        );
    }

    #[tokio::test]
    async fn what_is_not_held_is_not_written_to_the_mirror() {
        let mut h = harness();
        let (_q, _) = connect(&mut h, 1, 1, 1 << 20);
        subscribe(&mut h, 1, ids(&["a", "b"]), None);
        for _ in 0..100 {
            h.router.handle(Command::Unsubscribe {
                conn: 1,
                entity_code: "other".into(),
                entity_ids: None,
            });
            h.router.handle(Command::Unsubscribe {
                conn: 1,
                entity_code: "doc".into(),
                entity_ids: Some(vec!["zz".into()]),
            });
        }
        h.router.handle(Command::Unsubscribe {
            conn: 1,
            entity_code: "doc".into(),
            entity_ids: Some(vec!["a".into(), "zz".into()]),
        });
        assert_eq!(mirrored(&mut h), [("add", 2), ("remove ids", 1)]);
        // Connections that never subscribed come and go without a write.
        for id in 2..100 {
            let _ = connect(&mut h, id, 1, 1 << 20);
            h.router.handle(Command::Disconnect(id));
        }
        h.router.handle(Command::Disconnect(1));
        assert_eq!(mirrored(&mut h), [("remove connection", 0)]);
    }

    #[tokio::test]
    async fn subscribing_faster_than_the_mirror_writes_is_refused_for_that_user_alone() {
        let mut h = harness();
        let (mut churner, _) = connect_as(&mut h, 1, 1, 1 << 20, "mallory");
        let (mut other, _) = connect_as(&mut h, 2, 1, 1 << 20, "bob");
        // Ten rows per user may wait (the harness's cap); nothing is written meanwhile.
        subscribe(&mut h, 1, ids(&["a", "b", "c", "d", "e", "f"]), None);
        subscribe(&mut h, 1, ids(&["g", "h", "i", "j", "k"]), None);
        let refused = drain(&mut churner).await;
        assert_eq!(refused[1]["type"], "ERROR", "{refused:?}");
        assert_eq!(refused[1]["payload"]["code"], "internal");
        subscribe(&mut h, 2, ids(&["a", "b", "c"]), None);
        assert_eq!(drain(&mut other).await[0]["type"], "SUBSCRIBED");
        // Once the mirror wrote the waiting rows, the churner may go on.
        let _ = mirrored(&mut h);
        subscribe(&mut h, 1, ids(&["g", "h", "i", "j", "k"]), None);
        assert_eq!(drain(&mut churner).await[0]["type"], "SUBSCRIBED");
    }

    #[tokio::test]
    async fn a_subscription_that_ends_stops_its_replay() {
        let mut h = harness();
        let (_q, _) = connect(&mut h, 1, 1, 1 << 20);
        subscribe(&mut h, 1, Target::Rows(None), Some(cursor(5)));
        let start = h.replays.try_recv().expect("a replay to run");
        assert!(!start.cancel.is_cancelled());
        h.router.handle(Command::Unsubscribe {
            conn: 1,
            entity_code: "doc".into(),
            entity_ids: None,
        });
        assert!(start.cancel.is_cancelled());
    }

    #[tokio::test]
    async fn a_refused_replacement_keeps_the_subscription_it_would_replace() {
        let mut h = harness();
        let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
        let ten = ids(&["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]);
        subscribe(&mut h, 1, ten.clone(), None);
        // Its ten rows still wait for the mirror: the same again is over the user's backlog.
        subscribe(&mut h, 1, ten, None);
        let answers = drain(&mut q).await;
        assert_eq!(answers[1]["payload"]["code"], "internal", "{answers:?}");
        route(&mut h, vec![insert("1")], 11);
        assert_eq!(
            shape(&drain(&mut q).await),
            [triple("DELTA", "1", "CREATE")]
        );
        assert_eq!(mirrored(&mut h), [("add", 10)]);
    }

    #[tokio::test]
    async fn subscriptions_are_bounded_per_user_over_its_connections() {
        let mut h = harness();
        // Room in the mirror's backlog: that is not what refuses below.
        h.router.limits.mirror_backlog = Cap::new("subscription changes", 1000, 1000);
        let (mut first, _) = connect_as(&mut h, 1, 1, 1 << 20, "mallory");
        let (mut second, _) = connect_as(&mut h, 2, 1, 1 << 20, "mallory");
        let (mut other, _) = connect_as(&mut h, 3, 1, 1 << 20, "bob");
        let hundred: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let sixty: Vec<String> = (100..160).map(|i| i.to_string()).collect();
        subscribe(
            &mut h,
            1,
            Target::Ids(hundred.iter().cloned().collect()),
            None,
        );
        subscribe(
            &mut h,
            2,
            Target::Ids(sixty.iter().cloned().collect()),
            None,
        );
        subscribe(&mut h, 3, Target::Ids(sixty.into_iter().collect()), None);
        assert_eq!(drain(&mut first).await[0]["type"], "SUBSCRIBED");
        assert_eq!(
            drain(&mut second).await[0]["payload"]["code"],
            "too_many_subscriptions"
        );
        assert_eq!(drain(&mut other).await[0]["type"], "SUBSCRIBED");
    }
}
