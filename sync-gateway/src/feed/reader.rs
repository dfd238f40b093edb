//! The change reader: once per gateway, not per connection. A wake-up (`listen`), or the
//! poll interval when none comes, starts a read that pages through the log from the
//! gateway's position and hands each page to the visibility stage. Wake-ups arriving during
//! a read coalesce into one more read. Each poll also reads the access fingerprint again
//! when the catalog is older than the poll interval (`Catalog::refresh_if_older`), so that
//! what no event trigger sees (ALTER ROLE, GRANT of a role) reaches the stage within it: a
//! new catalog epoch is handed on as a batch too, even with no change. On a standby each
//! read first waits for the standby to replay what the primary had at the wake-up
//! (`replica`).

use super::catalog::Catalog;
use super::log::{current_cursor, read_page, ReadError};
use super::replica::Replica;
use crate::backoff::Backoff;
use crate::model::change::Change;
use crate::model::cursor::Cursor;
use deadpool_postgres::Pool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Changes read per query at the log's end.
const PAGE: i32 = 1000;
/// Changes read per query behind it (the page before came back full), at most: a subscriber
/// gets one message per page it has changes in, so larger pages send fewer, fuller messages
/// where row-level security gives each subscriber few of a page's changes, and read the log
/// in fewer queries.
const BACKLOG_PAGE: i32 = 4000;
/// What a page read behind the log may hold, about, as the page before measured its changes.
/// A connection's share of a page is queued whole (`--send-queue-bytes`, 4 MiB by default:
/// past it the connection is closed), so large rows keep pages at `PAGE` changes, as before.
const BACKLOG_PAGE_BYTES: usize = 2 << 20;

/// A page of the log as the reader read it.
pub struct Batch {
    pub changes: Vec<Change>,
    pub end: Cursor,
    /// The read reached the end of the log: `end` is a batch boundary, what a replay can
    /// read up to. A full page ends inside a batch instead.
    pub complete: bool,
    /// The newest access event in the page's snapshot.
    pub access_serial: i64,
    /// When the read returned: the gateway's own share of a change's lag starts here.
    pub read_at: tokio::time::Instant,
}

/// What the reader hands on.
pub enum Feed {
    Batch(Batch),
    /// The reader lost its place (its cursor expired) and starts again here: everyone
    /// resynchronises.
    Reset(Cursor),
}

pub struct Reader {
    /// Where the log is read: the primary, or the standby of --read-url.
    pub pool: Pool,
    /// With --read-url: the primary, to mark the log there.
    pub replica: Option<Replica>,
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
        let start = Batch {
            changes: vec![],
            end: position.clone(),
            complete: true,
            access_serial: 0,
            read_at: tokio::time::Instant::now(),
        };
        if self.next.send(Feed::Batch(start)).await.is_err() {
            return;
        }
        let mut epoch = self.catalog.view().epoch;
        loop {
            if let Err(e) = self.catalog.refresh_if_older(self.poll_interval).await {
                tracing::warn!(error = %crate::ErrorChain(&e), "reading who may read what failed");
            }
            match self.drain(&mut position, &mut epoch).await {
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
        if let Some(replica) = &self.replica {
            // A standby's first cursor needs a tick replayed (the marking task's may come later).
            if let Err(e) = replica.tick().await {
                tracing::warn!(error = %crate::ErrorChain(&e), "no tick on the primary");
            }
        }
        let client = self.connect().await?;
        Ok(current_cursor(&client).await?)
    }

    /// A connection to read the log on, once a standby has replayed what the primary had.
    async fn connect(&self) -> Result<deadpool_postgres::Object, ReadError> {
        let client = self.pool.get().await?;
        if let Some(replica) = &self.replica {
            if let Err(e) = replica.await_replay(&client).await {
                // Read anyway: what the standby replayed, exactly, only less of it.
                tracing::warn!(error = %crate::ErrorChain(&e), "the standby's replay was not awaited");
            }
        }
        Ok(client)
    }

    /// Reads pages until the log is drained, handing each on (also an empty one whose
    /// position or catalog epoch moved).
    async fn drain(&self, position: &mut Cursor, epoch: &mut u64) -> Result<(), ReadError> {
        let mut client = self.connect().await?;
        let mut size = PAGE;
        loop {
            let page = read_page(&mut client, Some(position), size, None)
                .await?
                .up_to_transaction_end();
            let read_at = tokio::time::Instant::now();
            let now = self.catalog.view().epoch;
            let moved = !page.changes.is_empty()
                || page.end != *position
                || now != *epoch
                || page.access_serial > self.catalog.view().serial;
            let next_size = page.more.then(|| backlog_page(&page.changes));
            if moved {
                *position = page.end.clone();
                *epoch = now;
                let batch = Batch {
                    changes: page.changes,
                    end: page.end,
                    complete: !page.more,
                    access_serial: page.access_serial,
                    read_at,
                };
                if self.next.send(Feed::Batch(batch)).await.is_err() {
                    return Ok(());
                }
            }
            if !page.more {
                return Ok(());
            }
            size = next_size.unwrap_or(PAGE);
        }
    }
}

/// The size of the next page behind the log: as many changes as `BACKLOG_PAGE_BYTES` holds
/// at the average size of `changes` (the page before), from `PAGE` to `BACKLOG_PAGE`. Up to
/// 64 changes spread over the page are weighed (`Change::approximate_size` writes each one's
/// rows as JSON: all of them would cost the page's serialization once more).
fn backlog_page(changes: &[Change]) -> i32 {
    let step = (changes.len() / 64).max(1);
    let sizes: Vec<usize> = changes
        .iter()
        .step_by(step)
        .map(Change::approximate_size)
        .collect();
    let average = sizes.iter().sum::<usize>() / sizes.len().max(1);
    (BACKLOG_PAGE_BYTES / average.max(1)).clamp(PAGE as usize, BACKLOG_PAGE as usize) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::change::{sample, Op};
    use serde_json::json;

    #[test]
    fn pages_behind_the_log_grow_only_while_their_changes_are_small() {
        let page = |pad: usize| -> Vec<Change> {
            (0..PAGE)
                .map(|i| {
                    sample(
                        Op::Update,
                        &i.to_string(),
                        Some(json!({"pad": "x".repeat(pad)})),
                        None,
                    )
                })
                .collect()
        };
        assert_eq!(
            backlog_page(&page(40)),
            BACKLOG_PAGE,
            "small rows: the largest pages"
        );
        assert_eq!(
            backlog_page(&page(4096)),
            PAGE,
            "large rows: pages as at the log's end"
        );
        let between = backlog_page(&page(1024));
        assert!(PAGE < between && between < BACKLOG_PAGE, "{between}");
    }
}
