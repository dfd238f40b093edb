//! Driving WAL capture (`--wal-ingest`): exactly one gateway at a time holds a session-level
//! advisory lock and calls `sync.ingest_wal` until the slot is drained, then again every
//! interval. If that gateway dies, its session ends, the lock is free, and another gateway
//! takes over within an interval or two. Ingested changes reach readers through the log's
//! normal wake-ups.

use deadpool_postgres::Pool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Held by the ingesting gateway for as long as its connection lives.
const DRIVER_LOCK: i64 = 7_378_659_444;
/// Changes per `sync.ingest_wal` call.
const BATCH: i32 = 10_000;

pub struct Ingest {
    pub pool: Pool,
    pub interval: Duration,
}

impl Ingest {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.drive(&shutdown).await {
                tracing::warn!(error = %crate::ErrorChain(&e), "WAL ingest failed; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval * 4) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Takes the driver's lock if free and ingests until shutdown or an error.
    async fn drive(&self, shutdown: &CancellationToken) -> Result<(), IngestError> {
        let client = self.pool.get().await?;
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&DRIVER_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok(()); // another gateway ingests
        }
        tracing::info!("this gateway ingests the WAL");
        let outcome = async {
            loop {
                // Nothing tracked with WAL capture: nothing to do, and no slot to create.
                let wanted: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT FROM sync.tracked WHERE capture = 'wal')",
                        &[],
                    )
                    .await?
                    .get(0);
                let added: i64 = if wanted {
                    client
                        .query_one("SELECT sync.ingest_wal($1)", &[&BATCH])
                        .await?
                        .get(0)
                } else {
                    0
                };
                if added == 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(self.interval) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        }
        .await;
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&DRIVER_LOCK])
            .await;
        outcome
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}
