//! Reading the log on a hot standby (SPEC 2.7). A standby's cursors start from marks the
//! primary made (`sync.tick()`), which the gateway makes every 100 ms while the primary
//! writes, and a standby knows of a commit only once it replayed it. So at each wake-up the
//! reader reads the primary's WAL position and waits, a bounded time, until the standby has
//! replayed that far: the read that follows sees every change committed before the wake-up,
//! with a cursor that says so. Without that wait the read is as exact, only later. Wake-ups
//! come from LISTEN on the primary (a standby cannot LISTEN).

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
/// The first and longest pause between two looks at the standby's replay: a look is a
/// trivial query, and each pause is latency every change of the wake-up waits (at 50 ms, the
/// p99 through a standby was 4x the primary's at 1,000 commits/s).
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(5);

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
    /// Marks the log on the primary every `MARK_EVERY` until `shutdown`, when the primary
    /// wrote anything since the last mark (a look at its WAL position costs it next to
    /// nothing; a tick computes a cursor).
    pub async fn keep_marking(self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(MARK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut marked_at: Option<String> = None;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let marked = match self.on_primary(false).await {
                Ok(now) if marked_at.as_ref() == Some(&now) => continue,
                Ok(_) => self.tick().await,
                Err(e) => Err(e),
            };
            match marked {
                Ok(position) => marked_at = Some(position),
                Err(e) => tracing::debug!(error = %crate::ErrorChain(&e), "no tick"),
            }
        }
    }

    /// Marks the log on the primary; returns the primary's WAL position after the mark.
    pub async fn tick(&self) -> Result<String, ReplicaError> {
        self.on_primary(true).await
    }

    /// The primary's WAL position, after a tick when `tick`.
    async fn on_primary(&self, tick: bool) -> Result<String, ReplicaError> {
        let asked = async {
            let primary = self
                .primary
                .get()
                .await
                .map_err(ReplicaError::PrimaryPool)?;
            if tick {
                primary.query_one(TICK_SQL, &[]).await?;
            }
            Ok::<_, ReplicaError>(primary.query_one(POSITION_SQL, &[]).await?)
        };
        Ok(tokio::time::timeout(TICK_PATIENCE, asked)
            .await
            .map_err(|_| ReplicaError::Unanswered(TICK_PATIENCE))??
            .get(0))
    }

    /// Waits until `standby` has replayed what the primary wrote so far. (No tick: one per
    /// wake-up cost the primary a transaction and every change the tick's replay.)
    pub async fn await_replay(&self, standby: &Client) -> Result<(), ReplicaError> {
        let position = self.on_primary(false).await?;
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
