//! The change reader: once per gateway, not per connection. A wake-up (`listen`), or the
//! poll interval when none comes, starts a read that pages through the log from the
//! gateway's position and hands each page to the visibility stage. Wake-ups arriving during
//! a read coalesce into one more read. Before a page goes on, the catalog is read again for
//! an entity whose changes carry a newer schema version (a table altered, RLS switched on),
//! so every later stage judges the page by the table as it was when written.

use super::catalog::Catalog;
use super::log::{current_cursor, read_page, ReadError};
use crate::access::visibility::RawBatch;
use crate::backoff::Backoff;
use crate::model::cursor::Cursor;
use deadpool_postgres::Pool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Changes read per query.
const PAGE: i32 = 1000;

/// What the reader hands on.
pub enum Feed {
    Batch(RawBatch),
    /// The reader lost its place (its cursor expired) and starts again here: everyone
    /// resynchronises.
    Reset(Cursor),
}

pub struct Reader {
    pub pool: Pool,
    pub catalog: Arc<Catalog>,
    pub wake: Arc<Notify>,
    pub poll_interval: Duration,
    pub next: mpsc::Sender<Feed>,
    /// Set once the first read succeeded (for /readyz), cleared while reads fail.
    pub ready: Arc<AtomicBool>,
}

impl Reader {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut position = loop {
            match self.start_position().await {
                Ok(position) => break position,
                Err(e) => {
                    tracing::warn!(error = %crate::ErrorChain(&e), "cannot read the log's position; retrying");
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                }
            }
        };
        // The live stream starts here: subscriptions without `since` begin at this position.
        let start = RawBatch {
            changes: vec![],
            end: position.clone(),
            complete: true,
            policy_version: 0,
            read_at: tokio::time::Instant::now(),
        };
        if self.next.send(Feed::Batch(start)).await.is_err() {
            return;
        }
        let mut policy_version = 0;
        loop {
            match self.drain(&mut position, &mut policy_version).await {
                Ok(()) => {
                    self.ready.store(true, Ordering::SeqCst);
                    backoff = Backoff::default();
                }
                Err(ReadError::Expired(why)) => {
                    tracing::warn!(%why, "the gateway's cursor expired; clients resynchronise");
                    if let Ok(now) = self.start_position().await {
                        position = now.clone();
                        let _ = self.next.send(Feed::Reset(now)).await;
                    }
                }
                Err(e) => {
                    self.ready.store(false, Ordering::SeqCst);
                    tracing::warn!(error = %crate::ErrorChain(&e), "reading the log failed; retrying");
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn start_position(&self) -> Result<Cursor, ReadError> {
        let client = self.pool.get().await?;
        Ok(current_cursor(&client).await?)
    }

    /// Reads pages until the log is drained, handing each on (also an empty one whose
    /// position or policy version moved).
    async fn drain(
        &self,
        position: &mut Cursor,
        policy_version: &mut i64,
    ) -> Result<(), ReadError> {
        let mut client = self.pool.get().await?;
        loop {
            let page = read_page(&mut client, Some(position), PAGE, None).await?;
            let read_at = tokio::time::Instant::now();
            let moved = !page.changes.is_empty()
                || page.end != *position
                || page.policy_version != *policy_version;
            if moved {
                *position = page.end.clone();
                *policy_version = page.policy_version;
                self.refresh_catalog(&page.changes).await;
                let batch = RawBatch {
                    changes: page.changes,
                    end: page.end,
                    complete: !page.more,
                    policy_version: page.policy_version,
                    read_at,
                };
                if self.next.send(Feed::Batch(batch)).await.is_err() {
                    return Ok(());
                }
            }
            if !page.more {
                return Ok(());
            }
        }
    }

    async fn refresh_catalog(&self, changes: &[crate::model::change::Change]) {
        let mut newest: HashMap<&str, i32> = HashMap::new();
        for c in changes {
            let v = newest.entry(&c.entity_code).or_insert(c.schema_version);
            *v = (*v).max(c.schema_version);
        }
        for (code, version) in newest {
            self.catalog.refresh_for(code, version).await;
        }
    }
}
