//! The router: which connection receives which change. One task owns every subscription
//! and sees every batch the reader hands over, in log order, so that routing needs no locks
//! and each connection's messages follow the log's order.
//!
//! Index: entity code → (entity id → subscriptions) plus the entity's whole-table and
//! filtered subscriptions. Per batch, each change is matched against the subscriptions of
//! its entity and becomes, per connection, part of a message holding a run of consecutive
//! changes of one entity (as that connection sees them): its cursor is the position after
//! its last change, safe to resume from.
//!
//! Tables with row-level security: before a batch is routed, the current rows it wrote are
//! read once per group of subscribers sharing a role and claims (not per subscriber, not
//! per change), and each subscriber gets a change only as `access::verdict` allows. A policy
//! that raises for one group costs that group an ERROR `forbidden`, nobody else anything.
//!
//! A subscription with `since` starts in replay: its live changes wait in a buffer while a
//! replay task reads the gap up to the router's position at that moment (`until`), then
//! the buffer follows. No change falls in the seam or appears twice. The router never waits
//! on a connection: a full send queue closes that connection (it resumes from its cursor).

use crate::access::{as_current, ids_to_check, verdict, visible_rows, UserContext, Verdict};
use crate::catalog::{Catalog, Entity};
use crate::filter::{matches_all, Condition};
use crate::log::{Change, Op};
use crate::metrics::Metrics;
use crate::outbound::{Outbound, Refused};
use crate::outbox::{Outbox, RunCache, Shape};
use crate::protocol::{Action, ErrorCode, Mode, ResyncReason, ServerMessage};
use crate::store::{StoreOp, SubscriptionRow};
use axum::extract::ws::Utf8Bytes;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub type ConnId = u64;
pub type SubId = u64;

/// Changes a replaying subscription may buffer before its connection counts as too slow.
const MAX_REPLAY_BUFFER: usize = 100_000;

/// What the router is asked to do.
pub enum Command {
    Connect(Connection),
    Disconnect(ConnId),
    /// The connection refreshed its token: later checks run with these claims.
    Reauth {
        conn: ConnId,
        user: UserContext,
    },
    Subscribe(SubscribeRequest),
    Unsubscribe {
        conn: ConnId,
        entity_code: String,
        entity_ids: Option<Vec<String>>,
    },
    UnsubscribeAll(ConnId),
    /// Changes read by the reader, in log order, and the position after them.
    Batch(Arc<Batch>),
    /// The reader lost its place (its cursor expired): everyone resynchronises.
    Reset(String),
    /// A replay reached its `until`: release the buffered changes and go live.
    ReplayDone {
        conn: ConnId,
        sub: SubId,
    },
    /// A replay could not run (bad or expired cursor): drop the subscription.
    ReplayFailed {
        conn: ConnId,
        sub: SubId,
    },
    /// A replay found the client's cursor ahead of `until`: drop the buffer and answer the
    /// router's position now, to replay up to.
    Reanchor {
        conn: ConnId,
        sub: SubId,
        reply: oneshot::Sender<String>,
    },
}

pub struct Batch {
    pub changes: Vec<Change>,
    pub end: String,
    /// The read reached the end of the log: `end` is a batch boundary (a cursor of
    /// `sync.current_cursor`), which is what a replay can read up to. A full page ends
    /// inside a batch instead.
    pub complete: bool,
}

/// A connection as the router sees it.
pub struct Connection {
    pub id: ConnId,
    pub user: UserContext,
    /// Changes carrying this origin tag are not sent back.
    pub client_id: Option<String>,
    pub outbound: Outbound,
    /// Cancelled to close the connection (too slow).
    pub kick: CancellationToken,
}

/// A SUBSCRIBE that the session has validated against the catalog.
pub struct SubscribeRequest {
    pub conn: ConnId,
    pub entity_code: String,
    pub target: Target,
    pub mode: Mode,
    pub columns: Option<Vec<String>>,
    pub since: Option<String>,
    pub reference: Option<String>,
}

/// A replay for the replay task to run, with the `until` the router chose.
pub struct ReplayStart {
    pub conn: ConnId,
    pub user: UserContext,
    pub sub: Subscription,
    pub sub_id: SubId,
    pub since: String,
    pub until: String,
    pub outbound: Outbound,
    pub client_id: Option<String>,
    pub count: usize,
    pub reference: Option<String>,
}

