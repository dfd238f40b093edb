//! Whole-entity snapshots that an audience shares (`access::sharing`), kept briefly in
//! memory. A snapshot is right for as long as its cursor can be read from: a client given
//! one taken a few seconds before it asked catches up from its cursor over those seconds,
//! as it would over the time its own download took. So in a cold start of many clients (a
//! deploy, a reconnect storm of clients without copies) the database reads an entity once
//! per audience and `--snapshot-share-for`, not once per client.
//!
//! Only a snapshot read to its end is kept, and only one of at most a quarter of the cache's
//! bytes; requests arriving while one is read read on their own (under the snapshot caps).

use axum::body::Bytes;
use moka::future::Cache;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct SnapshotKey {
    pub entity: String,
    pub audience: String,
    /// The catalog epoch the audience's plan was read at: a snapshot read under other
    /// policies or grants is not the audience's.
    pub epoch: u64,
}

pub struct SharedSnapshots {
    cache: Cache<SnapshotKey, Bytes>,
    /// The largest snapshot kept.
    max_bytes: usize,
    /// Off (`--snapshot-share-for 0`): nothing is copied or kept.
    off: bool,
}

impl SharedSnapshots {
    /// Snapshots kept for `share_for` after their read (none when zero), `max_bytes` of them.
    pub fn new(share_for: Duration, max_bytes: u64) -> SharedSnapshots {
        SharedSnapshots {
            cache: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|key: &SnapshotKey, body: &Bytes| {
                    let bytes = body.len() + key.entity.len() + key.audience.len() + 64;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .time_to_live(share_for.max(Duration::from_millis(1)))
                .build(),
            max_bytes: usize::try_from(max_bytes / 4).unwrap_or(usize::MAX),
            off: share_for.is_zero(),
        }
    }

    /// The snapshot of `key`, if one was read within its lifetime.
    pub async fn get(&self, key: &SnapshotKey) -> Option<Bytes> {
        self.cache.get(key).await
    }

    /// A copy of a snapshot's body as it is sent, to be kept under `key` once complete
    /// (None when sharing is off).
    pub fn copy(&self, key: SnapshotKey) -> Option<SnapshotCopy> {
        (!self.off).then(|| SnapshotCopy {
            key,
            body: Mutex::new(Some(Vec::new())),
            max_bytes: self.max_bytes,
        })
    }

    /// Keeps `copy`, read to its end, unless it grew past the largest kept.
    pub async fn keep(&self, copy: SnapshotCopy) {
        let body = copy.body.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(body) = body {
            self.cache.insert(copy.key, Bytes::from(body)).await;
        }
    }
}

/// A snapshot's body, copied chunk by chunk as it is sent; given up once too large.
pub struct SnapshotCopy {
    key: SnapshotKey,
    body: Mutex<Option<Vec<u8>>>,
    max_bytes: usize,
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
        shared.keep(copy).await;
        assert_eq!(
            shared.get(&key("a")).await.as_deref(),
            Some(&b"{\"cursor\":\"1\"}\n{\"id\":1}\n"[..])
        );
        assert_eq!(shared.get(&key("b")).await, None);
        assert_eq!(
            shared
                .get(&SnapshotKey {
                    epoch: 2,
                    ..key("a")
                })
                .await,
            None
        );
        // Past a quarter of the cache: given up, even when later chunks are small.
        let copy = shared.copy(key("c")).unwrap();
        copy.append(&[b'x'; 1025]);
        copy.append(b"\n");
        shared.keep(copy).await;
        assert_eq!(shared.get(&key("c")).await, None);
    }

    #[test]
    fn nothing_is_copied_when_sharing_is_off() {
        assert!(SharedSnapshots::new(Duration::ZERO, 4096)
            .copy(key("a"))
            .is_none());
    }
}
