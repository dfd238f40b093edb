//! One WebSocket connection: two tasks. The reader (this one) checks the client's messages
//! and hands subscriptions on; the writer owns the socket's sending half and sends, in order,
//! what the router queued and what the reader answers, pings, and the closing frame.
//!
//! No send waits longer than `--send-timeout`: a client that does not read is closed (4008)
//! and everything it held is freed, so it costs the gateway a bounded queue for a bounded
//! time. The connection also closes when the token expires (4001), the client stops
//! answering pings, it keeps sending bad messages (1008), or the gateway stops (1001). Its
//! subscriptions go with it.

use super::command::{Command, ConnId, Connection, SubscribeRequest};
use super::queue::{self, Queue};
use crate::access::admission::{readable_entity, Refusal};
use crate::access::auth::Claims;
use crate::access::limits::Held;
use crate::access::roles::{GroupId, UserContext};
use crate::deliver::reach::{reach, Reach};
use crate::feed::catalog::Entity;
use crate::model::cursor::Cursor;
use crate::model::protocol::{
    parse, reference_of, ClientMessage, ErrorCode, ReconnectReason, ResyncReason, ServerMessage,
    Subscribe,
};
use crate::model::subscription::{Shape, Subscription, Target};
use crate::AppState;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// Bad messages in a row after which a connection is closed with 1008.
const MAX_BAD_MESSAGES: u32 = 20;
/// How long a closing connection waits for the client's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// When a client told its cursor is ahead of this gateway should come back.
const BEHIND_RETRY: Duration = Duration::from_secs(1);

pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;
pub const CLOSE_TOO_SLOW: u16 = 4008;

/// What the reader gives the writer.
enum Outgoing {
    Text(Utf8Bytes),
    Close(u16, &'static str),
}

/// Runs the connection until it closes; `_place` holds its place under the connection caps.
pub async fn run(
    socket: WebSocket,
    state: Arc<AppState>,
    claims: Claims,
    user: UserContext,
    client_id: Option<String>,
    _place: Held,
) {
    let id: ConnId = state.next_connection.fetch_add(1, Ordering::SeqCst);
    let user = Arc::new(user);
    let group = state.groups.join(&user);
    let (outbound, queue) = queue::channel(state.config.send_queue_bytes);
    let (replies, replies_rx) = mpsc::channel(8);
    let kick = CancellationToken::new();
    let connection = Connection {
        id,
        user: user.clone(),
        group,
        client_id,
        queue: outbound,
        kick: kick.clone(),
    };
    if state
        .control
        .send(Command::Connect(connection))
        .await
        .is_err()
    {
        state.groups.release(&user);
        return;
    }
    state.metrics.connections.inc();
    let (sink, mut stream) = socket.split();
    let answered_ping = Arc::new(AtomicBool::new(true));
    let writer_done = CancellationToken::new();
    let writer = tokio::spawn(
        Writer {
            sink,
            queue,
            replies: replies_rx,
            kick: kick.clone(),
            answered_ping: answered_ping.clone(),
            state: state.clone(),
        }
        .run(writer_done.clone()),
    );
    let mut session = Session {
        id,
        state: state.clone(),
        claims,
        user,
        group,
        subscribed: HashSet::new(),
        replies,
        kick: kick.clone(),
        bad_in_a_row: 0,
    };
    let close = loop {
        let expiry = Instant::now() + session.claims.remaining();
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    // Boxed: handling a message is a large future (subscribing, replaying),
                    // and inline it made every idle connection's task that large.
                    if let Some(close) = Box::pin(session.handle(&text)).await {
                        break Some(close);
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    session.reply(ServerMessage::error(ErrorCode::BadRequest, "messages are JSON text", None)).await;
                }
                Some(Ok(Message::Pong(_))) => answered_ping.store(true, Ordering::SeqCst),
                Some(Ok(Message::Ping(_))) => {} // answered by the library
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break None,
            },
            _ = sleep_until(expiry) => {
                let message = ServerMessage::error(ErrorCode::TokenExpired, "the token expired; reconnect with a new one", None);
                session.reply(message).await;
                break Some((CLOSE_TOKEN_EXPIRED, "token expired"));
            }
            _ = kick.cancelled() => break None,
            _ = writer_done.cancelled() => break None,
            _ = state.shutdown.cancelled() => break None, // the writer says goodbye
        }
    };
    let Session { replies, user, .. } = session;
    if let Some((code, reason)) = close {
        let _ = replies.send(Outgoing::Close(code, reason)).await;
    }
    drop(replies); // the writer ends once it has sent what it was given
                   // The closing handshake: read (and drop) what the client still sends until its own
                   // close frame, so that closing the socket with unread data does not reset the connection
                   // before the client has read ours.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        writer_done.cancelled().await;
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    writer.abort();
    let _ = state.control.send(Command::Disconnect(id)).await;
    state.groups.release(&user);
    state.metrics.connections.dec();
}

