//! The change reader: once per gateway, not per connection. A dedicated connection LISTENs
//! on `sync_changes` (reconnecting with backoff); a NOTIFY, or the poll interval when none
//! comes, starts a read that pages through the log from the gateway's position and hands
//! each page to the router. Notifications arriving during a read coalesce into one more read.
//! After a reconnect it reads at once: notifications sent while disconnected are lost.

use crate::log::{current_cursor, read_page, ReadError};
use crate::router::{Batch, Command};
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

/// Changes read per query.
const PAGE: i32 = 1000;

pub struct Reader {
    pub pool: Pool,
    pub listen_config: tokio_postgres::Config,
    pub poll_interval: Duration,
    pub router: mpsc::Sender<Command>,
    /// Set once the first read succeeded (for /readyz), cleared while reads fail.
    pub ready: Arc<AtomicBool>,
}

impl Reader {
    pub async fn run(self, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        tokio::spawn(listen(
            self.listen_config.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
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
        // The live stream starts now: subscriptions without `since` begin here.
        if self
            .router
            .send(Command::Batch(Arc::new(Batch {
                changes: vec![],
                end: position.clone(),
                complete: true,
            })))
            .await
            .is_err()
        {
            return;
        }
        loop {
            match self.drain(&mut position).await {
                Ok(()) => {
                    self.ready.store(true, Ordering::SeqCst);
                    backoff = Backoff::default();
                }
                Err(ReadError::Expired(why)) => {
                    tracing::warn!(%why, "the gateway's cursor expired; clients resynchronise");
                    if let Ok(now) = self.start_position().await {
                        position = now.clone();
                        let _ = self.router.send(Command::Reset(now)).await;
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
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn start_position(&self) -> Result<String, ReadError> {
        let client = self.pool.get().await?;
        Ok(current_cursor(&client).await?)
    }

    /// Reads pages until the log is drained, handing each to the router.
    async fn drain(&self, position: &mut String) -> Result<(), ReadError> {
        let mut client = self.pool.get().await?;
        loop {
            let page = read_page(&mut client, Some(position), PAGE, None).await?;
            if !page.changes.is_empty() || page.end != *position {
                *position = page.end.clone();
                let batch = Batch {
                    changes: page.changes,
                    end: page.end,
                    complete: !page.more,
                };
                if self
                    .router
                    .send(Command::Batch(Arc::new(batch)))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            if !page.more {
                return Ok(());
            }
        }
    }
}

/// Keeps a LISTEN connection open and turns notifications into wake-ups.
async fn listen(config: tokio_postgres::Config, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut backoff = Backoff::default();
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                // tokio-postgres hands out notifications only to whoever polls the connection.
                let wake_on_message = wake.clone();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(_)) => wake_on_message.notify_one(),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %crate::ErrorChain(&e), "LISTEN connection lost");
                                return;
                            }
                        }
                    }
                });
                if let Err(e) = client.batch_execute("LISTEN sync_changes").await {
                    tracing::warn!(error = %crate::ErrorChain(&e), "LISTEN failed");
                } else {
                    backoff = Backoff::default();
                    wake.notify_one(); // catch up on what was missed while disconnected
                    tokio::select! {
                        _ = driver => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::ErrorChain(&e), "cannot open the LISTEN connection")
            }
        }
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}

/// Doubling waits from 100 ms to 5 s.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    /// Waits; false when the gateway is stopping.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = shutdown.cancelled() => false,
        }
    }
}
