//! The gateway's cache of `/v1/changes` pages that an audience shares (`access::sharing`),
//! bounded in bytes. Identical reads in flight are made once: the first request reads and
//! judges, the others wait for its answer (moka's `try_get_with`).
//!
//! A *closed* page (`Page::closed`: full, and ending inside or at the end of the batch of the
//! log its read began with) holds changes that are final. It is kept while it is read
//! (`CLOSED_IDLE`), the first one read being every later reader's answer: from a cursor
//! between batches, a read's batch ends where it found the log, so two reads at two moments
//! would link to two chains of URLs, each cached on its own. Any other page is *open*: it is
//! shared only by requests that find the live stream at the same position (`PageKey::at`),
//! for `OPEN_LIFETIME`.

use crate::access::refetch::RefetchChecks;
use crate::model::cursor::Cursor;
use axum::body::Bytes;
use moka::future::Cache;
use moka::Expiry;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A closed page unread for this long leaves the cache.
const CLOSED_IDLE: Duration = Duration::from_secs(600);
/// An open page is shared this long at most (the position it was read at moves on anyway).
const OPEN_LIFETIME: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PageKey {
    pub since: String,
    pub limit: i32,
    pub entity: String,
    pub audience: String,
    /// The live position an open page was read at; None for a closed page.
    pub at: Option<String>,
}

/// A page as sent: its body and what the headers say of it.
pub struct Page {
    pub body: Bytes,
    /// A digest of the body.
    pub etag: String,
    /// Where the next page starts.
    pub cursor: Cursor,
    /// Ended at its limit inside (or at the end of) the batch its read began with
    /// (`Cursor::in_batch_read_from`): its changes are final. From a cursor inside a batch
    /// every read gives the same bytes; from one between batches another read (another
    /// gateway) may end the batch elsewhere, its page as right, forever.
    pub closed: bool,
    /// Ended at its limit: more follows at once.
    pub full: bool,
    /// Holds no change for the entity.
    pub empty: bool,
}

pub struct Pages {
    cache: Cache<PageKey, Arc<Page>>,
    /// What the judging of private pages found of the log after each page's end, for the
    /// request that continues from it (`Judge::resume`): a client paging through a long
    /// catch-up then costs the database the catch-up's length once, not once per page.
    refetch_checks: Cache<Cursor, Arc<RefetchChecks>>,
}

/// Kept this long after the page that found them: a client pages on at once.
const CHECKS_LIFETIME: Duration = Duration::from_secs(60);
/// At most this many bytes of them (a mark of a busy standby lists thousands of xids).
const CHECKS_BYTES: u64 = 16 << 20;

struct Lifetimes;

impl Expiry<PageKey, Arc<Page>> for Lifetimes {
    fn expire_after_create(&self, key: &PageKey, _: &Arc<Page>, _: Instant) -> Option<Duration> {
        Some(match key.at {
            Some(_) => OPEN_LIFETIME,
            None => CLOSED_IDLE,
        })
    }

    fn expire_after_read(
        &self,
        key: &PageKey,
        _: &Arc<Page>,
        _: Instant,
        left: Option<Duration>,
        _: Instant,
    ) -> Option<Duration> {
        match key.at {
            Some(_) => left,
            None => Some(CLOSED_IDLE),
        }
    }
}

impl Pages {
    pub fn new(max_bytes: u64) -> Pages {
        Pages {
            cache: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|key: &PageKey, page: &Arc<Page>| {
                    let at = key.at.as_ref().map_or(0, String::len);
                    let bytes = page.body.len()
                        + page.cursor.as_str().len()
                        + key.since.len()
                        + key.entity.len()
                        + at
                        + 128;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .expire_after(Lifetimes)
                .build(),
            refetch_checks: Cache::builder()
                .max_capacity(CHECKS_BYTES)
                .weigher(|end: &Cursor, checks: &Arc<RefetchChecks>| {
                    let bytes = end.as_str().len() + checks.approximate_size() + 64;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .time_to_live(CHECKS_LIFETIME)
                .build(),
        }
    }

    /// What judging found of the log after `end`, a page's end, if a page ending there did.
    pub async fn refetch_checks(&self, end: &Cursor) -> Option<Arc<RefetchChecks>> {
        self.refetch_checks.get(end).await
    }

    pub async fn keep_refetch_checks(&self, end: Cursor, checks: RefetchChecks) {
        if !checks.is_empty() {
            self.refetch_checks.insert(end, Arc::new(checks)).await;
        }
    }

    /// The closed page of `key` (its `at` ignored), if cached.
    pub async fn closed(&self, key: &PageKey) -> Option<Arc<Page>> {
        let closed = PageKey {
            at: None,
            ..key.clone()
        };
        self.cache.get(&closed).await
    }

    /// The page of `key` read at live position `key.at`: read by `read` once however many
    /// ask at the same time; kept for good when closed. None when the read gave no page to
    /// share (it failed, or was judged under other policies): nothing is kept, and each
    /// asker reads alone.
    ///
    /// Two reads from one cursor at two live positions can both be closed and still differ:
    /// a cursor at a batch's end starts a batch that ends where its read found the log, so
    /// their next links start two chains of URLs that a cache in front keeps apart. The
    /// first one kept is the one every asker gets, so that an audience pages along one.
    pub async fn read_once(
        &self,
        key: PageKey,
        read: impl Future<Output = Option<Page>>,
    ) -> Option<Arc<Page>> {
        let page = self
            .cache
            .try_get_with(key.clone(), async { read.await.map(Arc::new).ok_or(()) })
            .await
            .ok()?;
        if !page.closed {
            return Some(page);
        }
        let closed = PageKey { at: None, ..key };
        Some(self.cache.get_with(closed, async { page }).await)
    }
}
