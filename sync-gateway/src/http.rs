//! The HTTP side: the WebSocket endpoint `/ws/sync` (tokens checked before the upgrade, so a
//! rejection is a plain 401), the endpoints for clients without sockets (`/v1/snapshot`,
//! `/v1/changes`, `/v1/write`), health, `/metrics` and `/v1/status`. Errors answer
//! `{"error": code, "message": …}`; a 500 says nothing about its cause (that goes to the log).

use crate::access::{readable_entity, Refusal, UserContext};
use crate::auth::Claims;
use crate::changes::Params as ChangesParams;
use crate::write::WriteRequest;
use crate::{changes, session, snapshot, write, AppState};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_postgres::error::SqlState;
use tower_http::compression::CompressionLayer;

/// Frames larger than this end the connection (1009); messages between 64 KiB and this
/// size are answered with `message_too_large`.
const MAX_FRAME_BYTES: usize = 1 << 20;

/// The WebSocket's read and write buffers. The library's default, 128 KiB each way and
/// allocated up front, made an idle connection cost 138 KiB; buffers still grow for large
/// messages.
const SOCKET_BUFFER_BYTES: usize = 4096;

/// Bodies of `POST /v1/write`.
const MAX_WRITE_BYTES: usize = 1 << 20;

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws/sync", get(websocket))
        .route(
            "/v1/snapshot/{entity_code}",
            get(snapshot_handler).layer(CompressionLayer::new()),
        )
        .route("/v1/changes", get(changes_handler))
        .route(
            "/v1/write",
            post(write_handler).layer(DefaultBodyLimit::max(MAX_WRITE_BYTES)),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

/// The operators' endpoints, on their own listener (`--admin-listen`): they name tables,
/// columns, the slot and a live cursor, which clients have no business knowing.
pub fn admin_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .with_state(state)
}

/// An HTTP error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: json!({"error": error, "message": message.into()}),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn unknown_entity(code: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unknown_entity",
            format!("{code} is not a tracked entity"),
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn gone_expired() -> Self {
        Self::new(
            StatusCode::GONE,
            "cursor_expired",
            "refetch a snapshot and continue from its cursor",
        )
    }

    /// A failed `expect`: the current row, as the user sees it.
    pub fn conflict(current: Value) -> Self {
        let mut e = Self::new(
            StatusCode::CONFLICT,
            "conflict",
            "the row is not as expected",
        );
        e.body["current"] = current;
        e
    }

    /// An unexpected failure: logged, and answered without its details.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    /// A database error as the client should see it: refusals by privileges or RLS are
    /// 403, bad values 400, a duplicate key 409, anything else 500.
    pub fn from_db(error: tokio_postgres::Error) -> Self {
        let Some(db) = error.as_db_error() else {
            return Self::internal(crate::ErrorChain(&error));
        };
        let code = db.code();
        let class = &code.code()[..2];
        if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            Self::forbidden(db.message())
        } else if *code == SqlState::UNIQUE_VIOLATION {
            Self::new(StatusCode::CONFLICT, "conflict", db.message())
        } else if class == "22" || class == "23" {
            Self::bad_request(db.message())
        } else {
            Self::internal(crate::ErrorChain(&error))
        }
    }

    /// Names the mutation the error is about.
    pub fn with_mutation(mut self, id: &str) -> Self {
        self.body["mutation"] = json!(id);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// The token of a request (`Authorization: Bearer`, else `?token=`) and whom its holder acts
/// as. A role the gateway may not act as is refused like a bad token: 401, `forbidden`.
fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<(Claims, UserContext), ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = bearer.or(query_token).ok_or_else(|| {
        ApiError::unauthorized("a token is required: Authorization: Bearer or ?token=")
    })?;
    let claims = state
        .verifier
        .verify(token)
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    let user = state
        .roles
        .user(&claims)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "forbidden", e.to_string()))?;
    Ok((claims, user))
}