/// The sending half of a connection.
struct Writer {
    sink: SplitSink<WebSocket, Message>,
    queue: Queue,
    replies: mpsc::Receiver<Outgoing>,
    kick: CancellationToken,
    answered_ping: Arc<AtomicBool>,
    state: Arc<AppState>,
}

impl Writer {
    async fn run(mut self, done: CancellationToken) {
        let interval = self.state.config.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        let close = loop {
            let sent = tokio::select! {
                biased;
                _ = self.kick.cancelled() => break Some((CLOSE_TOO_SLOW, "too slow; resume from your last cursor")),
                _ = self.state.shutdown.cancelled() => {
                    // Spread the clients' return over the window: not all at once to the next gateway.
                    let window = self.state.config.reconnect_window.as_millis().max(1) as u64;
                    let after_ms = (uuid::Uuid::new_v4().as_u128() % u128::from(window)) as u64;
                    let reconnect = ServerMessage::Reconnect { after_ms, reason: ReconnectReason::Shutdown };
                    self.send(Message::Text(reconnect.to_json().into())).await;
                    break Some((CLOSE_GOING_AWAY, "gateway shutting down"));
                }
                reply = self.replies.recv() => match reply {
                    Some(Outgoing::Text(text)) => self.send(Message::Text(text)).await,
                    Some(Outgoing::Close(code, reason)) => break Some((code, reason)),
                    None => break None,
                },
                queued = self.queue.next() => match queued {
                    Some((text, queued_at)) => {
                        let bytes = text.len();
                        let sent = self.send(Message::Text(text)).await;
                        if sent {
                            self.state.metrics.record_sent(bytes, queued_at.elapsed());
                        }
                        sent
                    }
                    None => break None,
                },
                _ = ping.tick() => {
                    if !self.answered_ping.swap(false, Ordering::SeqCst) {
                        tracing::debug!("no pong since the last ping; closing");
                        break None;
                    }
                    self.send(Message::Ping(Default::default())).await
                }
            };
            if !sent {
                // The client did not read within the send timeout: too slow.
                self.kick.cancel();
                break Some((CLOSE_TOO_SLOW, "too slow; resume from your last cursor"));
            }
        };
        if let Some((code, reason)) = close {
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let _ = self.send(Message::Close(Some(frame))).await;
        }
        done.cancel();
    }

    /// Sends within the send timeout; false when the client did not take it in time.
    async fn send(&mut self, message: Message) -> bool {
        let timeout = self.state.config.send_timeout;
        matches!(
            tokio::time::timeout(timeout, self.sink.send(message)).await,
            Ok(Ok(()))
        )
    }
}

struct Session {
    id: ConnId,
    state: Arc<AppState>,
    claims: Claims,
    user: Arc<UserContext>,
    group: GroupId,
    /// The entities this connection subscribed to (a superset of what the router holds),
    /// whose access is checked again when the token is refreshed.
    subscribed: HashSet<String>,
    replies: mpsc::Sender<Outgoing>,
    kick: CancellationToken,
    bad_in_a_row: u32,
}

