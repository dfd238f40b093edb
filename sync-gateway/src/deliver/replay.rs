//! Replays: a SUBSCRIBE with `since` first receives every change of its subscription after
//! that cursor, read from the log up to the router's live position at the time (`until`).
//! Each replay is a task of its own that reads a page (taking a client connection only for
//! the read and its judgement), judges it for the subscriber's group as the visibility stage
//! judges live batches, and hands it to the router, which sends it as it sends everything.
//! Before each part it waits for room in the connection's queue: a slow client slows only
//! its own replay, and one that does not read at all is closed by its writer, which ends
//! the replay. A replay also ends when its subscription does, and holds a place of the
//! replays cap (per user, and one of the places in total, in turn) while it runs, so that
//! neither subscribing and unsubscribing in a loop nor many connections multiply the
//! replays' memory.

use super::command::{ReplayEvent, ReplayItem, ReplayStart};
use crate::access::judge::{Db, Judge, JudgeError};
use crate::access::limits::{Busy, Cap, ClientWork, Turns};
use crate::access::listeners::Listeners;
use crate::access::plans::Plans;
use crate::feed::catalog::Catalog;
use crate::feed::log::{read_page, ReadError};
use crate::metrics::Metrics;
use crate::model::change::Change;
use crate::model::cursor::Cursor;
use crate::model::protocol::{ErrorCode, ResyncReason, ServerMessage};
use moka::future::Cache;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Changes read per query: a replay holds two pages at most (one handed on, one read
/// ahead), a MB or two for rows of typical size.
const PAGE: i32 = 2_000;
/// Changes handed to the router at a time, each part after waiting for half the connection's
/// queue to be free: with rows up to 32 KiB a part fits in it.
const PART: usize = 64;

pub struct Replayer {
    /// Replays of a user, waiting or running: over it, refused at once.
    pub per_user: Arc<Cap>,
    /// Places of the replays running: a replay waits its turn for one.
    pub turns: Turns,
    pub work: Arc<ClientWork>,
    pub plans: Arc<Plans>,
    pub catalog: Arc<Catalog>,
    pub events: mpsc::Sender<ReplayEvent>,
    pub reads: SharedReads,
    pub metrics: Arc<Metrics>,
}

/// Pages of the log read for replays, shared by the replays that read the same range. In a
/// reconnect storm every client of a gateway resumes from about the same cursor up to the
/// same live position, and the range `(since, until]` of a replay is closed: its page is
/// the same for every reader. (Judging stays each replay's own.) Kept briefly and bounded
/// in bytes; a read that fails is not shared, and each replay then reads alone.
pub struct SharedReads {
    cache: Cache<(String, String), Arc<LogPage>>,
}

/// A page of the log as replays share it.
struct LogPage {
    changes: Vec<Arc<Change>>,
    end: Cursor,
    more: bool,
    access_serial: i64,
}

/// How long a shared page stays after its read, and how many bytes of pages at most.
const SHARED_FOR: Duration = Duration::from_secs(5);
const SHARED_BYTES: u64 = 64 << 20;

impl Default for SharedReads {
    fn default() -> SharedReads {
        SharedReads {
            cache: Cache::builder()
                .max_capacity(SHARED_BYTES)
                .weigher(|(since, until): &(String, String), page: &Arc<LogPage>| {
                    // The key and the end count too: a page of no changes under a client's
                    // long cursor is not free.
                    let changes: usize = page.changes.iter().map(|c| c.approximate_size()).sum();
                    let bytes = changes + since.len() + until.len() + page.end.as_str().len() + 128;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .time_to_live(SHARED_FOR)
                .build(),
        }
    }
}

/// A replay counted among the waiting (`sync_replays_waiting`) while this lives: also when
/// its subscription ends during the wait.
struct Waiting(prometheus_client::metrics::gauge::Gauge);

impl Waiting {
    fn counted(gauge: &prometheus_client::metrics::gauge::Gauge) -> Waiting {
        gauge.inc();
        Waiting(gauge.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error(transparent)]
    Judge(#[from] JudgeError),
    #[error("the connection is gone")]
    Gone,
    #[error("{0}")]
    Forbidden(String),
}

impl Replayer {
    /// Runs the replays the router asks for, each in a task of its own, until `shutdown`.
    pub async fn run(
        self,
        mut starts: mpsc::UnboundedReceiver<ReplayStart>,
        shutdown: CancellationToken,
    ) {
        let this = Arc::new(self);
        while let Some(start) = tokio::select! {
            start = starts.recv() => start,
            _ = shutdown.cancelled() => None,
        } {
            let this = this.clone();
            tokio::spawn(async move {
                let (conn, sub) = (start.conn, start.sub);
                let entity_code = start.subscription.entity_code.clone();
                let outcome = match this.per_user.take(&start.user.sub) {
                    Ok(_place) => start
                        .cancel
                        .run_until_cancelled(async {
                            let waiting = Waiting::counted(&this.metrics.replays_waiting);
                            let _turn = this.turns.wait().await?;
                            drop(waiting);
                            this.replay(&start).await
                        })
                        .await
                        .unwrap_or(Err(ReplayError::Gone)),
                    Err(busy) => Err(busy.into()),
                };
                let message = match outcome {
                    Ok(()) => return,
                    Err(ReplayError::Gone) => return,
                    Err(ReplayError::Read(ReadError::Expired(_))) => ServerMessage::Resync {
                        entity_code,
                        reason: ResyncReason::CursorExpired,
                    },
                    Err(ReplayError::Read(ReadError::Malformed(why))) => ServerMessage::about(
                        &entity_code,
                        ErrorCode::BadRequest,
                        format!("since: {why}"),
                    ),
                    Err(ReplayError::Forbidden(why)) => ServerMessage::forbidden(&entity_code, why),
                    Err(ReplayError::Busy(busy)) => ServerMessage::about(
                        &entity_code,
                        ErrorCode::Internal,
                        format!("{busy}: subscribe again from your cursor"),
                    ),
                    Err(e) => {
                        tracing::warn!(error = %crate::ErrorChain(&e), "replay failed");
                        ServerMessage::about(
                            &entity_code,
                            ErrorCode::Internal,
                            "the replay failed; subscribe again",
                        )
                    }
                };
                let _ = this
                    .events
                    .send(ReplayEvent::Failed { conn, sub, message })
                    .await;
            });
        }
    }

    /// Reads the gap a page ahead of what it hands on: the next page is read and judged
    /// while the router and the client take the current one.
    async fn replay(self: &Arc<Self>, start: &ReplayStart) -> Result<(), ReplayError> {
        let (pages, mut judged) = mpsc::channel(1);
        // Not aborted when the replay is (its subscription ended): a query cut off here would
        // run on in the database while its connection and its place under the caps were
        // given back. It ends at its next page, which finds nobody to take it.
        tokio::spawn(self.clone().read(start.clone(), pages));
        while let Some(page) = judged.recv().await {
            for part in parts(&page?, PART) {
                start
                    .queue
                    .wait_for_room()
                    .await
                    .map_err(|_| ReplayError::Gone)?;
                let (queued, in_the_queue) = tokio::sync::oneshot::channel();
                let event = ReplayEvent::Page {
                    conn: start.conn,
                    sub: start.sub,
                    items: part.to_vec(),
                    queued,
                };
                self.events
                    .send(event)
                    .await
                    .map_err(|_| ReplayError::Gone)?;
                in_the_queue.await.map_err(|_| ReplayError::Gone)?;
            }
        }
        let done = ReplayEvent::Done {
            conn: start.conn,
            sub: start.sub,
        };
        self.events.send(done).await.map_err(|_| ReplayError::Gone)
    }

    /// The page of `(since, until]`, read once for all the replays asking for it at the
    /// same time or within `SHARED_FOR`. The asking replay holds a place under its user's cap
    /// while it waits: a user at their cap is refused at once, and starts no read for others.
    /// The read itself counts under a holder of its own range. When it fails, nothing is
    /// shared, and each replay reads alone (and gets its own error).
    async fn read_page_of(
        &self,
        user: &str,
        since: &Cursor,
        until: &Cursor,
    ) -> Result<Arc<LogPage>, ReplayError> {
        let mine = self.work.hold(user)?;
        let key = (since.as_str().to_owned(), until.as_str().to_owned());
        // NUL: no token's `sub` names it in practice.
        let holder = format!("\0replay {}..{}", key.0, key.1);
        let shared = self
            .reads
            .cache
            .try_get_with(key, async {
                self.read_alone(&holder, since, until).await.map(Arc::new)
            })
            .await;
        drop(mine);
        match shared {
            Ok(page) => Ok(page),
            Err(_) => Ok(Arc::new(self.read_alone(user, since, until).await?)),
        }
    }

    /// Reads the page of `(since, until]`, under `user`'s caps.
    async fn read_alone(
        &self,
        user: &str,
        since: &Cursor,
        until: &Cursor,
    ) -> Result<LogPage, ReplayError> {
        let mut work = self.work.start(user).await?;
        let page = read_page(&mut work.client, Some(since), PAGE, Some(until)).await?;
        self.metrics.replay_pages_read.inc();
        Ok(LogPage {
            changes: page.changes.into_iter().map(Arc::new).collect(),
            end: page.end,
            more: page.more,
            access_serial: page.access_serial,
        })
    }

    /// Reads and judges the gap page by page into `pages`, ending with the last page (or the
    /// first error).
    async fn read(
        self: Arc<Self>,
        start: ReplayStart,
        pages: mpsc::Sender<Result<Vec<ReplayItem>, ReplayError>>,
    ) {
        let code = &start.subscription.entity_code;
        let mut listeners = Arc::new(Listeners::alone(start.user.clone(), start.group));
        let mut judge = Judge::default();
        let mut cursor = start.since.clone();
        loop {
            let page = async {
                let page = self
                    .read_page_of(&start.user.sub, &cursor, &start.until)
                    .await?;
                // The subscription's entity only, and where the page's transactions end.
                let mut items = Vec::new();
                let mut mine = Vec::new();
                for change in &page.changes {
                    if &change.entity_code == code {
                        mine.push(change.clone());
                        items.push(None);
                    }
                    if change.tx_end && !matches!(items.last(), Some(Some(ReplayItem::TxEnd(_)))) {
                        items.push(Some(ReplayItem::TxEnd(change.clone())));
                    }
                }
                // Judged on a connection of the user's own, taken only when there is
                // something to judge.
                let judged = if mine.is_empty() {
                    None
                } else {
                    let work = self.work.start(&start.user.sub).await?;
                    let judged = judge
                        .page(
                            &self.catalog,
                            &self.plans,
                            &mut Db::Held(&work.client),
                            page.access_serial,
                            mine,
                            &mut listeners,
                        )
                        .await?;
                    if let Some((_, _, why)) = judged.refused.into_iter().next() {
                        return Err(ReplayError::Forbidden(why));
                    }
                    Some((judged.changes, judged.verdicts))
                };
                let mut judged = judged
                    .into_iter()
                    .flat_map(|(changes, verdicts)| changes.into_iter().zip(verdicts));
                let items: Vec<ReplayItem> = items
                    .into_iter()
                    .map(|item| {
                        item.unwrap_or_else(|| {
                            let (change, verdict) = judged.next().expect("one per change");
                            ReplayItem::Change(change, verdict)
                        })
                    })
                    .collect();
                Ok((items, page.end.clone(), page.more))
            }
            .await;
            let (items, end, more) = match page {
                Ok(page) => page,
                Err(e) => {
                    let _ = pages.send(Err(e)).await;
                    return;
                }
            };
            if pages.send(Ok(items)).await.is_err() || !more {
                return;
            }
            cursor = end;
        }
    }
}

/// `items` in parts of `size`, or one more where the next item ends a transaction: each
/// part goes out in a message of its own, and an end cut from its change was lost (the
/// client then waited a second for it).
fn parts(items: &[ReplayItem], size: usize) -> Vec<&[ReplayItem]> {
    let mut parts = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let mut cut = size.min(rest.len());
        if matches!(rest.get(cut), Some(ReplayItem::TxEnd(_))) {
            cut += 1;
        }
        let (part, after) = rest.split_at(cut);
        parts.push(part);
        rest = after;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::judge::Verdict;
    use crate::model::change::{sample, Op};

    #[test]
    fn a_transactions_end_stays_in_the_part_of_its_change() {
        let change = || {
            ReplayItem::Change(
                Arc::new(sample(Op::Insert, "1", None, None)),
                Verdict::Seen(None),
            )
        };
        let end = || ReplayItem::TxEnd(Arc::new(sample(Op::Insert, "1", None, None)));
        let items = vec![change(), change(), end(), change(), end(), change()];
        let lengths: Vec<usize> = parts(&items, 2).iter().map(|p| p.len()).collect();
        assert_eq!(lengths, [3, 2, 1]);
        assert!(parts(&[], 2).is_empty());
    }
}
