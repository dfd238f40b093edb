//! Reading the log on a hot standby (SPEC 2.7). A standby's cursors start from marks the
//! primary made (`sync.tick()`), and a standby knows of a commit only once it replayed it.
//! So at each wake-up the reader marks the log on the primary, reads the primary's WAL
//! position, and waits, a bounded time, until the standby has replayed that far: the read
//! that follows sees every change committed before the wake-up, with a cursor that says so.
//! Without that wait the read is as exact, only later. Wake-ups come from LISTEN on the
//! primary (a standby cannot LISTEN).

use crate::metrics::Metrics;
use deadpool_postgres::Pool;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// How often the primary is marked while the log moves. A standby's cursor costs a scan of
/// what it replayed since the newest mark (`standby_mark` of the extension's changes.rs): a
/// reader that ticked only at its wake-ups read a backlog of a million changes written after
/// its last tick with each page's cursor scanning all of them (a catch-up through a standby
/// 3x slower at 100,000 changes, the client's socket lost at 1,000,000).
const MARK_EVERY: Duration = Duration::from_millis(100);
/// Longest the reader waits for the standby's replay before reading anyway.
const PATIENCE: Duration = Duration::from_secs(5);
/// Longest it waits for the primary's tick (a primary lost does not hold up the reads).
const TICK_PATIENCE: Duration = Duration::from_secs(1);
/// The first and longest pause between two looks at the standby's replay.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(50);

const TICK_SQL: &str = "SELECT sync.tick()";
/// Read after the tick committed (a statement of its own), so that it is past the commit.
const POSITION_SQL: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn()::text";
/// Replayed up to `$1`, or not replaying any more (promoted: its own log is the truth).
const REPLAYED_SQL: &str = "SELECT NOT pg_catalog.pg_is_in_recovery()
    OR pg_catalog.pg_last_wal_replay_lsn() >= $1::text::pg_lsn";

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("the primary: {0}")]
    Primary(#[from] tokio_postgres::Error),
    #[error("the primary's pool: {0}")]
    PrimaryPool(deadpool_postgres::PoolError),
    #[error("the primary did not answer within {0:?}")]
    Unanswered(Duration),
    #[error("the standby: {0}")]
    Standby(tokio_postgres::Error),
    #[error("the standby had not replayed the primary's position after {0:?}")]
    Late(Duration),
}

/// The reader's link to the primary when it reads a standby.
#[derive(Clone)]
pub struct Replica {
    pub primary: Pool,
    pub metrics: Arc<Metrics>,
}

impl Replica {
    /// Marks the log on the primary every `MARK_EVERY` until `shutdown` (a tick is a no-op
    /// while the log stands still).
    pub async fn keep_marking(self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(MARK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let tick = async {
                let primary = self
                    .primary
                    .get()
                    .await
                    .map_err(ReplicaError::PrimaryPool)?;
                primary.query_one(TICK_SQL, &[]).await?;
                Ok::<_, ReplicaError>(())
            };
            match tokio::time::timeout(TICK_PATIENCE, tick).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %crate::ErrorChain(&e), "no tick"),
                Err(_) => tracing::debug!("no tick within {TICK_PATIENCE:?}"),
            }
        }
    }

    /// Marks the log on the primary, then waits until `standby` has replayed the mark.
    pub async fn tick_and_replay(&self, standby: &Client) -> Result<(), ReplicaError> {
        let tick = async {
            let primary = self
                .primary
                .get()
                .await
                .map_err(ReplicaError::PrimaryPool)?;
            primary.query_one(TICK_SQL, &[]).await?;
            Ok::<_, ReplicaError>(primary.query_one(POSITION_SQL, &[]).await?)
        };
        let position: String = tokio::time::timeout(TICK_PATIENCE, tick)
            .await
            .map_err(|_| ReplicaError::Unanswered(TICK_PATIENCE))??
            .get(0);
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        loop {
            let replayed: bool = standby
                .query_one(REPLAYED_SQL, &[&position])
                .await
                .map_err(ReplicaError::Standby)?
                .get(0);
            let waited = started.elapsed();
            if replayed || waited >= PATIENCE {
                self.metrics.replica_lag.set(waited.as_secs_f64());
                return match replayed {
                    true => Ok(()),
                    false => Err(ReplicaError::Late(waited)),
                };
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }
}
