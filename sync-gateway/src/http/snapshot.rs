//! `GET /v1/snapshot/{entityCode}[?ids=a,b]`: the rows a user may see, streamed as NDJSON
//! from one REPEATABLE READ transaction run as the user. The first line is
//! `{"cursor":…,"sig":…}` from that same transaction, so subscribing with `since` = that
//! cursor continues exactly where the snapshot ends (and `/v1/changes` with `sig` too, its
//! first page then kept by a cache in front: `http::links`). A whole table is read with a binary `COPY (SELECT …) TO STDOUT`
//! and each row written as JSON here (`row_lines`); rows travel in chunks through a small
//! bounded channel as PostgreSQL sends them: memory stays flat for any table size. With
//! `--snapshot-share-for`, a whole entity's snapshot is kept once read and served from memory
//! to the others of its audience for that long (`http::shared_snapshots`).
//!
//! A snapshot holds a client connection and an open transaction (which holds back VACUUM),
//! so it is capped in total and per user, and never kept open for a client that does not
//! read: each chunk must be taken within `--snapshot-idle-timeout`, and the whole snapshot
//! ends by `--snapshot-max-duration`; either ends the body with an error.
//!
//! On a hot standby (`--read-url`) the snapshot is read there; replay may cancel it (a
//! conflict with recovery): before its first row it is tried again, after it the body ends
//! with an error as any snapshot cut short. A WAL-captured entity's snapshot is read on the
//! primary: a standby cannot see how far WAL ingestion got (below).
//!
//! A WAL-captured entity's changes reach the log after their commit, when ingested: a
//! snapshot taken in between would show a row whose log row lies after its cursor (sent
//! again after it). Such a snapshot is retried, ingesting in between, until
//! `sync._wal_settled` says the log has caught up with it. Under writes to the entity so
//! steady that this never happens within `SETTLE_PATIENCE`, the last try is served: changes
//! committed just before it may then arrive again after it, in order, so a cache that
//! applies them passes through older versions of those rows and converges.

use super::error::ApiError;
use super::extract::Authenticated;
use super::row_lines::{Cells, RowLines};
use super::shared_snapshots::{SnapshotCopy, SnapshotKey};
use crate::access::admission::{readable, readable_entity};
use crate::access::roles::UserContext;
use crate::access::roles::{act_as, lock_as, LockMode};
use crate::access::sharing;
use crate::feed::catalog::{entity_changed, Entity};
use crate::AppState;
use crate::RuntimeConfig;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use deadpool_postgres::Object;
use futures_util::{pin_mut, StreamExt};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::binary_copy::BinaryCopyOutStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::IsolationLevel;

/// Ids one snapshot may name.
const MAX_IDS: usize = 1000;
/// Chunks of rows buffered between the database and the client, and their size.
const BUFFERED_CHUNKS: usize = 16;
const CHUNK_BYTES: usize = 32 * 1024;
/// How long a snapshot of a WAL-captured entity tries to find ingestion caught up.
const SETTLE_PATIENCE: Duration = Duration::from_secs(2);
/// Between two tries when another session is ingesting.
const SETTLE_RETRY: Duration = Duration::from_millis(10);
/// Reads of the catalog a snapshot makes when the table changed under it (an ALTER, a
/// re-track): each time, it starts again from the entity read anew.
const CHANGED_RETRIES: usize = 3;
/// Tries of a snapshot that replay on a standby cancelled before its first row.
const CONFLICT_RETRIES: usize = 3;

/// The ids of `?ids=a,b`: split on the literal commas of the raw query, then decoded, so
/// that an id holding a comma (a composite key's `["a","b"]`, or text) is sent with it
/// percent-encoded, as `encodeURIComponent` does. None without the parameter; `?ids=` lists
/// no id (refused), not one empty id.
fn ids_param(raw_query: Option<&str>) -> Option<Vec<String>> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    let value = raw_query?
        .split('&')
        .find_map(|pair| pair.split_once('=').filter(|(k, _)| decode(k) == "ids"))?
        .1;
    if value.is_empty() {
        return Some(Vec::new());
    }
    Some(value.split(',').map(decode).collect())
}