impl Session {
    /// Handles one text message; Some when the connection must close.
    async fn handle(&mut self, text: &str) -> Option<(u16, &'static str)> {
        let message = match parse(text) {
            Ok(message) => message,
            Err(e) => {
                self.bad_in_a_row += 1;
                if self.bad_in_a_row > MAX_BAD_MESSAGES {
                    return Some((CLOSE_POLICY, "too many bad messages"));
                }
                self.reply(ServerMessage::error(
                    e.code(),
                    e.to_string(),
                    reference_of(text),
                ))
                .await;
                return None;
            }
        };
        self.bad_in_a_row = 0;
        match message {
            ClientMessage::Subscribe(request) => return self.subscribe(request).await,
            ClientMessage::Unsubscribe(u) => {
                if u.entity_ids.is_none() {
                    self.subscribed.remove(&u.entity_code);
                }
                self.command(Command::Unsubscribe {
                    conn: self.id,
                    entity_code: u.entity_code,
                    entity_ids: u.entity_ids,
                })
                .await;
            }
            ClientMessage::UnsubscribeAll => {
                self.subscribed.clear();
                self.command(Command::UnsubscribeAll(self.id)).await;
            }
            ClientMessage::Ping => self.reply(ServerMessage::Pong).await,
            ClientMessage::Await(a) => match Cursor::from_client(&a.cursor) {
                Ok(cursor) => {
                    self.command(Command::Await {
                        conn: self.id,
                        cursor,
                        reference: a.reference,
                    })
                    .await
                }
                Err(e) => {
                    let message = format!("cursor: {e}");
                    self.reply(ServerMessage::error(
                        ErrorCode::BadRequest,
                        message,
                        a.reference,
                    ))
                    .await
                }
            },
            ClientMessage::Auth(auth) => match self.state.verifier.verify(&auth.token) {
                Ok(claims) if claims.sub == self.claims.sub => match self.state.roles.user(&claims)
                {
                    Ok(user) => self.reauthenticate(claims, user).await,
                    Err(e) => {
                        self.reply(ServerMessage::error(
                            ErrorCode::Forbidden,
                            e.to_string(),
                            None,
                        ))
                        .await
                    }
                },
                Ok(_) => {
                    self.reply(ServerMessage::error(
                        ErrorCode::Unauthorized,
                        "a refreshed token must be for the same user",
                        None,
                    ))
                    .await
                }
                Err(e) => {
                    self.reply(ServerMessage::error(
                        ErrorCode::Unauthorized,
                        e.to_string(),
                        None,
                    ))
                    .await
                }
            },
        }
        None
    }

    async fn command(&self, command: Command) {
        let _ = self.state.control.send(command).await;
    }

    /// A refreshed token: its claims and role apply from now on, and the subscriptions it may
    /// no longer read end with ERROR `forbidden`. A check that could not be made (the
    /// gateway busy, the database failing) keeps the subscription: every change is judged
    /// for the new token's group anyway (`access::judge`), which refuses it there.
    async fn reauthenticate(&mut self, claims: Claims, user: UserContext) {
        let mut entities: Vec<String> = self.subscribed.iter().cloned().collect();
        entities.sort();
        for code in entities {
            match self.readable(&user, &code).await {
                Ok(_) | Err(Refusal::Failed(_)) | Err(Refusal::Busy(_)) => {}
                Err(refusal) => {
                    self.subscribed.remove(&code);
                    self.command(Command::Unsubscribe {
                        conn: self.id,
                        entity_code: code.clone(),
                        entity_ids: None,
                    })
                    .await;
                    let message = format!("the refreshed token may not read this: {refusal}");
                    self.reply(ServerMessage::forbidden(&code, message)).await;
                }
            }
        }
        let user = Arc::new(user);
        let old = std::mem::replace(&mut self.user, user.clone());
        let group = self.state.groups.join(&user);
        self.command(Command::Reauth {
            conn: self.id,
            user,
            group,
        })
        .await;
        self.state.groups.release(&old);
        self.group = group;
        self.claims = claims;
    }

    async fn readable(&self, user: &UserContext, code: &str) -> Result<Arc<Entity>, Refusal> {
        let state = &self.state;
        readable_entity(&state.catalog, &state.plans, &state.work, user, code).await
    }

