//! Replays: a SUBSCRIBE with `since` first receives every change of its subscription after
//! that cursor, read from the log up to the router's live position at the time (`until`),
//! then SYNCED, then the live changes the router kept meanwhile. Runs as its own task per
//! subscription, waiting on the client's send queue (a slow replay slows only its client)
//! and never on the live stream.

use crate::access::{ids_to_check, judge, visible_rows};
use crate::catalog::Catalog;
use crate::log::{check_cursor, cursor_reached, read_page, Change, Op, ReadError};
use crate::outbox::{Outbox, RunCache};
use crate::protocol::{ErrorCode, ResyncReason, ServerMessage};
use crate::router::{Command, ReplayStart};
use deadpool_postgres::Pool;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Changes read per query (a page of 10,000 changes is a few MB).
const PAGE: i32 = 10_000;
/// How long a client's cursor may stay ahead of this gateway's live stream (a cursor from a
/// gateway further ahead) before the subscription fails.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);

pub struct Replayer {
    pub pool: Pool,
    pub catalog: Arc<Catalog>,
    pub router: mpsc::Sender<Command>,
    pub position: watch::Receiver<String>,
}

impl Replayer {
    /// Runs the replays the router asks for, each in a task of its own, until `shutdown`
    /// (the router ends only once this gives up its handle on it).
    pub async fn run(
        self,
        mut starts: mpsc::UnboundedReceiver<ReplayStart>,
        shutdown: CancellationToken,
    ) {
        while let Some(start) = tokio::select! {
            start = starts.recv() => start,
            _ = shutdown.cancelled() => None,
        } {
            let (pool, router, position) = (
                self.pool.clone(),
                self.router.clone(),
                self.position.clone(),
            );
            let catalog = self.catalog.clone();
            tokio::spawn(async move {
                let (conn, sub) = (start.conn, start.sub_id);
                let outbound = start.outbound.clone();
                let (entity_code, reference) =
                    (start.sub.entity_code.clone(), start.reference.clone());
                let outcome = replay(&pool, &catalog, &router, position, start).await;
                let message = match outcome {
                    Ok(()) => return,
                    Err(ReplayError::Gone) => None,
                    Err(ReplayError::Read(ReadError::Expired(_))) => Some(ServerMessage::Resync {
                        entity_code,
                        reason: ResyncReason::CursorExpired,
                    }),
                    Err(ReplayError::Read(ReadError::Malformed(why))) => {
                        Some(ServerMessage::error(
                            ErrorCode::BadRequest,
                            format!("since: {why}"),
                            reference,
                        ))
                    }
                    Err(ReplayError::Forbidden(why)) => {
                        Some(ServerMessage::error(ErrorCode::Forbidden, why, reference))
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::ErrorChain(&e), "replay failed");
                        Some(ServerMessage::error(
                            ErrorCode::Internal,
                            "the replay failed; subscribe again",
                            reference,
                        ))
                    }
                };
                if let Some(message) = message {
                    let _ = outbound.push(message.to_json().into()).await;
                }
                let _ = router.send(Command::ReplayFailed { conn, sub }).await;
            });
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("the client's cursor stayed ahead of this gateway")]
    Ahead,
    #[error("the connection or the router is gone")]
    Gone,
    #[error("{0}")]
    Forbidden(String),
}

async fn replay(
    pool: &Pool,
    catalog: &Catalog,
    router: &mpsc::Sender<Command>,
    mut position: watch::Receiver<String>,
    start: ReplayStart,
) -> Result<(), ReplayError> {
    let mut client = pool.get().await?;
    check_cursor(&client, &start.since).await?;
    // A cursor from a gateway further ahead: wait until the live stream passes it, and
    // replay up to there instead (what the router buffered before is all older).
    let mut until = start.until.clone();
    let deadline = tokio::time::Instant::now() + CATCH_UP_LIMIT;
    while !cursor_reached(&client, &until, &start.since).await? {
        tokio::time::timeout_at(deadline, position.changed())
            .await
            .map_err(|_| ReplayError::Ahead)?
            .map_err(|_| ReplayError::Gone)?;
        let (reply, answer) = oneshot::channel();
        router
            .send(Command::Reanchor {
                conn: start.conn,
                sub: start.sub_id,
                reply,
            })
            .await
            .map_err(|_| ReplayError::Gone)?;
        until = answer.await.map_err(|_| ReplayError::Gone)?;
    }
    let outbound = &start.outbound;
    let send = |message: ServerMessage| async move {
        outbound
            .push(message.to_json().into())
            .await
            .map_err(|_| ReplayError::Gone)
    };
    send(ServerMessage::Subscribed {
        entity_code: start.sub.entity_code.clone(),
        count: start.count,
        cursor: start.since.clone(),
        reference: start.reference.clone(),
    })
    .await?;
    let entity = catalog.entity(&start.sub.entity_code).await.ok().flatten();
    let rls = entity.filter(|e| e.rls);
    let mut cursor = start.since.clone();
    loop {
        let page = read_page(&mut client, Some(&cursor), PAGE, Some(&until)).await?;
        let mine: Vec<&Change> = page
            .changes
            .iter()
            .filter(|c| c.entity_code == start.sub.entity_code)
            .filter(|c| !c.written_by(&start.user.sub, start.client_id.as_deref()))
            .collect();
        // As the router does for live changes: the user's visible current rows decide.
        let visible = match &rls {
            Some(entity) => {
                let ids = ids_to_check(mine.iter().copied());
                let rows = visible_rows(&client, entity, &start.user, &ids).await;
                Some(rows.map_err(|_| {
                    ReplayError::Forbidden(format!(
                        "a row-level-security policy of {} failed for you",
                        entity.code
                    ))
                })?)
            }
            None => None,
        };
        let mut out = Outbox::default();
        for change in mine {
            if change.op == Op::Truncate {
                out.resync(&change.entity_code, ResyncReason::Truncate);
                continue;
            }
            let (change, action) = match &visible {
                None => (Cow::Borrowed(change), start.sub.view(change)),
                Some(rows) => {
                    let (verdict, change) = judge(change, rows);
                    let action = start.sub.view_checked(&change, verdict);
                    (change, action)
                }
            };
            if let Some(action) = action {
                out.push(&start.sub.shape, &Arc::new(change.into_owned()), action);
            }
        }
        for text in out.render(&mut RunCache::new()) {
            outbound.push(text).await.map_err(|_| ReplayError::Gone)?;
        }
        cursor = page.end;
        if !page.more {
            break;
        }
    }
    send(ServerMessage::Synced {
        entity_code: start.sub.entity_code.clone(),
        cursor: until,
        reference: start.reference.clone(),
    })
    .await?;
    router
        .send(Command::ReplayDone {
            conn: start.conn,
            sub: start.sub_id,
        })
        .await
        .map_err(|_| ReplayError::Gone)
}
