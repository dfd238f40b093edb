//! Counters for `/metrics` (Prometheus text) and `/v1/status`: plain atomics, bumped where
//! things happen, read when scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicI64,
    pub subscriptions: AtomicI64,
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub changes_read: AtomicU64,
    /// Milliseconds between the capture of the last routed change and its routing.
    pub delivery_lag_ms: AtomicU64,
    pub rls_checks: AtomicU64,
    pub rls_check_micros: AtomicU64,
}

impl Metrics {
    pub fn record_rls_check(&self, took: Duration) {
        self.rls_checks.fetch_add(1, Relaxed);
        self.rls_check_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// A batch was routed; `captured_at` is its last change's capture time (ISO 8601 UTC).
    pub fn record_routed(&self, changes: usize, captured_at: &str) {
        self.changes_read.fetch_add(changes as u64, Relaxed);
        if let Some(captured) = parse_utc_millis(captured_at) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            self.delivery_lag_ms
                .store((now.as_millis() as u64).saturating_sub(captured), Relaxed);
        }
    }

    pub fn record_sent(&self, bytes: usize) {
        self.messages_sent.fetch_add(1, Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Relaxed);
    }

    /// The Prometheus text exposition, with the WAL slot's retained bytes read just now.
    pub fn render(&self, wal_retained_bytes: i64) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "sync_connections",
            "gauge",
            "Open WebSocket connections.",
            self.connections.load(Relaxed).to_string(),
        );
        metric(
            "sync_subscriptions",
            "gauge",
            "Subscriptions held (ids count one each).",
            self.subscriptions.load(Relaxed).to_string(),
        );
        metric(
            "sync_messages_sent_total",
            "counter",
            "Messages sent to clients.",
            self.messages_sent.load(Relaxed).to_string(),
        );
        metric(
            "sync_bytes_sent_total",
            "counter",
            "Bytes of messages sent to clients.",
            self.bytes_sent.load(Relaxed).to_string(),
        );
        metric(
            "sync_changes_read_total",
            "counter",
            "Changes read from the log.",
            self.changes_read.load(Relaxed).to_string(),
        );
        let lag = self.delivery_lag_ms.load(Relaxed) as f64 / 1000.0;
        metric(
            "sync_delivery_lag_seconds",
            "gauge",
            "From capture to routing, for the last routed change.",
            lag.to_string(),
        );
        metric(
            "sync_rls_checks_total",
            "counter",
            "Row-level-security checks (one per entity and group of users per batch).",
            self.rls_checks.load(Relaxed).to_string(),
        );
        let seconds = self.rls_check_micros.load(Relaxed) as f64 / 1e6;
        metric(
            "sync_rls_check_seconds_total",
            "counter",
            "Time spent in row-level-security checks.",
            seconds.to_string(),
        );
        metric(
            "sync_wal_slot_retained_bytes",
            "gauge",
            "WAL kept by the pg_sync replication slot (0 without one).",
            wal_retained_bytes.to_string(),
        );
        out
    }
}

/// Milliseconds since the Unix epoch of `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn parse_utc_millis(text: &str) -> Option<u64> {
    let n = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, s, ms) = (n(11..13)?, n(14..16)?, n(17..19)?, n(20..23)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 24 + h) * 60 + mi) * 60_000 + s * 1000 + ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_times_parse() {
        assert_eq!(parse_utc_millis("1970-01-01T00:00:01.500Z"), Some(1500));
        assert_eq!(
            parse_utc_millis("2026-11-22T16:00:00.123Z"),
            Some(1_795_363_200_123)
        );
        assert_eq!(parse_utc_millis("garbage"), None);
    }

    #[test]
    fn the_exposition_names_every_metric() {
        let text = Metrics::default().render(42);
        for name in [
            "sync_connections",
            "sync_messages_sent_total",
            "sync_rls_checks_total",
            "sync_wal_slot_retained_bytes 42",
        ] {
            assert!(text.contains(name), "{name}");
        }
    }
}
