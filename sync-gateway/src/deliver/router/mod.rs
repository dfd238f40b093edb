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
mod subscriptions;
#[cfg(test)]
mod tests;

use super::command::{Command, ConnId, ReplayStart, SubId, SubscribeRequest};
use super::mirror::MirrorOp;
use super::outbox::{OpenRun, Outbox, RunCache};
use super::queue::{Outbound, Refused};
use crate::access::judge::{decide, Subscriber, Verdict};
use crate::access::roles::{GroupId, UserContext};
use crate::access::stage::JudgedBatch;
use crate::metrics::Metrics;
use crate::model::change::Op;
use crate::model::cursor::Cursor;
use crate::model::protocol::{ResyncReason, ServerMessage};
use crate::model::subscription::{Judgement, Subscription};
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
    /// Each user's connections: a SUBSCRIBE checks its user's holdings over these, not over
    /// every connection (with 10,000 users coming back at once, that scan was most of the
    /// router's time).
    users: HashMap<String, HashSet<ConnId>>,
    index: HashMap<String, EntityIndex>,
    next_sub: SubId,
    /// Where the live stream stands; None until the reader's first read.
    position: Option<Cursor>,
    /// The last batch ended inside a batch of the log (a full page): not a place a replay
    /// can end, so replays start when the drain ends.
    mid_drain: bool,
    /// Per connection, SUBSCRIBEs with `since` that arrived mid-drain, made at its end in
    /// order (at most as many as it may replay: `Limits::admits_deferred`).
    deferred: HashMap<ConnId, Vec<SubscribeRequest>>,
    /// Replaying subscriptions that held back a change of the transaction under way, which
    /// may go on in the next page: told where it ends.
    held_open: HashSet<(ConnId, SubId)>,
    /// Connections whose changes of the transaction under way went out in an earlier page
    /// (a transaction larger than a page), without its end: told of it when it comes.
    open_elsewhere: HashMap<ConnId, OpenRun>,
    out: Outlets,
}

impl Router {
    pub fn new(gateway_id: String, limits: Limits, out: Outlets) -> Self {
        Router {
            gateway_id,
            limits,
            connections: HashMap::new(),
            users: HashMap::new(),
            index: HashMap::new(),
            next_sub: 1,
            position: None,
            mid_drain: false,
            deferred: HashMap::new(),
            held_open: HashSet::new(),
            open_elsewhere: HashMap::new(),
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
                self.users
                    .entry(conn.user.sub.clone())
                    .or_default()
                    .insert(c.id);
                self.connections.insert(c.id, conn);
            }
            Command::Disconnect(conn) => self.drop_connection(conn),
            Command::Reauth { conn, user, group } => self.reauth(conn, user, group),
            Command::Subscribe(request) if request.since.is_some() && self.mid_drain => {
                self.defer(request)
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
            Command::Outdated { conn, entity_code } => self.outdated(conn, entity_code),
            Command::Replay(event) => self.replay_event(event),
        }
    }

