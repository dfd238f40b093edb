//! Waiting before trying again after the database failed: one helper for every task that
//! reconnects or retries (the reader, LISTEN, the subscription mirror, WAL ingest).

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Doubling waits from 100 ms to 5 s.
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    /// Waits; false when the gateway is stopping.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = shutdown.cancelled() => false,
        }
    }
}
