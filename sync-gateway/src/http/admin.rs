//! The operators' endpoints (`--admin-listen`): `/metrics` and `/v1/status`.

use crate::AppState;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// `sync.status()` of the database, or null when it cannot be read.
async fn database_status(state: &AppState) -> Value {
    match state.work.primary().get().await {
        Ok(client) => match client.query_one("SELECT sync.status()", &[]).await {
            Ok(row) => row.get(0),
            Err(_) => Value::Null,
        },
        Err(_) => Value::Null,
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let status = database_status(&state).await;
    let retained = status["wal_slot"]["retained_bytes"].as_i64().unwrap_or(0);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(retained),
    )
        .into_response()
}

pub async fn status(State(state): State<Arc<AppState>>) -> Json<Value> {
    let m = &state.metrics;
    Json(json!({
        "gatewayId": state.gateway_id,
        "ready": state.ready.load(Ordering::SeqCst),
        "connections": m.connections.get(),
        "subscriptions": m.subscriptions.get(),
        "position": *state.position.borrow(),
        "database": database_status(&state).await,
    }))
}
