//! One WebSocket connection: reads the client's messages, checks them against the catalog
//! and hands subscriptions to the router; writes what the router queues for it; pings, and
//! closes the connection when the token expires (4001), the client stops answering, the
//! client is too slow (4008), it keeps sending bad messages (1008) or the gateway stops
//! (1001). Its subscriptions go with it.

use crate::access::{readable_entity, Refusal, UserContext};
use crate::auth::Claims;
use crate::catalog::Entity;
use crate::outbound::{self, Outbound, Refused};
use crate::protocol::{parse, reference_of, ClientMessage, ErrorCode, ServerMessage, Subscribe};
use crate::router::{Command, ConnId, Connection, SubscribeRequest, Target};
use crate::AppState;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// Bad messages in a row after which a connection is closed with 1008.
const MAX_BAD_MESSAGES: u32 = 20;

/// How long a closing connection waits for the client's close frame.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;
pub const CLOSE_TOO_SLOW: u16 = 4008;

pub async fn run(
    socket: WebSocket,
    state: Arc<AppState>,
    claims: Claims,
    user: UserContext,
    client_id: Option<String>,
) {
    let id: ConnId = state.next_connection.fetch_add(1, Ordering::SeqCst);
    let (outbound, mut queue) = outbound::channel(state.send_queue_bytes);
    let kick = CancellationToken::new();
    let connection = Connection {
        id,
        user: user.clone(),
        client_id,
        outbound: outbound.clone(),
        kick: kick.clone(),
    };
    if state
        .router
        .send(Command::Connect(connection))
        .await
        .is_err()
    {
        return;
    }
    state.metrics.connections.fetch_add(1, Ordering::Relaxed);
    let mut session = Session {
        id,
        state: state.clone(),
        claims,
        user,
        subscribed: HashSet::new(),
        outbound,
        kick: kick.clone(),
        bad_in_a_row: 0,
    };
    let (mut sink, mut stream) = socket.split();
    let mut ping =
        tokio::time::interval_at(Instant::now() + state.ping_interval, state.ping_interval);
    let mut answered_ping = true;
    let close = loop {
        let expiry = Instant::now() + session.claims.remaining();
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if let Some(close) = session.handle(&text).await {
                        break Some(close);
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    session.reply(ServerMessage::error(ErrorCode::BadRequest, "messages are JSON text", None)).await;
                }
                Some(Ok(Message::Pong(_))) => answered_ping = true,
                Some(Ok(Message::Ping(_))) => {} // axum answers pings
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break None,
            },
            Some(text) = queue.next() => {
                state.metrics.record_sent(text.len());
                if sink.send(Message::Text(text)).await.is_err() {
                    break None;
                }
            }
            _ = ping.tick() => {
                if !answered_ping {
                    tracing::debug!(id, "no pong since the last ping; closing");
                    break None;
                }
                answered_ping = false;
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
            _ = sleep_until(expiry) => {
                let message = ServerMessage::error(ErrorCode::TokenExpired, "the token expired; reconnect with a new one", None);
                let _ = sink.send(Message::Text(message.to_json().into())).await;
                break Some((CLOSE_TOKEN_EXPIRED, "token expired"));
            }
            _ = kick.cancelled() => break Some((CLOSE_TOO_SLOW, "too slow; resume from your last cursor")),
            _ = state.shutdown.cancelled() => break Some((CLOSE_GOING_AWAY, "gateway shutting down")),
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = sink.send(Message::Close(Some(frame))).await;
        // The closing handshake: read (and drop) what the client still sends until its own
        // close frame, so that closing the socket with unread data does not reset the
        // connection before the client has read ours.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    let _ = state.router.send(Command::Disconnect(id)).await;
    state.metrics.connections.fetch_sub(1, Ordering::Relaxed);
}

struct Session {
    id: ConnId,
    state: Arc<AppState>,
    claims: Claims,
    user: UserContext,
    /// The entities this connection subscribed to (a superset: what the router holds), whose
    /// access is checked again when the token is refreshed.
    subscribed: HashSet<String>,
    outbound: Outbound,
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
            ClientMessage::Subscribe(request) => self.subscribe(request).await,
            ClientMessage::Unsubscribe(u) => {
                if u.entity_ids.is_none() {
                    self.subscribed.remove(&u.entity_code);
                }
                let command = Command::Unsubscribe {
                    conn: self.id,
                    entity_code: u.entity_code,
                    entity_ids: u.entity_ids,
                };
                let _ = self.state.router.send(command).await;
            }
            ClientMessage::UnsubscribeAll => {
                self.subscribed.clear();
                let _ = self
                    .state
                    .router
                    .send(Command::UnsubscribeAll(self.id))
                    .await;
            }
            ClientMessage::Ping => self.reply(ServerMessage::Pong).await,
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
                    let message = "a refreshed token must be for the same user";
                    self.reply(ServerMessage::error(ErrorCode::Unauthorized, message, None))
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

    /// A refreshed token: its claims and role apply from now on, and the subscriptions it may
    /// no longer read end with ERROR `forbidden`.
    async fn reauthenticate(&mut self, claims: Claims, user: UserContext) {
        let state = self.state.clone();
        let mut entities: Vec<String> = self.subscribed.iter().cloned().collect();
        entities.sort();
        for code in entities {
            match readable_entity(&state.catalog, &state.pool, &user, &code).await {
                Ok(_) | Err(Refusal::Failed(_)) => {}
                Err(refusal) => {
                    self.subscribed.remove(&code);
                    let command = Command::Unsubscribe {
                        conn: self.id,
                        entity_code: code,
                        entity_ids: None,
                    };
                    let _ = state.router.send(command).await;
                    let message = format!("the refreshed token may not read this: {refusal}");
                    self.reply(ServerMessage::error(ErrorCode::Forbidden, message, None))
                        .await;
                }
            }
        }
        let command = Command::Reauth {
            conn: self.id,
            user: user.clone(),
        };
        let _ = state.router.send(command).await;
        self.claims = claims;
        self.user = user;
    }

    async fn subscribe(&mut self, s: Subscribe) {
        if let Err((code, message)) = self.admit(&s).await {
            return self
                .reply(ServerMessage::error(code, message, s.reference))
                .await;
        }
        self.subscribed.insert(s.entity_code.clone());
        let target = match (s.entity_ids, s.filter) {
            (Some(ids), _) => Target::Ids(ids.into_iter().collect()),
            (None, filter) => Target::Rows(filter),
        };
        let request = SubscribeRequest {
            conn: self.id,
            entity_code: s.entity_code,
            target,
            mode: s.mode,
            columns: s.columns,
            since: s.since,
            reference: s.reference,
        };
        let _ = self.state.router.send(Command::Subscribe(request)).await;
    }

    /// Whether this user may have subscription `s`, else the error to answer.
    async fn admit(&self, s: &Subscribe) -> Result<(), (ErrorCode, String)> {
        let state = &self.state;
        let entity = readable_entity(&state.catalog, &state.pool, &self.user, &s.entity_code)
            .await
            .map_err(|refusal| match refusal {
                Refusal::Unknown(_) => (ErrorCode::UnknownEntity, refusal.to_string()),
                Refusal::NoRole(_) | Refusal::NoPrivilege(_) => {
                    (ErrorCode::Forbidden, refusal.to_string())
                }
                Refusal::Failed(e) => {
                    tracing::warn!(error = %e, "subscription check failed");
                    (ErrorCode::Internal, "try again".to_owned())
                }
            })?;
        check_columns(&entity, s).map_err(|message| (ErrorCode::BadRequest, message))
    }

    async fn reply(&self, message: ServerMessage) {
        // Never wait here: this task is also the one that empties the queue.
        if self.outbound.try_push(message.to_json().into()) == Err(Refused::Full) {
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
