//! What `/metrics` exports (Prometheus text, on the admin listener): counters and gauges
//! bumped where things happen, and delivery time as histograms: from a change's capture to
//! its routing (the database's commit and wake-up, and the gateway), from its page's read to
//! its routing, and from a message's queueing to its write (the gateway's own).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub subscriptions: Gauge,
    pub messages_sent: Counter,
    pub bytes_sent: Counter,
    pub changes_read: Counter,
    /// Pages of the log read for `/v1/changes` (what its cache and collapsing save).
    pub changes_pages_read: Counter,
    /// Pages of the log read for replays (what sharing identical reads saves).
    pub replay_pages_read: Counter,
    /// Snapshots read from the database (what sharing them within an audience saves).
    pub snapshots_read: Counter,
    /// Snapshots kept for their audience (`--snapshot-share-for`).
    pub snapshots_kept: Counter,
    /// Replays waiting for their turn under `--max-replays` (a storm's queue).
    pub replays_waiting: Gauge,
    /// Seconds from a change's capture to its routing.
    pub delivery_lag: Histogram,
    /// Seconds from the read of a change's page to its routing.
    route_lag: Histogram,
    /// Seconds from a message's queueing by the router to its write to the socket.
    send_wait: Histogram,
    /// Batches of an entity with row-level security judged for its listening groups.
    pub rls_checks: Counter,
    /// The catalog epoch the live stream is judged by: it moves with every change of who may
    /// read what that the gateway has seen.
    pub access_epoch: Gauge,
    wal_retained_bytes: Gauge,
    /// With --read-url: how long the standby took, at the reader's last wake-up, to replay up
    /// to the primary's position then (at most the reader's patience).
    pub replica_lag: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sync");
        let connections = Gauge::default();
        let subscriptions = Gauge::default();
        let messages_sent = Counter::default();
        let bytes_sent = Counter::default();
        let changes_read = Counter::default();
        let changes_pages_read = Counter::default();
        let snapshots_read = Counter::default();
        let snapshots_kept = Counter::default();
        let replay_pages_read = Counter::default();
        let replays_waiting = Gauge::default();
        let delivery_lag = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let route_lag = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        let send_wait = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        let rls_checks = Counter::default();
        let access_epoch = Gauge::default();
        let wal_retained_bytes = Gauge::default();
        let replica_lag = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        registry.register(
            "subscriptions",
            "Subscriptions held (ids count one each)",
            subscriptions.clone(),
        );
        registry.register(
            "messages_sent",
            "Messages sent to clients",
            messages_sent.clone(),
        );
        registry.register(
            "bytes_sent",
            "Bytes of messages sent to clients",
            bytes_sent.clone(),
        );
        registry.register(
            "changes_read",
            "Changes read from the log",
            changes_read.clone(),
        );
        registry.register(
            "changes_pages_read",
            "Pages of the log read for /v1/changes",
            changes_pages_read.clone(),
        );
        registry.register(
            "replay_pages_read",
            "Pages of the log read for replays",
            replay_pages_read.clone(),
        );
        registry.register(
            "snapshots_read",
            "Snapshots read from the database",
            snapshots_read.clone(),
        );
        registry.register(
            "snapshots_kept",
            "Snapshots kept for their audience",
            snapshots_kept.clone(),
        );
        registry.register(
            "replays_waiting",
            "Replays waiting for their turn under --max-replays",
            replays_waiting.clone(),
        );
        registry.register(
            "delivery_lag_seconds",
            "From a change's capture to its routing",
            delivery_lag.clone(),
        );
        registry.register(
            "route_lag_seconds",
            "From the read of a change's page to its routing",
            route_lag.clone(),
        );
        registry.register(
            "send_wait_seconds",
            "From a message's queueing by the router to its write to the socket",
            send_wait.clone(),
        );
        registry.register(
            "rls_checks",
            "Batches of an entity with row-level security judged for its subscribers' groups",
            rls_checks.clone(),
        );
        registry.register(
            "access_epoch",
            "Changes of who may read what (grants, policies, owners, roles) the live stream is judged by",
            access_epoch.clone(),
        );
        registry.register(
            "wal_slot_retained_bytes",
            "WAL kept by the pg_sync replication slot (0 without one)",
            wal_retained_bytes.clone(),
        );
        registry.register(
            "replica_lag_seconds",
            "With --read-url: how long the standby took to replay up to the primary's position at the last wake-up",
            replica_lag.clone(),
        );
        Metrics {
            registry,
            connections,
            subscriptions,
            messages_sent,
            bytes_sent,
            changes_read,
            changes_pages_read,
            replay_pages_read,
            snapshots_read,
            snapshots_kept,
            replays_waiting,
            delivery_lag,
            route_lag,
            send_wait,
            rls_checks,
            access_epoch,
            wal_retained_bytes,
            replica_lag,
        }
    }
}

impl Metrics {
    /// A batch was routed; `captured_at` is its last change's capture time (ISO 8601 UTC),
    /// `read_at` when its page was read.
    pub fn record_routed(&self, changes: usize, captured_at: &str, read_at: tokio::time::Instant) {
        self.changes_read.inc_by(changes as u64);
        self.route_lag.observe(read_at.elapsed().as_secs_f64());
        if let Ok(captured) = humantime::parse_rfc3339(captured_at) {
            if let Ok(lag) = std::time::SystemTime::now().duration_since(captured) {
                self.delivery_lag.observe(lag.as_secs_f64());
            }
        }
    }

    /// A message of `bytes` was written to its socket, `waited` after the router queued it.
    pub fn record_sent(&self, bytes: usize, waited: std::time::Duration) {
        self.messages_sent.inc();
        self.bytes_sent.inc_by(bytes as u64);
        self.send_wait.observe(waited.as_secs_f64());
    }

    /// The Prometheus text exposition, with the WAL slot's retained bytes read just now.
    pub fn render(&self, wal_retained_bytes: i64) -> String {
        self.wal_retained_bytes.set(wal_retained_bytes);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric() {
        let metrics = Metrics::default();
        metrics.record_routed(3, "2026-11-22T16:00:00.123Z", tokio::time::Instant::now());
        let text = metrics.render(42);
        for name in [
            "sync_connections 0",
            "sync_messages_sent_total",
            "sync_changes_read_total 3",
            "sync_rls_checks_total",
            "sync_delivery_lag_seconds_bucket",
            "sync_send_wait_seconds_bucket",
            "sync_route_lag_seconds_bucket",
            "sync_wal_slot_retained_bytes 42",
            "sync_replica_lag_seconds 0",
            "sync_replays_waiting 0",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
    }
}