    /// Handles a SUBSCRIBE; Some when the connection must close.
    async fn subscribe(&mut self, s: Subscribe) -> Option<(u16, &'static str)> {
        let entity = match self.readable(&self.user.clone(), &s.entity_code).await {
            Ok(entity) => entity,
            Err(refusal) => {
                let (code, message) = match refusal {
                    Refusal::Unknown(_) => (ErrorCode::UnknownEntity, refusal.to_string()),
                    Refusal::NoRole(_) | Refusal::NoAccess(_) => {
                        (ErrorCode::Forbidden, refusal.to_string())
                    }
                    Refusal::Busy(busy) => (ErrorCode::Internal, busy.to_string()),
                    Refusal::Failed(e) => {
                        tracing::warn!(error = %e, "subscription check failed");
                        (ErrorCode::Internal, "try again".to_owned())
                    }
                };
                self.reply(ServerMessage::error(code, message, s.reference))
                    .await;
                return None;
            }
        };
        if let Err(message) = check_columns(&entity, &s) {
            self.reply(ServerMessage::error(
                ErrorCode::BadRequest,
                message,
                s.reference,
            ))
            .await;
            return None;
        }
        let since = match s.since.as_deref().map(Cursor::from_client).transpose() {
            Ok(since) => since,
            Err(e) => {
                self.reply(ServerMessage::error(
                    ErrorCode::BadRequest,
                    format!("since: {e}"),
                    s.reference,
                ))
                .await;
                return None;
            }
        };
        if let Some(since) = &since {
            let patience = self.state.config.behind_patience;
            let message = match reach(&self.state, &self.user.sub, since, patience).await {
                Ok(Reach::Live) => None,
                Ok(Reach::Expired) => Some(ServerMessage::Resync {
                    entity_code: s.entity_code.clone(),
                    reason: ResyncReason::CursorExpired,
                }),
                Ok(Reach::Ahead) => Some(ServerMessage::error(
                    ErrorCode::BadRequest,
                    "since is a cursor the database has not reached",
                    s.reference.clone(),
                )),
                Ok(Reach::Behind) => {
                    // Here or at another gateway, later: the whole connection resumes from
                    // its cursors, so it goes rather than waiting on.
                    let reconnect = ServerMessage::Reconnect {
                        after_ms: BEHIND_RETRY.as_millis() as u64,
                        reason: ReconnectReason::Behind,
                    };
                    self.reply(reconnect).await;
                    return Some((CLOSE_GOING_AWAY, "behind the client's cursor; reconnect"));
                }
                Err(busy) => Some(ServerMessage::error(
                    ErrorCode::Internal,
                    busy.to_string(),
                    s.reference.clone(),
                )),
            };
            if let Some(message) = message {
                self.reply(message).await;
                return None;
            }
        }
        self.subscribed.insert(s.entity_code.clone());
        let target = match (s.entity_ids, s.filter) {
            (Some(ids), _) => Target::Ids(ids.into_iter().collect()),
            (None, filter) => Target::Rows(filter),
        };
        let request = SubscribeRequest {
            conn: self.id,
            subscription: Subscription {
                entity_code: s.entity_code,
                target,
                shape: Shape {
                    mode: s.mode,
                    // In one order, so that the same subscription in another order is the
                    // same (and replaces it) rather than one more.
                    columns: s.columns.map(|mut columns| {
                        columns.sort_unstable();
                        columns
                    }),
                },
            },
            since,
            reference: s.reference,
            tracking: entity.tracking,
        };
        self.command(Command::Subscribe(request)).await;
        None
    }

    /// Answers the client, after what was answered before. A client that sends without
    /// reading is slowed down here (its messages are not read while its answers wait), and
    /// one that takes no answer within the send timeout is too slow.
    async fn reply(&self, message: ServerMessage) {
        let answer = Outgoing::Text(message.to_json().into());
        let timeout = self.state.config.send_timeout;
        if !matches!(
            tokio::time::timeout(timeout, self.replies.send(answer)).await,
            Ok(Ok(()))
        ) {
            self.kick.cancel();
        }
    }
}

/// The columns a SUBSCRIBE names (filter, `columns`) must be published.
fn check_columns(entity: &Entity, s: &Subscribe) -> Result<(), String> {
    let named = s
        .filter
        .iter()
        .flatten()
        .map(|c| &c.column)
        .chain(s.columns.iter().flatten());
    for column in named {
        if !entity.columns.contains(column) {
            return Err(format!(
                "{column} is not a published column of {}",
                entity.code
            ));
        }
    }
    Ok(())
}
