//! The HTTP side: the WebSocket endpoint `/ws/sync` (tokens checked before the upgrade, so a
//! rejection is a plain 401) and the health endpoints.

use crate::session;
use crate::AppState;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Frames larger than this end the connection (1009); messages between 64 KiB and this
/// size are answered with `message_too_large`.
const MAX_FRAME_BYTES: usize = 1 << 20;

/// The WebSocket's read and write buffers. The library's default, 128 KiB each way and
/// allocated up front, made an idle connection cost 138 KiB; buffers still grow for large
/// messages.
const SOCKET_BUFFER_BYTES: usize = 4096;

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws/sync", get(websocket))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state)
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
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(token) = bearer.or(params.token) else {
        return unauthorized("a token is required: Authorization: Bearer or ?token=");
    };
    let claims = match state.verifier.verify(&token) {
        Ok(claims) => claims,
        Err(e) => return unauthorized(&e.to_string()),
    };
    // Before the first read of the log there is no live position to subscribe from.
    if state.shutdown.is_cancelled() || !state.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response();
    }
    let client_id = params.client_id.or_else(|| claims.client_id.clone());
    let tracker = state.tracker.clone();
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(SOCKET_BUFFER_BYTES)
        .write_buffer_size(SOCKET_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            tracker.track_future(session::run(socket, state, claims, client_id))
        })
}

fn unauthorized(message: &str) -> Response {
    let body = Json(serde_json::json!({"error": "unauthorized", "message": message}));
    (StatusCode::UNAUTHORIZED, body).into_response()
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
