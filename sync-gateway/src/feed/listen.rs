//! Wake-ups: a dedicated connection LISTENs on `sync_changes` (reconnecting with back-off)
//! and turns notifications into a wake-up of the reader. Notifications sent while it was
//! disconnected are lost, so every (re)connection wakes the reader at once.

use crate::backoff::Backoff;
use futures_util::StreamExt;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

pub async fn listen(
    config: tokio_postgres::Config,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
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
