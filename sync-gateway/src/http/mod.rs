//! The HTTP side, beside the pipeline: the WebSocket endpoint `/ws/sync` (tokens and caps
//! checked before the upgrade, so a refusal is a plain HTTP answer), the endpoints for clients
//! without sockets (`snapshot`, `changes`, `write`), health, the demo's static files, and on a
//! listener of its own the operators' `admin` endpoints.

pub mod admin;
pub mod changes;
pub mod error;
pub mod extract;
pub mod links;
pub mod pages;
mod row_lines;
pub mod shared_snapshots;
pub mod snapshot;
pub mod write;

use crate::deliver::connection;
use crate::AppState;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use extract::{check_client_id, Authenticated};
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::services::ServeDir;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// Frames larger than this end the connection (1009); messages between 64 KiB and this
/// size are answered with `message_too_large`.
const MAX_FRAME_BYTES: usize = 1 << 20;

/// The WebSocket's read buffer, allocated up front for every connection, and how much the
/// write buffer gathers before writing. The library's default, 128 KiB each way, made an
/// idle connection cost 138 KiB. Clients send short messages (writes go over HTTP): 1 KiB
/// reads them whole, and the buffer grows for a larger one.
const READ_BUFFER_BYTES: usize = 1024;
const WRITE_BUFFER_BYTES: usize = 4096;

/// Bodies of `POST /v1/write`.
const MAX_WRITE_BYTES: usize = 1 << 20;

/// Requests that answer at once (writes) end after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub fn app(state: Arc<AppState>) -> Router {
    let snapshots = Router::new()
        .route("/v1/snapshot/{entity_code}", get(snapshot::snapshot))
        .layer(CompressionLayer::new());
    let changes = Router::new()
        .route("/v1/changes", get(changes::changes))
        .route("/v1/changes/audience", get(changes::check_audience))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            changes::MAX_WAIT + REQUEST_TIMEOUT,
        ));
    let writes = Router::new()
        .route("/v1/write", post(write::write))
        .layer(DefaultBodyLimit::max(MAX_WRITE_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ));
    let api = snapshots.merge(changes).merge(writes);
    let api = match cors(&state.config.cors_origins) {
        Some(cors) => api.layer(cors),
        None => api,
    };
    let app = Router::new()
        .route("/ws/sync", get(websocket))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .merge(api);
    let app = match &state.config.static_dir {
        Some(dir) => app.fallback_service(ServeDir::new(dir)),
        None => app,
    };
    app.layer(TraceLayer::new_for_http()).with_state(state)
}

/// Browsers may call `/v1/*` from these origins (SPEC 2.1 `--cors-origins`).
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([header::RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    )
}

/// The operators' endpoints, on their own listener (`--admin-listen`): they name tables,
/// columns, the slot and a live cursor, which clients have no business knowing.
pub fn admin_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(admin::metrics))
        .route("/v1/status", get(admin::status))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WsParams {
    client_id: Option<String>,
}

async fn websocket(
    State(state): State<Arc<AppState>>,
    auth: Authenticated,
    Query(params): Query<WsParams>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Before the first read of the log there is no live position to subscribe from. Told
    // when to come back, 1 to 3 s at random so that they do not all come back at once: in a
    // restart's storm, clients reach a gateway before it is ready.
    if state.shutdown.is_cancelled() || !state.ready.load(Ordering::SeqCst) {
        let seconds = 1 + uuid::Uuid::new_v4().as_u128() % 3;
        let retry = [(axum::http::header::RETRY_AFTER, seconds.to_string())];
        return (StatusCode::SERVICE_UNAVAILABLE, retry, "not ready").into_response();
    }
    let client_id = params.client_id.or_else(|| auth.claims.client_id.clone());
    if let Err(e) = check_client_id(client_id.as_deref()) {
        return e.into_response();
    }
    let place = match state.caps.connections.take(&auth.user.sub) {
        Ok(place) => place,
        Err(busy) => return ApiError::busy(busy).into_response(),
    };
    // Charged last, per user before in total: a request refused anyway spends nothing.
    if let Err(wait) = state.caps.admissions.admit(&auth.user.sub) {
        return ApiError::unavailable("too many new connections; retry later", wait)
            .into_response();
    }
    let tracker = state.tracker.clone();
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            tracker.track_future(connection::run(
                socket,
                state,
                auth.claims,
                auth.user,
                client_id,
                place,
            ))
        })
}

/// Ready when the log's reader reads: its first read is done and its last did not fail (it
/// reads at least every poll interval). No database connection is taken here: this endpoint
/// answers anyone, and a flood of it must not starve clients' work.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}