/// A user that acts as a role: every endpoint that reads or writes a table needs one.
fn with_role(user: UserContext) -> Result<UserContext, ApiError> {
    match user.role {
        Some(_) => Ok(user),
        None => Err(ApiError::forbidden(
            "the token names no role and the gateway has no default role",
        )),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WsParams {
    token: Option<String>,
    client_id: Option<String>,
}

async fn websocket(
    State(state): State<Arc<AppState>>,
    Query(params): Query<WsParams>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let (claims, user) = match authenticate(&state, &headers, params.token.as_deref()) {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    // Before the first read of the log there is no live position to subscribe from.
    if state.shutdown.is_cancelled() || !state.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response();
    }
    let client_id = params.client_id.or_else(|| claims.client_id.clone());
    if let Err(e) = check_client_id(client_id.as_deref()) {
        return e.into_response();
    }
    let tracker = state.tracker.clone();
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(SOCKET_BUFFER_BYTES)
        .write_buffer_size(SOCKET_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            tracker.track_future(session::run(socket, state, claims, user, client_id))
        })
}

#[derive(Deserialize)]
struct SnapshotParams {
    ids: Option<String>,
    token: Option<String>,
}

async fn snapshot_handler(
    State(state): State<Arc<AppState>>,
    Path(entity_code): Path<String>,
    Query(params): Query<SnapshotParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (_, user) = authenticate(&state, &headers, params.token.as_deref())?;
    let entity = readable_entity(&state.catalog, &state.pool, &user, &entity_code)
        .await
        .map_err(|refusal| match refusal {
            Refusal::Unknown(code) => ApiError::unknown_entity(&code),
            Refusal::NoRole(_) | Refusal::NoPrivilege(_) => {
                ApiError::forbidden(refusal.to_string())
            }
            Refusal::Failed(e) => ApiError::internal(e),
        })?;
    let ids = params
        .ids
        .map(|ids| ids.split(',').map(str::to_owned).collect());
    snapshot::stream(state, entity, user, ids).await
}

async fn changes_handler(
    State(state): State<Arc<AppState>>,
    Query(params): Query<ChangesParams>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (_, user) = authenticate(&state, &headers, params.token.as_deref())?;
    check_client_id(params.client_id.as_deref())?;
    Ok(Json(
        changes::changes(state, with_role(user)?, params).await?,
    ))
}

async fn write_handler(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let (_, user) = authenticate(&state, &headers, None)?;
    let request: WriteRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    check_client_id(request.client_id.as_deref())?;
    Ok(Json(write::write(state, with_role(user)?, request).await?))
}

/// A client id (an origin tag, SPEC 2.3) must not hold `:`, which separates the user from the
/// client id in the tags `/v1/write` records (`<sub>:<clientId>`): with it, one user's tag
/// could spell another user's.
fn check_client_id(client_id: Option<&str>) -> Result<(), ApiError> {
    match client_id {
        Some(id) if id.is_empty() || id.len() > 128 || id.contains(':') => Err(
            ApiError::bad_request("clientId must have 1 to 128 characters and no ':'"),
        ),
        _ => Ok(()),
    }
}

/// Ready when the database answers and the first read of the log is done.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let database = match state.pool.get().await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    };
    if database && state.ready.load(Ordering::SeqCst) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// `sync.status()` of the database, or null when it cannot be read.
async fn database_status(state: &AppState) -> Value {
    match state.pool.get().await {
        Ok(client) => match client.query_one("SELECT sync.status()", &[]).await {
            Ok(row) => row.get(0),
            Err(_) => Value::Null,
        },
        Err(_) => Value::Null,
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let status = database_status(&state).await;
    let retained = status["wal_slot"]["retained_bytes"].as_i64().unwrap_or(0);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(retained),
    )
        .into_response()
}

async fn status(State(state): State<Arc<AppState>>) -> Json<Value> {
    let m = &state.metrics;
    Json(json!({
        "gatewayId": state.gateway_id,
        "ready": state.ready.load(Ordering::SeqCst),
        "connections": m.connections.load(Ordering::Relaxed),
        "subscriptions": m.subscriptions.load(Ordering::Relaxed),
        "position": *state.position.borrow(),
        "database": database_status(&state).await,
    }))
}