#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
    #[error("the client did not read for {0:?}")]
    Idle(Duration),
    #[error("the snapshot took longer than {0:?}")]
    TooLong(Duration),
    #[error("the client left")]
    Left,
    #[error("{0:?}")]
    Refused(ApiError),
    /// A standby cannot tell whether the WAL changes its snapshot sees are in the log yet
    /// (`sync._wal_settled`): the snapshot is read on the primary.
    #[error("a WAL-captured entity's snapshot is read on the primary")]
    NeedsPrimary,
}

/// Whether replay on a standby cancelled the query (SQLSTATE 40001, "conflict with recovery").
fn replay_conflict(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE)
}

pub async fn snapshot(
    State(state): State<Arc<AppState>>,
    auth: Authenticated,
    Path(entity_code): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = auth.with_role()?;
    let readable = readable(
        &state.catalog,
        &state.plans,
        &state.work,
        &user,
        &entity_code,
    )
    .await?;
    let mut entity = readable.entity.clone();
    let ids = ids_param(query.as_deref());
    if ids
        .as_ref()
        .is_some_and(|ids| ids.is_empty() || ids.len() > MAX_IDS)
    {
        return Err(ApiError::bad_request(format!(
            "ids lists 1 to {MAX_IDS} ids"
        )));
    }
    // A whole entity's snapshot is its audience's (`http::shared_snapshots`): served from
    // memory when one was read lately, else copied as it is read.
    let audience = ids
        .is_none()
        .then(|| sharing::audience(&entity, &readable.plan, &user))
        .flatten();
    let copy = match audience {
        Some(audience) => {
            let key = SnapshotKey {
                entity: entity.code.clone(),
                audience,
                epoch: readable.epoch,
            };
            if let Some(kept) = state.snapshots.get(&key).await {
                // Under caps of their own (no database connection is held), and the same
                // timeouts: a client that does not read holds its place no longer.
                let place = state.caps.shared_snapshots.take(&user.sub)?;
                let gzip = accepts_gzip(&headers);
                let bytes = if gzip { &kept.gzip } else { &kept.plain }.clone();
                let (outlet, body) = Outlet::new(&state.config);
                tokio::spawn(async move {
                    let _place = place;
                    for at in (0..bytes.len()).step_by(CHUNK_BYTES) {
                        let chunk = bytes.slice(at..(at + CHUNK_BYTES).min(bytes.len()));
                        if outlet.send(chunk).await.is_err() {
                            return;
                        }
                    }
                    outlet.finish();
                });
                // Compressed once when kept: the compression layer leaves an answer that
                // names its encoding alone.
                let mut answer = ndjson(body);
                let answer_headers = answer.headers_mut();
                answer_headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
                if gzip {
                    answer_headers
                        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                return Ok(answer);
            }
            state.snapshots.copy(key)
        }
        None => None,
    };
    let place = state.caps.snapshots.take(&user.sub)?;
    let work = state.work.as_user(&user.sub).await?;
    let (outlet, body) = Outlet::new(&state.config);
    let (started, start) = oneshot::channel::<Result<(), ApiError>>();
    let state = state.clone();
    state.metrics.snapshots_read.inc();
    tokio::spawn(async move {
        let _place = place;
        let first = entity.clone();
        // Whether the snapshot is the same for everyone of its audience, as far as can be
        // told: not when the log may lack changes it sees (a WAL-captured entity's, below),
        // when it was read elsewhere than the catalog (a WAL-captured entity's on the
        // primary), or when a column's JSON is written by a user's cast (`RowLines`).
        let mut shareable = true;
        let mut work = work;
        let cancel = work.cancel_token();
        let mut started = Some(started);
        let send = |chunk: Vec<u8>| {
            if let Some(copy) = &copy {
                copy.append(&chunk);
            }
            outlet.send(chunk.into())
        };
        let mut conflicts_left = CONFLICT_RETRIES;
        let outcome = loop {
            let outcome: Result<(), Ended> = async {
            let client: &mut Object = &mut work;
            let settle_by = Instant::now() + SETTLE_PATIENCE;
            let mut changes_left = CHANGED_RETRIES;
            let (tx, cursor) = loop {
                let tx = client
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await?;
                lock_as(&tx, &user, &entity, LockMode::Read).await?;
                // The cursor first, before acting as the user: it fixes the transaction's
                // snapshot (after the lock: the table cannot change before the rows are read),
                // and the user need not read the log itself.
                let sql = format!(
                    "SELECT sync.current_cursor(), sync._wal_settled($1), {}",
                    Entity::check_sql(2)
                );
                let [table, tracking, version] = entity.identity();
                let row = match tx.query_one(&sql, &[&entity.code, table, tracking, version]).await {
                    Err(e) if e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) => {
                        return Err(Ended::NeedsPrimary)
                    }
                    Err(e) if entity_changed(&e) && changes_left > 0 => {
                        changes_left -= 1;
                        tx.rollback().await?;
                        entity = renewed(&state, &user, &entity.code).await?;
                        continue;
                    }
                    row => row?,
                };
                if row.get::<_, bool>(1) || Instant::now() >= settle_by {
                    if !row.get::<_, bool>(1) {
                        shareable = false;
                        tracing::warn!(entity = %entity.code, "snapshot served before WAL ingestion caught up");
                    }
                    break (tx, row.get::<_, String>(0));
                }
                tx.rollback().await?;
                let ingested: i64 = match state.work.primary().get().await {
                    Ok(gateway) => gateway.query_one("SELECT sync.ingest_wal()", &[]).await?.get(0),
                    Err(_) => 0, // the pool is busy: the ingesting gateway drains the slot meanwhile
                };
                if ingested == 0 {
                    tokio::time::sleep(SETTLE_RETRY).await; // another session is ingesting
                }
            };
            act_as(&tx, &user).await?;
            let filter = if ids.is_some() {
                format!(" WHERE {}", entity.key_in_sql(1))
            } else {
                String::new()
            };
            // The columns' types fix how each is sent and written.
            let shape = RowLines::describe(&tx, &entity).await?;
            shareable &= shape.built_in;
            let select = format!("SELECT {} FROM {} t{filter}", shape.select_list(), entity.table);
            // The cursor's signature: the page of `/v1/changes` from it may be kept in front.
            let sig = state.page_links.sign(&entity.code, &cursor);
            let head = format!("{}\n", json!({"cursor": cursor, "sig": sig})).into_bytes();
            let mut begun = || {
                // The query runs: from here on the answer is 200 and the rows follow.
                if let Some(started) = started.take() {
                    let _ = started.send(Ok(()));
                }
            };
            match &ids {
                // COPY takes no parameters: the few rows an INVALIDATE names come by a query.
                Some(ids) => {
                    let rows = tx.query_raw(&select, [ids]).await?;
                    stream_lines(rows, &shape, head, &mut begun, &send).await?;
                }
                None => {
                    let copy = tx.copy_out(&format!("COPY ({select}) TO STDOUT (FORMAT binary)")).await?;
                    let rows = BinaryCopyOutStream::new(copy, &shape.types());
                    stream_lines(rows, &shape, head, &mut begun, &send).await?;
                }
            }
            tx.commit().await?;
            outlet.finish();
            Ok(())
        }
        .await;
            // Before the first row, a try cut short is tried again: on the primary when the
            // standby cannot serve it, anew when replay cancelled it on the standby.
            match outcome {
                Err(Ended::NeedsPrimary) if started.is_some() => {
                    match state.work.as_user_on_primary(&user.sub).await {
                        Ok(primary) => {
                            work = primary;
                            shareable = false;
                        }
                        Err(busy) => break Err(Ended::Refused(busy.into())),
                    }
                }
                Err(Ended::Database(e))
                    if started.is_some() && conflicts_left > 0 && replay_conflict(&e) =>
                {
                    conflicts_left -= 1;
                }
                outcome => break outcome,
            }
        };
        let e = match outcome {
            Ok(()) => {
                // The reader's answer ends, and its connection and place are given back,
                // before the snapshot is kept (a catalog read and a compression).
                drop((outlet, work, _place));
                if let Some(copy) = copy.filter(|_| shareable) {
                    keep(&state, copy, &first, &entity).await;
                }
                return;
            }
            Err(e) => e,
        };
        match (started.take(), e) {
            (Some(started), Ended::Database(e)) => {
                let _ = started.send(Err(ApiError::from_db(e)));
            }
            (Some(started), Ended::Refused(e)) => {
                let _ = started.send(Err(e));
            }
            (_, e) => {
                tracing::info!(error = %crate::ErrorChain(&e), "snapshot ended early");
                // Stop the query (else PostgreSQL streams the rest of the table into a
                // connection that discards it); the transaction is rolled back before the
                // connection goes back to the pool. The client sees the body end with an
                // error, not a complete snapshot.
                if !matches!(e, Ended::Database(_)) {
                    let _ = cancel.cancel_query(tokio_postgres::NoTls).await;
                }
            }
        }
    });
    start
        .await
        .map_err(|_| ApiError::internal("snapshot task ended"))??;
    Ok(ndjson(body))
}