/// Which rows of an entity a subscription covers.
#[derive(Clone, Debug)]
pub enum Target {
    Ids(HashSet<String>),
    /// Every row, or the rows matching the filter.
    Rows(Option<Vec<Condition>>),
}

#[derive(Clone, Debug)]
pub struct Subscription {
    pub entity_code: String,
    pub target: Target,
    pub shape: Shape,
}

impl Subscription {
    /// How this subscription sees a change of a table with RLS, given the user's verdict.
    pub fn view_checked(&self, change: &Change, verdict: Verdict) -> Option<Action> {
        match verdict {
            Verdict::Send | Verdict::Current => self.view(change),
            Verdict::Skip => None,
            // An id is itself information: only those who named it learn that it left.
            Verdict::Gone => match &self.target {
                Target::Ids(ids)
                    if change.entity_id.as_ref().is_some_and(|id| ids.contains(id)) =>
                {
                    Some(Action::Delete)
                }
                _ => None,
            },
        }
    }

    /// How this subscription sees a change: None when it does not concern it.
    pub fn view(&self, change: &Change) -> Option<Action> {
        let plain = match change.op {
            Op::Insert => Action::Create,
            Op::Update => Action::Update,
            Op::Delete => Action::Delete,
            Op::Truncate => return None,
        };
        match &self.target {
            Target::Ids(ids) => change
                .entity_id
                .as_ref()
                .filter(|id| ids.contains(*id))
                .map(|_| plain),
            Target::Rows(None) => Some(plain),
            Target::Rows(Some(filter)) => {
                let before = change
                    .old_data
                    .as_ref()
                    .is_some_and(|row| matches_all(filter, row));
                let after = change
                    .data
                    .as_ref()
                    .is_some_and(|row| matches_all(filter, row));
                match (change.op, before, after) {
                    (Op::Insert, _, true) => Some(Action::Create),
                    (Op::Delete, true, _) => Some(Action::Delete),
                    (Op::Update, false, true) => Some(Action::Create),
                    (Op::Update, true, false) => Some(Action::Delete),
                    (Op::Update, true, true) => Some(Action::Update),
                    _ => None,
                }
            }
        }
    }

    fn rows(&self, conn: &ConnState) -> Vec<SubscriptionRow> {
        let row = |entity_id: Option<String>, filter| SubscriptionRow {
            connection_id: conn.name.clone(),
            user_id: conn.user.sub.clone(),
            entity_code: self.entity_code.clone(),
            entity_id,
            filter,
            mode: self.shape.mode,
        };
        match &self.target {
            Target::Ids(ids) => ids.iter().map(|id| row(Some(id.clone()), None)).collect(),
            Target::Rows(filter) => vec![row(None, filter_json(filter.as_deref()))],
        }
    }

    fn size(&self) -> usize {
        match &self.target {
            Target::Ids(ids) => ids.len(),
            Target::Rows(_) => 1,
        }
    }
}

/// A filter as `sync.subscription.filter` stores it.
fn filter_json(filter: Option<&[Condition]>) -> Option<serde_json::Value> {
    filter.map(|f| serde_json::to_value(f).expect("filters serialize"))
}

struct ConnState {
    /// The connection's id in `sync.subscription`.
    name: String,
    user: UserContext,
    client_id: Option<String>,
    outbound: Outbound,
    kick: CancellationToken,
    subs: HashMap<SubId, SubState>,
}

struct SubState {
    sub: Subscription,
    /// Some while replaying: the live changes (and how this subscription sees them) that
    /// wait for the replay to end.
    buffer: Option<Vec<(Arc<Change>, Action)>>,
}

/// Who wants which changes of one entity.
#[derive(Default)]
struct EntityIndex {
    by_id: HashMap<String, HashSet<(ConnId, SubId)>>,
    rows: HashSet<(ConnId, SubId)>,
}

/// Visible current rows per (entity, group of users), or the error their check raised.
type Visibility = HashMap<(String, Group), Result<HashMap<String, Map<String, Value>>, ()>>;

/// Users sharing a role and claims see the same rows.
type Group = (Option<String>, String);

/// One visibility check to run: the entity, a user of the group, the ids to look up.
type Check = (Arc<Entity>, UserContext, Vec<String>);

/// RLS checks run at once.
const PARALLEL_CHECKS: usize = 8;

/// What the router reads from the database: the catalog and a pool for RLS checks.
pub struct Database {
    pub pool: Pool,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
}

