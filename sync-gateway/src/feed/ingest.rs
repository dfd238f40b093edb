//! Driving WAL capture (`--wal-ingest`): every such gateway calls `sync.ingest_wal` until the
//! slot is drained, then again every interval. The function lets one caller at a time ingest
//! (its lock is a table only pg_sync's functions can take, not an advisory key that any role
//! could hold to stop ingestion); the others get 0 at once and wait an interval. So when a
//! gateway dies, the others go on. Ingested changes reach readers through the log's normal
//! wake-ups.

use deadpool_postgres::Pool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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

    /// Ingests until shutdown or an error.
    async fn drive(&self, shutdown: &CancellationToken) -> Result<(), IngestError> {
        let client = self.pool.get().await?;
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
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}