/// Keeps a snapshot read to its end for its audience, if it was read under the policies and
/// grants the audience was computed from: the same entity, and the catalog read again after
/// the snapshot at the same epoch (a policy changed in the database before the gateway saw
/// it would have given the snapshot another audience's rows).
async fn keep(state: &AppState, copy: SnapshotCopy, first: &Arc<Entity>, entity: &Arc<Entity>) {
    if !Arc::ptr_eq(first, entity) {
        return;
    }
    match state.catalog.reload().await {
        Ok(view) if view.epoch == copy.key().epoch => {
            if state.snapshots.keep(copy).await {
                state.metrics.snapshots_kept.inc();
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %crate::ErrorChain(&e), "a snapshot was not kept"),
    }
}

/// Where a snapshot's chunks go: the response body, through a small bounded channel. Each
/// chunk must be taken within `--snapshot-idle-timeout` and all of them within
/// `--snapshot-max-duration`, so that a client that does not read holds no place for long.
struct Outlet {
    chunks: mpsc::Sender<Result<Bytes, std::io::Error>>,
    idle: Duration,
    longest: Duration,
    deadline: Instant,
    /// Set when every chunk was sent: a body that ends without it ends with an error, so a
    /// client never takes a snapshot cut short for a whole one.
    complete: Arc<AtomicBool>,
}

impl Outlet {
    /// An outlet and the body it feeds.
    fn new(config: &RuntimeConfig) -> (Outlet, Body) {
        let (chunks, sent) = mpsc::channel(BUFFERED_CHUNKS);
        let complete = Arc::new(AtomicBool::new(false));
        let whole = complete.clone();
        let end = futures_util::stream::once(async move {
            (!whole.load(Ordering::SeqCst))
                .then(|| Err(std::io::Error::other("snapshot ended early")))
        })
        .filter_map(|end| async move { end });
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(sent).chain(end));
        let longest = config.snapshot_max_duration;
        let outlet = Outlet {
            chunks,
            idle: config.snapshot_idle_timeout,
            longest,
            deadline: Instant::now() + longest,
            complete,
        };
        (outlet, body)
    }

    async fn send(&self, chunk: Bytes) -> Result<(), Ended> {
        let by = self.deadline.min(Instant::now() + self.idle);
        match tokio::time::timeout_at(by, self.chunks.send(Ok(chunk))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ended::Left),
            Err(_) if Instant::now() >= self.deadline => Err(Ended::TooLong(self.longest)),
            Err(_) => Err(Ended::Idle(self.idle)),
        }
    }

    /// Every chunk was sent.
    fn finish(&self) {
        self.complete.store(true, Ordering::SeqCst);
    }
}