pub struct Router {
    db: Database,
    gateway_id: String,
    max_subscriptions: usize,
    connections: HashMap<ConnId, ConnState>,
    index: HashMap<String, EntityIndex>,
    next_sub: SubId,
    position: watch::Sender<String>,
    store: mpsc::UnboundedSender<StoreOp>,
    replays: mpsc::UnboundedSender<ReplayStart>,
    /// The last batch ended inside a batch of the log (a full page).
    mid_drain: bool,
    /// Replays to start, and re-anchors to answer, once the drain ends.
    deferred: Vec<Command>,
}

impl Router {
    /// `position` publishes where the live stream stands; subscriptions go to `store`,
    /// replays to be run to `replays`.
    pub fn new(
        db: Database,
        gateway_id: String,
        max_subscriptions: usize,
        position: watch::Sender<String>,
        store: mpsc::UnboundedSender<StoreOp>,
        replays: mpsc::UnboundedSender<ReplayStart>,
    ) -> Self {
        Router {
            db,
            gateway_id,
            max_subscriptions,
            connections: HashMap::new(),
            index: HashMap::new(),
            next_sub: 1,
            position,
            store,
            replays,
            mid_drain: false,
            deferred: Vec::new(),
        }
    }

    /// Handles commands until every sender is gone. Control commands (connections,
    /// subscriptions, replays) go before batches, so a disconnect never waits behind a
    /// backlog of changes; the batch channel is short, so the reader does not read far ahead.
    pub async fn run(
        mut self,
        mut control: mpsc::Receiver<Command>,
        mut batches: mpsc::Receiver<Command>,
    ) {
        let (mut control_open, mut batches_open) = (true, true);
        while control_open || batches_open {
            tokio::select! {
                biased;
                command = control.recv(), if control_open => match command {
                    Some(command) => self.handle(command).await,
                    None => control_open = false,
                },
                command = batches.recv(), if batches_open => match command {
                    Some(command) => self.handle(command).await,
                    None => batches_open = false,
                },
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Connect(c) => {
                let name = format!("{}:{}", self.gateway_id, c.id);
                let state = ConnState {
                    name,
                    user: c.user,
                    client_id: c.client_id,
                    outbound: c.outbound,
                    kick: c.kick,
                    subs: HashMap::new(),
                };
                self.connections.insert(c.id, state);
            }
            Command::Disconnect(conn) => {
                if let Some(state) = self.connections.remove(&conn) {
                    for (sub_id, sub) in &state.subs {
                        self.unindex(conn, *sub_id, &sub.sub);
                    }
                    let _ = self.store.send(StoreOp::RemoveConnection(state.name));
                }
            }
            Command::Reauth { conn, user } => {
                if let Some(state) = self.connections.get_mut(&conn) {
                    state.user = user;
                }
            }
            // A replay reads up to the router's position, which must be a batch boundary:
            // in the middle of a drain, it waits for the drain's end.
            Command::Subscribe(request) if request.since.is_some() && self.mid_drain => {
                self.deferred.push(Command::Subscribe(request));
            }
            Command::Reanchor { .. } if self.mid_drain => self.deferred.push(command),
            Command::Subscribe(request) => self.subscribe(request),
            Command::Unsubscribe {
                conn,
                entity_code,
                entity_ids,
            } => self.unsubscribe(conn, Some(&entity_code), entity_ids.as_deref()),
            Command::UnsubscribeAll(conn) => self.unsubscribe(conn, None, None),
            Command::Batch(batch) => {
                let visibility = self.check_visibility(&batch).await;
                self.route(&batch, &visibility);
                self.mid_drain = !batch.complete;
                if !self.mid_drain {
                    for command in std::mem::take(&mut self.deferred) {
                        Box::pin(self.handle(command)).await;
                    }
                }
            }
            Command::Reset(position) => {
                let _ = self.position.send(position);
                self.mid_drain = false;
                let entities: Vec<(ConnId, String)> = self
                    .connections
                    .iter()
                    .flat_map(|(id, c)| c.subs.values().map(|s| (*id, s.sub.entity_code.clone())))
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                for (conn, entity_code) in entities {
                    self.send(
                        conn,
                        &ServerMessage::Resync {
                            entity_code,
                            reason: ResyncReason::CursorExpired,
                        },
                    );
                }
            }
            Command::ReplayDone { conn, sub } => self.replay_done(conn, sub),
            Command::ReplayFailed { conn, sub } => self.remove_sub(conn, sub),
            Command::Reanchor { conn, sub, reply } => {
                if let Some(state) = self
                    .connections
                    .get_mut(&conn)
                    .and_then(|c| c.subs.get_mut(&sub))
                {
                    state.buffer = Some(Vec::new());
                }
                let _ = reply.send(self.position.borrow().clone());
            }
        }
    }

    fn subscribe(&mut self, request: SubscribeRequest) {
        let conn_id = request.conn;
        let Some(conn) = self.connections.get(&conn_id) else {
            return;
        };
        let sub = Subscription {
            entity_code: request.entity_code,
            target: request.target,
            shape: Shape {
                mode: request.mode,
                columns: request.columns,
            },
        };
        let held: usize = conn.subs.values().map(|s| s.sub.size()).sum();
        if held + sub.size() > self.max_subscriptions {
            let message = format!(
                "a connection holds at most {} subscriptions",
                self.max_subscriptions
            );
            self.send(
                conn_id,
                &ServerMessage::error(ErrorCode::TooManySubscriptions, message, request.reference),
            );
            return;
        }
        let sub_id = self.next_sub;
        self.next_sub += 1;
        let count = sub.size();
        let rows = sub.rows(conn);
        let (outbound, client_id, user) = (
            conn.outbound.clone(),
            conn.client_id.clone(),
            conn.user.clone(),
        );
        self.index(conn_id, sub_id, &sub);
        let _ = self.store.send(StoreOp::Add(rows));
        self.db
            .metrics
            .subscriptions
            .fetch_add(count as i64, std::sync::atomic::Ordering::Relaxed);
        let position = self.position.borrow().clone();
        match request.since {
            None => {
                let state = SubState {
                    sub: sub.clone(),
                    buffer: None,
                };
                self.connections
                    .get_mut(&conn_id)
                    .expect("checked")
                    .subs
                    .insert(sub_id, state);
                let answer = ServerMessage::Subscribed {
                    entity_code: sub.entity_code,
                    count,
                    cursor: position,
                    reference: request.reference,
                };
                self.send(conn_id, &answer);
            }
            Some(since) => {
                let state = SubState {
                    sub: sub.clone(),
                    buffer: Some(Vec::new()),
                };
                self.connections
                    .get_mut(&conn_id)
                    .expect("checked")
                    .subs
                    .insert(sub_id, state);
                let _ = self.replays.send(ReplayStart {
                    conn: conn_id,
                    user,
                    sub,
                    sub_id,
                    since,
                    until: position,
                    outbound,
                    client_id,
                    count,
                    reference: request.reference,
                });
            }
        }
    }

    fn unsubscribe(&mut self, conn: ConnId, entity_code: Option<&str>, ids: Option<&[String]>) {
        let Some(state) = self.connections.get_mut(&conn) else {
            return;
        };
        let name = state.name.clone();
        let mut emptied = Vec::new();
        let mut removed_ids = Vec::new();
        for (sub_id, sub) in state.subs.iter_mut() {
            if entity_code.is_some_and(|e| e != sub.sub.entity_code) {
                continue;
            }
            match (ids, &mut sub.sub.target) {
                (Some(ids), Target::Ids(held)) => {
                    for id in ids {
                        if held.remove(id) {
                            removed_ids.push((*sub_id, sub.sub.entity_code.clone(), id.clone()));
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
        for (sub_id, entity_code, id) in removed_ids {
            self.db
                .metrics
                .subscriptions
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.unindex_id(conn, sub_id, &entity_code, &id);
        }
        for sub_id in emptied {
            if let Some(state) = self
                .connections
                .get_mut(&conn)
                .and_then(|c| c.subs.remove(&sub_id))
            {
                self.unindex(conn, sub_id, &state.sub);
            }
        }
        let _ = self.store.send(match (entity_code, ids) {
            (None, _) => StoreOp::RemoveConnection(name),
            (Some(entity_code), None) => StoreOp::RemoveEntity {
                connection_id: name,
                entity_code: entity_code.into(),
            },
            (Some(entity_code), Some(ids)) => StoreOp::RemoveIds {
                connection_id: name,
                entity_code: entity_code.into(),
                entity_ids: ids.to_vec(),
            },
        });
    }

    fn remove_sub(&mut self, conn: ConnId, sub_id: SubId) {
        let Some(state) = self.connections.get_mut(&conn) else {
            return;
        };
        let name = state.name.clone();
        let Some(sub) = state.subs.remove(&sub_id) else {
            return;
        };
        self.unindex(conn, sub_id, &sub.sub);
        let entity_code = sub.sub.entity_code.clone();
        let _ = self.store.send(match sub.sub.target {
            Target::Ids(ids) => StoreOp::RemoveIds {
                connection_id: name,
                entity_code,
                entity_ids: ids.into_iter().collect(),
            },
            Target::Rows(filter) => StoreOp::RemoveRows {
                connection_id: name,
                entity_code,
                filter: filter_json(filter.as_deref()),
            },
        });
    }

    fn replay_done(&mut self, conn: ConnId, sub_id: SubId) {
        let Some(state) = self.connections.get_mut(&conn) else {
            return;
        };
        let Some(sub) = state.subs.get_mut(&sub_id) else {
            return;
        };
        let buffered = sub.buffer.take().unwrap_or_default();
        let sub = sub.sub.clone();
        let mut out = Outbox::default();
        for (change, action) in buffered {
            out.push(&sub.shape, &change, action);
        }
        self.deliver(conn, out, &mut RunCache::new());
    }

    fn index(&mut self, conn: ConnId, sub_id: SubId, sub: &Subscription) {
        let entry = self.index.entry(sub.entity_code.clone()).or_default();
        match &sub.target {
            Target::Ids(ids) => {
                for id in ids {
                    entry
                        .by_id
                        .entry(id.clone())
                        .or_default()
                        .insert((conn, sub_id));
                }
            }
            Target::Rows(_) => {
                entry.rows.insert((conn, sub_id));
            }
        }
    }

    fn unindex(&mut self, conn: ConnId, sub_id: SubId, sub: &Subscription) {
        self.db
            .metrics
            .subscriptions
            .fetch_sub(sub.size() as i64, std::sync::atomic::Ordering::Relaxed);
        match &sub.target {
            Target::Ids(ids) => {
                for id in ids {
                    self.unindex_id(conn, sub_id, &sub.entity_code, id);
                }
            }
            Target::Rows(_) => {
                if let Some(entry) = self.index.get_mut(&sub.entity_code) {
                    entry.rows.remove(&(conn, sub_id));
                }
            }
        }
    }

    fn unindex_id(&mut self, conn: ConnId, sub_id: SubId, entity_code: &str, id: &str) {
        if let Some(entry) = self.index.get_mut(entity_code) {
            if let Some(set) = entry.by_id.get_mut(id) {
                set.remove(&(conn, sub_id));
                if set.is_empty() {
                    entry.by_id.remove(id);
                }
            }
        }
    }

    /// Reads, for the batch's writes to tables with RLS, the current rows each group of
    /// their subscribers may see: one query per entity and group.
    async fn check_visibility(&self, batch: &Batch) -> Visibility {
        // A table altered since the catalog was read (RLS switched on, say) is read again first.
        let mut newest: HashMap<&str, i32> = HashMap::new();
        for c in &batch.changes {
            let v = newest.entry(&c.entity_code).or_insert(c.schema_version);
            *v = (*v).max(c.schema_version);
        }
        for (code, version) in newest {
            self.db.catalog.refresh_for(code, version).await;
        }
        let mut jobs: HashMap<(String, Group), Check> = HashMap::new();
        let codes: HashSet<&str> = batch
            .changes
            .iter()
            .map(|c| c.entity_code.as_str())
            .collect();
        for code in codes {
            let Some(entity) = self.db.catalog.cached(code).filter(|e| e.rls) else {
                continue;
            };
            let Some(entry) = self.index.get(code) else {
                continue;
            };
            let ids = ids_to_check(batch.changes.iter().filter(|c| c.entity_code == code));
            if ids.is_empty() {
                continue;
            }
            let by_id = ids.iter().filter_map(|id| entry.by_id.get(id)).flatten();
            for (conn, _) in entry.rows.iter().chain(by_id) {
                let Some(state) = self.connections.get(conn) else {
                    continue;
                };
                jobs.entry((code.to_owned(), state.user.group()))
                    .or_insert_with(|| (entity.clone(), state.user.clone(), ids.clone()));
            }
        }
        let (pool, metrics) = (&self.db.pool, &self.db.metrics);
        futures_util::stream::iter(jobs)
            .map(|(key, (entity, user, ids))| async move {
                let started = std::time::Instant::now();
                let rows = match pool.get().await {
                    Ok(client) => visible_rows(&client, &entity, &user, &ids).await.map_err(|e| {
                        tracing::info!(entity = entity.code, role = ?user.role, error = %crate::ErrorChain(&e), "visibility check failed");
                    }),
                    Err(e) => {
                        tracing::warn!(error = %crate::ErrorChain(&e), "no connection for a visibility check");
                        Err(())
                    }
                };
                metrics.record_rls_check(started.elapsed());
                (key, rows)
            })
            .buffer_unordered(PARALLEL_CHECKS)
            .collect()
            .await
    }

    /// Routes one batch: every change to every connection that sees it.
    fn route(&mut self, batch: &Batch, visibility: &Visibility) {
        let mut outboxes: HashMap<ConnId, Outbox> = HashMap::new();
        let mut refused: HashSet<(ConnId, String)> = HashSet::new();
        let mut current_copies: HashMap<i64, Arc<Change>> = HashMap::new();
        for change in &batch.changes {
            let Some(entry) = self.index.get(&change.entity_code) else {
                continue;
            };
            let by_id = change.entity_id.as_ref().and_then(|id| entry.by_id.get(id));
            let candidates: HashSet<ConnId> = by_id
                .into_iter()
                .flatten()
                .chain(entry.rows.iter())
                .map(|(c, _)| *c)
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let change = Arc::new(change.clone());
            for conn in candidates {
                let Some(state) = self.connections.get_mut(&conn) else {
                    continue;
                };
                if change.written_by(&state.user.sub, state.client_id.as_deref()) {
                    continue; // its own write
                }
                let out = outboxes.entry(conn).or_default();
                if change.op == Op::Truncate {
                    out.resync(&change.entity_code, ResyncReason::Truncate);
                    continue;
                }
                let checked = match visibility
                    .get(&(change.entity_code.clone(), state.user.group()))
                {
                    None => None,
                    Some(Ok(rows)) => Some((verdict(&change, rows), rows)),
                    Some(Err(())) => {
                        if refused.insert((conn, change.entity_code.clone())) {
                            let message = format!(
                                "a row-level-security policy of {} failed for you",
                                change.entity_code
                            );
                            out.message(ServerMessage::error(ErrorCode::Forbidden, message, None));
                        }
                        continue;
                    }
                };
                // A visible row that changed since goes out as it is now (one copy per change).
                let (change, checked) = match checked {
                    Some((Verdict::Current, rows)) => {
                        let copy = current_copies
                            .entry(change.id)
                            .or_insert_with(|| Arc::new(as_current(&change, rows)))
                            .clone();
                        (copy, Some(Verdict::Send))
                    }
                    other => (change.clone(), other.map(|(v, _)| v)),
                };
                // Live subscriptions answer now; replaying ones keep the change for later.
                let mut live: Option<(&Subscription, Action)> = None;
                for sub in state
                    .subs
                    .values_mut()
                    .filter(|s| s.sub.entity_code == change.entity_code)
                {
                    let action = match checked {
                        None => sub.sub.view(&change),
                        Some(v) => sub.sub.view_checked(&change, v),
                    };
                    let Some(action) = action else {
                        continue;
                    };
                    match &mut sub.buffer {
                        Some(buffer) => buffer.push((change.clone(), action)),
                        None if live.is_none() => live = Some((&sub.sub, action)),
                        None => {}
                    }
                }
                if let Some((sub, action)) = live {
                    out.push(&sub.shape, &change, action);
                }
            }
        }
        let mut cache = RunCache::new();
        for (conn, out) in outboxes {
            self.deliver(conn, out, &mut cache);
        }
        // Replays that outgrew their buffer: their connection is too slow to wait for.
        let overflowing: Vec<ConnId> = self
            .connections
            .iter()
            .filter(|(_, c)| {
                c.subs.values().any(|s| {
                    s.buffer
                        .as_ref()
                        .is_some_and(|b| b.len() > MAX_REPLAY_BUFFER)
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for conn in overflowing {
            self.kick(conn);
        }
        if let Some(last) = batch.changes.last() {
            self.db
                .metrics
                .record_routed(batch.changes.len(), &last.captured_at);
        }
        let _ = self.position.send(batch.end.clone());
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
        match state.outbound.try_push(text) {
            Ok(()) => true,
            Err(Refused::Full) => {
                self.kick(conn);
                false
            }
            Err(Refused::Closed) => false,
        }
    }

    fn kick(&mut self, conn: ConnId) {
        if let Some(state) = self.connections.get(&conn) {
            tracing::info!(conn, "closing a connection whose send queue is full");
            state.kick.cancel();
        }
    }
}
