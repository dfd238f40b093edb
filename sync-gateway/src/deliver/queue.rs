//! A connection's send queue, bounded in bytes: the router, its only writer, queues without
//! ever waiting (a connection over its bound is closed with 4008 and resumes from its
//! cursor), and the connection's writer frees room as it sends. Replays wait for room before
//! they hand the router their next page. Counting bytes, not messages, is what keeps memory
//! bounded when messages carry hundreds of changes; hand-written because tokio's bounded
//! channels count messages.

use axum::extract::ws::Utf8Bytes;
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

/// The sending side: the router pushes, replays wait for room.
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::UnboundedSender<(Utf8Bytes, Instant)>,
    room: Arc<Semaphore>,
    limit: usize,
}

/// The receiving side, the connection's writer.
pub struct Queue {
    /// Each message with when it was queued (the gateway's own share of delivery time).
    rx: mpsc::UnboundedReceiver<(Utf8Bytes, Instant)>,
    room: Arc<Semaphore>,
    limit: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Over the byte bound: the client is not keeping up.
    Full,
    /// The connection is gone.
    Closed,
}

/// A queue holding at most `limit` bytes (a single larger message still fits alone).
pub fn channel(limit: usize) -> (Outbound, Queue) {
    let limit = limit.clamp(1, u32::MAX as usize);
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(limit));
    (
        Outbound {
            tx,
            room: room.clone(),
            limit,
        },
        Queue { rx, room, limit },
    )
}

fn cost(text: &str, limit: usize) -> u32 {
    text.len().clamp(1, limit) as u32
}

impl Outbound {
    /// Queues now, or refuses.
    pub fn try_push(&self, text: Utf8Bytes) -> Result<(), Refused> {
        let permit = self
            .room
            .try_acquire_many(cost(&text, self.limit))
            .map_err(|_| Refused::Full)?;
        self.tx
            .send((text, Instant::now()))
            .map_err(|_| Refused::Closed)?;
        permit.forget();
        Ok(())
    }

    /// Waits until at least half the bound is free (Err once the connection is gone).
    pub async fn wait_for_room(&self) -> Result<(), Refused> {
        let half = (self.limit / 2).max(1) as u32;
        let room = self
            .room
            .acquire_many(half)
            .await
            .map_err(|_| Refused::Closed)?;
        drop(room);
        Ok(())
    }
}

impl Drop for Queue {
    /// Whoever waits for room learns the connection is gone.
    fn drop(&mut self) {
        self.room.close();
    }
}

impl Queue {
    /// The next message and when it was queued, its room given back.
    pub async fn next(&mut self) -> Option<(Utf8Bytes, Instant)> {
        let (text, queued_at) = self.rx.recv().await?;
        self.room.add_permits(cost(&text, self.limit) as usize);
        Some((text, queued_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_bound_is_in_bytes_and_frees_as_messages_leave() {
        let (outbound, mut queue) = channel(10);
        assert_eq!(outbound.try_push("12345".into()), Ok(()));
        assert_eq!(outbound.try_push("123456".into()), Err(Refused::Full));
        assert_eq!(outbound.try_push("12345".into()), Ok(()));
        assert_eq!(
            queue.next().await.as_ref().map(|(t, _)| t.as_str()),
            Some("12345")
        );
        assert_eq!(outbound.try_push("123".into()), Ok(()));
        // A message larger than the bound goes alone.
        let (outbound, _queue) = channel(4);
        assert_eq!(outbound.try_push("123456789".into()), Ok(()));
        assert_eq!(outbound.try_push("1".into()), Err(Refused::Full));
    }

    #[tokio::test]
    async fn a_waiter_for_room_learns_when_the_connection_goes() {
        let (outbound, queue) = channel(10);
        outbound.try_push("1234567890".into()).unwrap();
        let waiting = tokio::spawn(async move { outbound.wait_for_room().await });
        drop(queue);
        assert_eq!(waiting.await.unwrap(), Err(Refused::Closed));
    }
}