/// Whether `Accept-Encoding` takes gzip: `gzip` or `x-gzip` listed with a weight above 0, or
/// else `*` so listed (RFC 9110: a coding listed by name is not taken by `*`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let codings: Vec<(String, bool)> = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or_default().to_ascii_lowercase();
            let refused = parts.any(|p| {
                let (name, weight) = p.split_once('=').unwrap_or((p, ""));
                name.trim().eq_ignore_ascii_case("q")
                    && weight.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
            });
            (coding, !refused)
        })
        .collect();
    let named = |names: &[&str]| {
        codings
            .iter()
            .filter(|(coding, _)| names.contains(&coding.as_str()))
            .map(|(_, taken)| *taken)
            .reduce(|a, b| a || b)
    };
    named(&["gzip", "x-gzip"])
        .or_else(|| named(&["*"]))
        .unwrap_or(false)
}

fn ndjson(body: Body) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response()
}

/// Sends `head`, then each row as a line of JSON, in chunks of about `CHUNK_BYTES`; calls
/// `begun` once the first row (or the end) is read, so that an error the query meets at once
/// is still the answer's status.
async fn stream_lines<R: Cells, F>(
    rows: impl futures_util::Stream<Item = Result<R, tokio_postgres::Error>>,
    shape: &RowLines,
    head: Vec<u8>,
    begun: &mut impl FnMut(),
    send: &impl Fn(Vec<u8>) -> F,
) -> Result<(), Ended>
where
    F: std::future::Future<Output = Result<(), Ended>>,
{
    pin_mut!(rows);
    let mut next = rows.next().await.transpose()?;
    begun();
    let mut chunk = head;
    while let Some(row) = next {
        shape.write(&row, &mut chunk)?;
        if chunk.len() >= CHUNK_BYTES {
            send(std::mem::replace(
                &mut chunk,
                Vec::with_capacity(CHUNK_BYTES + 4096),
            ))
            .await?;
        }
        next = rows.next().await.transpose()?;
    }
    send(chunk).await
}

