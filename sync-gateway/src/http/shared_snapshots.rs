//! Whole-entity snapshots that an audience shares (`access::sharing`), kept briefly in
//! memory. A snapshot is right for as long as its cursor can be read from: a client given
//! one taken a few seconds before it asked catches up from its cursor over those seconds,
//! as it would over the time its own download took. So in a cold start of many clients (a
//! deploy, a reconnect storm of clients without copies) the database reads an entity once
//! per audience and `--snapshot-share-for`, not once per client.
//!
//! Only a snapshot read to its end is kept, and only one of at most a quarter of the cache's
//! bytes; it is served until `--snapshot-share-for` after its read began (its cursor is no
//! older), plain and gzip-compressed once (each reader compressing it again would spend the
//! gateway's cores on the same bytes). Requests arriving while one is read read on their own
//! (under the snapshot caps).

use axum::body::Bytes;
use flate2::write::GzEncoder;
use moka::future::Cache;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct SnapshotKey {
    pub entity: String,
    pub audience: String,
    /// The catalog epoch the audience's plan was read at: a snapshot read under other
    /// policies or grants is not the audience's.
    pub epoch: u64,
}

/// A kept snapshot's body, as it was sent and gzip-compressed.
pub struct Kept {
    pub plain: Bytes,
    pub gzip: Bytes,
    /// `--snapshot-share-for` after its read began.
    until: Instant,
}

pub struct SharedSnapshots {
    cache: Cache<SnapshotKey, Arc<Kept>>,
    share_for: Duration,
    /// The largest snapshot kept.
    max_bytes: usize,
}

impl SharedSnapshots {
    /// Snapshots served for `share_for` after their read began (none when zero), `max_bytes`
    /// of them.
    pub fn new(share_for: Duration, max_bytes: u64) -> SharedSnapshots {
        SharedSnapshots {
            cache: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|key: &SnapshotKey, kept: &Arc<Kept>| {
                    let bytes = kept.plain.len()
                        + kept.gzip.len()
                        + key.entity.len()
                        + key.audience.len()
                        + 64;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .time_to_live(share_for.max(Duration::from_millis(1)))
                .build(),
            share_for,
            max_bytes: usize::try_from(max_bytes / 4).unwrap_or(usize::MAX),
        }
    }

    /// The snapshot of `key`, if one was read within its lifetime.
    pub async fn get(&self, key: &SnapshotKey) -> Option<Arc<Kept>> {
        let kept = self.cache.get(key).await?;
        (Instant::now() < kept.until).then_some(kept)
    }

    /// A copy of a snapshot's body as it is sent, to be kept under `key` once complete
    /// (None when sharing is off). Made as the read begins.
    pub fn copy(&self, key: SnapshotKey) -> Option<SnapshotCopy> {
        (!self.share_for.is_zero()).then(|| SnapshotCopy {
            key,
            body: Mutex::new(Some(Vec::new())),
            max_bytes: self.max_bytes,
            began: Instant::now(),
        })
    }

    /// Keeps `copy`, read to its end, unless it grew past the largest kept, its time has
    /// passed already, or one kept meanwhile (by a reader who began with it) lasts as long.
    /// Whether it was kept.
    pub async fn keep(&self, copy: SnapshotCopy) -> bool {
        let until = copy.began + self.share_for;
        if self
            .get(&copy.key)
            .await
            .is_some_and(|kept| kept.until >= until)
        {
            return false;
        }
        let body = copy.body.into_inner().unwrap_or_else(|e| e.into_inner());
        let Some(plain) = body.filter(|_| Instant::now() < until) else {
            return false;
        };
        let compressed = tokio::task::spawn_blocking(move || {
            let mut gzip = GzEncoder::new(Vec::new(), flate2::Compression::default());
            gzip.write_all(&plain)?;
            let mut gzip = gzip.finish()?;
            gzip.shrink_to_fit();
            let mut plain = plain;
            plain.shrink_to_fit();
            Ok::<_, std::io::Error>((plain, gzip))
        })
        .await;
        let Ok(Ok((plain, gzip))) = compressed else {
            return false;
        };
        let kept = Kept {
            plain: plain.into(),
            gzip: gzip.into(),
            until,
        };
        self.cache.insert(copy.key, Arc::new(kept)).await;
        true
    }
}

/// A snapshot's body, copied chunk by chunk as it is sent; given up once too large.
pub struct SnapshotCopy {
    key: SnapshotKey,
    body: Mutex<Option<Vec<u8>>>,
    max_bytes: usize,
    began: Instant,
}

impl SnapshotCopy {
    pub fn key(&self) -> &SnapshotKey {
        &self.key
    }

    pub fn append(&self, chunk: &[u8]) {
        let mut body = self.body.lock().unwrap_or_else(|e| e.into_inner());
        if body
            .as_ref()
            .is_some_and(|b| b.len() + chunk.len() > self.max_bytes)
        {
            *body = None;
        }
        if let Some(body) = body.as_mut() {
            body.extend_from_slice(chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn key(audience: &str) -> SnapshotKey {
        SnapshotKey {
            entity: "task".into(),
            audience: audience.into(),
            epoch: 1,
        }
    }

    #[tokio::test]
    async fn a_snapshot_is_kept_for_its_audience_alone_and_only_when_small_enough() {
        let shared = SharedSnapshots::new(Duration::from_secs(60), 4096);
        let copy = shared.copy(key("a")).unwrap();
        copy.append(b"{\"cursor\":\"1\"}\n");
        copy.append(b"{\"id\":1}\n");
        assert!(shared.keep(copy).await);
        let kept = shared.get(&key("a")).await.expect("kept");
        assert_eq!(&kept.plain[..], b"{\"cursor\":\"1\"}\n{\"id\":1}\n");
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(&kept.gzip[..])
            .read_to_end(&mut unzipped)
            .unwrap();
        assert_eq!(unzipped, kept.plain);
        assert!(shared.get(&key("b")).await.is_none());
        let later_epoch = SnapshotKey {
            epoch: 2,
            ..key("a")
        };
        assert!(shared.get(&later_epoch).await.is_none());
        // Past a quarter of the cache: given up, even when later chunks are small.
        let copy = shared.copy(key("c")).unwrap();
        copy.append(&[b'x'; 1025]);
        copy.append(b"\n");
        shared.keep(copy).await;
        assert!(shared.get(&key("c")).await.is_none());
    }

    #[tokio::test]
    async fn a_snapshot_is_served_until_the_sharing_after_its_read_began() {
        let shared = SharedSnapshots::new(Duration::from_millis(200), 4096);
        let copy = shared.copy(key("a")).unwrap();
        copy.append(b"{}\n");
        assert!(shared.keep(copy).await);
        assert!(shared.get(&key("a")).await.is_some());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(shared.get(&key("a")).await.is_none());
    }

    #[tokio::test]
    async fn a_read_that_took_longer_than_the_sharing_is_not_kept() {
        let shared = SharedSnapshots::new(Duration::from_millis(20), 4096);
        let copy = shared.copy(key("a")).unwrap();
        copy.append(b"{}\n");
        tokio::time::sleep(Duration::from_millis(30)).await;
        shared.keep(copy).await;
        assert!(shared.get(&key("a")).await.is_none());
    }

    #[test]
    fn nothing_is_copied_when_sharing_is_off() {
        assert!(SharedSnapshots::new(Duration::ZERO, 4096)
            .copy(key("a"))
            .is_none());
    }
}
