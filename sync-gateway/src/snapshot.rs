//! `GET /v1/snapshot/{entityCode}[?ids=a,b]`: the rows a user may see, streamed as NDJSON
//! from one REPEATABLE READ transaction run as the user. The first line is
//! `{"cursor":…}` from that same transaction, so subscribing with `since` = that cursor
//! continues exactly where the snapshot ends. Rows travel through a small bounded channel
//! as PostgreSQL sends them: memory stays flat for any table size.
//!
//! A WAL-captured entity's changes reach the log after their commit, when ingested: a
//! snapshot taken in between would show a row whose log row lies after its cursor (sent
//! again after it). Such a snapshot is retried, ingesting in between, until
//! `sync._wal_settled` says the log has caught up with it. Under writes to the entity so
//! steady that this never happens within `SETTLE_PATIENCE`, the last try is served: changes
//! committed just before it may then arrive again after it, in order, so a cache that
//! applies them passes through older versions of those rows and converges.

use crate::access::{act_as, UserContext};
use crate::catalog::Entity;
use crate::http::ApiError;
use crate::AppState;
use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{pin_mut, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::IsolationLevel;

/// Ids one snapshot may name.
const MAX_IDS: usize = 1000;
/// Lines buffered between the database and the client.
const BUFFERED_LINES: usize = 256;
/// How long a snapshot of a WAL-captured entity tries to find ingestion caught up.
const SETTLE_PATIENCE: Duration = Duration::from_secs(2);
/// Between two tries when another session is ingesting.
const SETTLE_RETRY: Duration = Duration::from_millis(10);

pub async fn stream(
    state: Arc<AppState>,
    entity: Arc<Entity>,
    user: UserContext,
    ids: Option<Vec<String>>,
) -> Result<Response, ApiError> {
    if ids
        .as_ref()
        .is_some_and(|ids| ids.is_empty() || ids.len() > MAX_IDS)
    {
        return Err(ApiError::bad_request(format!(
            "ids lists 1 to {MAX_IDS} ids"
        )));
    }
    let client = state.pool.get().await.map_err(ApiError::internal)?;
    let (lines, body) = mpsc::channel::<Result<String, std::io::Error>>(BUFFERED_LINES);
    let (started, start) = oneshot::channel::<Result<(), ApiError>>();
    tokio::spawn(async move {
        let mut client = client;
        let mut started = Some(started);
        let outcome = async {
            let deadline = Instant::now() + SETTLE_PATIENCE;
            let (tx, cursor) = loop {
                let tx = client
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await?;
                // The cursor first, as the gateway: it fixes the transaction's snapshot, and
                // the user need not read the log itself.
                let row = tx
                    .query_one(
                        "SELECT sync.current_cursor(), sync._wal_settled($1)",
                        &[&entity.code],
                    )
                    .await?;
                if row.get::<_, bool>(1) {
                    break (tx, row.get::<_, String>(0));
                }
                if Instant::now() >= deadline {
                    tracing::warn!(entity = %entity.code, "snapshot served before WAL ingestion caught up");
                    break (tx, row.get::<_, String>(0));
                }
                tx.rollback().await?;
                let ingested: i64 = client.query_one("SELECT sync.ingest_wal()", &[]).await?.get(0);
                if ingested == 0 {
                    tokio::time::sleep(SETTLE_RETRY).await; // another session is ingesting
                }
            };
            act_as(&tx, &user).await?;
            let filter = if ids.is_some() {
                format!(" WHERE {}", entity.key_in_sql(2))
            } else {
                String::new()
            };
            let sql = format!(
                "SELECT to_jsonb(t.*) - $1::text[] FROM {} t{filter}",
                entity.table
            );
            let ids = ids.unwrap_or_default();
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = if ids.is_empty() {
                vec![&entity.hidden]
            } else {
                vec![&entity.hidden, &ids]
            };
            let rows = tx.query_raw(&sql, params).await?;
            pin_mut!(rows);
            let first = rows.next().await.transpose()?;
            // The query runs: from here on the answer is 200 and the rows follow.
            if let Some(started) = started.take() {
                let _ = started.send(Ok(()));
            }
            let _ = lines
                .send(Ok(format!("{}\n", json!({"cursor": cursor}))))
                .await;
            let mut next = first;
            while let Some(row) = next {
                let line = format!("{}\n", row.get::<_, Value>(0));
                if lines.send(Ok(line)).await.is_err() {
                    return Ok(()); // the client left
                }
                next = rows.next().await.transpose()?;
            }
            tx.commit().await
        }
        .await;
        if let Err(e) = outcome {
            match started.take() {
                Some(started) => {
                    let _ = started.send(Err(ApiError::from_db(e)));
                }
                None => {
                    tracing::warn!(error = %crate::ErrorChain(&e), "snapshot failed while streaming");
                    let _ = lines
                        .send(Err(std::io::Error::other("snapshot failed")))
                        .await;
                }
            }
        }
    });
    start
        .await
        .map_err(|_| ApiError::internal("snapshot task ended"))??;
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}