/// The entity read again (the table changed under a snapshot), if the user may still read it.
async fn renewed(state: &AppState, user: &UserContext, code: &str) -> Result<Arc<Entity>, Ended> {
    state
        .catalog
        .reload()
        .await
        .map_err(|e| Ended::Refused(ApiError::internal(crate::ErrorChain(&e))))?;
    readable_entity(&state.catalog, &state.plans, &state.work, user, code)
        .await
        .map_err(|e| Ended::Refused(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_taken_unless_refused() {
        let asked = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT_ENCODING, value.parse().unwrap());
            accepts_gzip(&headers)
        };
        assert!(asked("gzip"));
        assert!(asked("br, GZIP;q=0.5"));
        assert!(asked("*"));
        assert!(!asked("gzip;q=0"));
        assert!(!asked("gzip; Q=0"));
        assert!(!asked("gzip;q=0, *"));
        assert!(asked("br;q=0, *;q=0.1"));
        assert!(!asked("br, deflate"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn ids_split_on_raw_commas_only() {
        assert_eq!(ids_param(None), None);
        assert_eq!(ids_param(Some("x=1")), None);
        assert_eq!(ids_param(Some("ids=")), Some(vec![]));
        assert_eq!(
            ids_param(Some("x=1&ids=a,b%2Cc,%5B%221%22%2C%222%22%5D,d+e")),
            Some(vec![
                "a".into(),
                "b,c".into(),
                r#"["1","2"]"#.into(),
                "d e".into()
            ])
        );
    }
}