    fn reset(&mut self, position: Cursor) {
        self.set_position(position, true);
        // The transaction under way is gone with the place; everyone refetches.
        self.open_elsewhere.clear();
        self.held_open.clear();
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
    /// So do subscriptions deferred to the end of a drain, checked against the old table.
    fn replaced(&mut self, codes: &[String]) {
        let mut told = HashSet::new();
        for code in codes {
            let ended: Vec<(ConnId, SubId, String)> = self
                .connections
                .iter()
                .flat_map(|(id, c)| {
                    c.subs
                        .iter()
                        .filter(|(_, s)| s.subscription.entity_code == *code)
                        .map(move |(sub, _)| (*id, *sub, code.clone()))
                })
                .collect();
            told.extend(ended.iter().map(|(conn, _, code)| (*conn, code.clone())));
            self.end_with_resync(ended, ResyncReason::EntityChanged);
        }
        let deferred: Vec<SubscribeRequest> = self
            .deferred
            .values_mut()
            .flat_map(|waiting| {
                waiting.extract_if(.., |r| codes.contains(&r.subscription.entity_code))
            })
            .collect();
        for request in deferred {
            let (conn, entity_code) = (request.conn, request.subscription.entity_code);
            if told.insert((conn, entity_code.clone())) {
                self.outdated(conn, entity_code);
            }
        }
    }

    /// A subscription that was never made, checked against a table since replaced: the
    /// connection refetches.
    fn outdated(&mut self, conn: ConnId, entity_code: String) {
        let reason = ResyncReason::EntityChanged;
        self.send(
            conn,
            &ServerMessage::Resync {
                entity_code,
                reason,
            },
        );
    }

    fn set_position(&mut self, position: Cursor, complete: bool) {
        self.position = Some(position.clone());
        self.mid_drain = !complete;
        self.out.position.send_replace(Some(position));
        if complete {
            for request in std::mem::take(&mut self.deferred).into_values().flatten() {
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
        // Connections given a change of the transaction under way: told where it ends.
        let mut in_transaction: HashSet<ConnId> = HashSet::new();
        let mut ended: Vec<(ConnId, SubId)> = Vec::new();
        for (change, verdict) in page.changes.iter().zip(&page.verdicts) {
            if let Some(entry) = self.index.get(&change.entity_code) {
                candidates.clear();
                match (change.op, verdict) {
                    (Op::Truncate | Op::Access, _) | (_, Verdict::Refetch(_)) => {
                        entry.all(&mut candidates)
                    }
                    (_, Verdict::Seen(None)) => entry.every_group(change, &mut candidates),
                    (_, Verdict::Seen(Some(s))) => {
                        entry.groups(change, &s.either(), &mut candidates)
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
                            match &mut state.replay {
                                // Ends the subscription, its replay too: nothing older follows.
                                _ if reason == ResyncReason::EntityChanged => {
                                    outboxes
                                        .entry(conn_id)
                                        .or_default()
                                        .resync(&change.entity_code, reason);
                                    ended.push((conn_id, sub_id));
                                }
                                Some(replay) => replay.hold_resync(reason),
                                None => outboxes
                                    .entry(conn_id)
                                    .or_default()
                                    .resync(&change.entity_code, reason),
                            }
                        }
                        Judgement::Deliver(action) => match &mut state.replay {
                            Some(replay) => {
                                replay.hold(change.clone(), action);
                                self.held_open.insert((conn_id, sub_id));
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
                    self.open_elsewhere.remove(&conn);
                }
                for (conn, run) in self.open_elsewhere.drain() {
                    outboxes.entry(conn).or_default().end_elsewhere(run, change);
                }
                for (conn, sub) in std::mem::take(&mut self.held_open) {
                    if let Some(replay) = self.replay_of(conn, sub) {
                        replay.end_transaction();
                    }
                }
            }
        }
        // The page ended inside a transaction: where its end must be told.
        for conn in in_transaction {
            if let Some(run) = outboxes.get(&conn).and_then(Outbox::open_run) {
                self.open_elsewhere.insert(conn, run);
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
        // Subscriptions deferred to the drain's end go too: made later, they would get the
        // entity's changes judged for nobody (the stage no longer lists the group).
        let connections = &self.connections;
        let deferred: Vec<ConnId> = self
            .deferred
            .iter_mut()
            .filter(|(conn, _)| connections.get(conn).is_some_and(|c| c.group == group))
            .flat_map(|(_, waiting)| {
                waiting.extract_if(.., |r| r.subscription.entity_code == entity)
            })
            .map(|r| r.conn)
            .collect();
        let mut told = HashSet::new();
        let refused = ended.iter().map(|(conn, _)| *conn).chain(deferred);
        for conn in refused {
            if told.insert(conn) {
                outboxes
                    .entry(conn)
                    .or_default()
                    .message(ServerMessage::forbidden(entity, why));
            }
        }
        for (conn, sub) in ended {
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
