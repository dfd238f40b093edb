//! The references the gateway's figures are read beside: a NOTIFY's round trip on loopback,
//! and a bare WebSocket server that only writes DELTA frames shaped like the gateway's (as
//! fast as it can, or one change of a random row `--rate` times a second to that row's
//! subscribers), with the clients that measure it as `fanout` and `latency` measure the
//! gateway.

use super::{
    database, drain, epoch_micros, latency_subscription, open, percentiles, read_all, total,
    xorshift, BareServer, Common,
};
use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// A DELTA frame shaped like the gateway's for `bench_item`, with `n` changes.
fn bare_frame(n: usize) -> String {
    bare_delta((0..n as u64).map(|i| (i, 123456)))
}

/// A DELTA of `bench_item` rows, each given as (id, seq).
fn bare_delta(rows: impl Iterator<Item = (u64, u64)>) -> String {
    let changes: Vec<Value> = rows
        .map(|(id, seq)| {
            json!({"entityId": id.to_string(), "action": "UPDATE",
                   "data": {"id": id, "team": "0", "seq": seq, "pad": "x".repeat(40)},
                   "changed": ["seq"], "schemaVersion": 1})
        })
        .collect();
    json!({"type": "DELTA", "payload": {"entityCode": "bench_item", "changes": changes,
           "timestamp": "2026-11-23T12:00:00.000Z",
           "cursor": "1.0123456789abcdef0123456789abcdef.1000_1000__123456_1000"}})
    .to_string()
}

type Utf8Bytes = tokio_tungstenite::tungstenite::Utf8Bytes;
/// With `--rate`: each row id's subscribed connections, as the queues their writers take from.
type Subscribers = Arc<
    std::sync::Mutex<std::collections::HashMap<String, Vec<tokio::sync::mpsc::Sender<Utf8Bytes>>>>,
>;

pub(super) async fn bare_server(b: BareServer) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&b.listen).await?;
    let frame = Utf8Bytes::from(bare_frame(b.changes_per_frame));
    let subscribers = Subscribers::default();
    if let Some(rate) = b.rate {
        tokio::spawn(bare_changes(subscribers.clone(), rate, b.rows));
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let (frame, subscribers, paced) = (frame.clone(), subscribers.clone(), b.rate.is_some());
        tokio::spawn(async move {
            let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            // Wait for the client's SUBSCRIBE, answer it, then write until it leaves.
            let Some(Ok(Message::Text(subscribe))) = socket.next().await else {
                return;
            };
            let subscribed = Message::text(r#"{"type":"SUBSCRIBED","payload":{}}"#);
            if socket.send(subscribed).await.is_err() {
                return;
            }
            if !paced {
                while socket.send(Message::Text(frame.clone())).await.is_ok() {}
                return;
            }
            let (queue, mut frames) = tokio::sync::mpsc::channel(1024);
            let request: Value = serde_json::from_str(&subscribe).unwrap_or_default();
            for id in request["payload"]["entityIds"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let id = id.as_str().unwrap_or_default().to_owned();
                subscribers
                    .lock()
                    .unwrap()
                    .entry(id)
                    .or_default()
                    .push(queue.clone());
            }
            while let Some(frame) = frames.recv().await {
                if socket.send(Message::Text(frame)).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// `rate` changes a second, each of a random row, sent to its subscribers: a one-change
/// DELTA whose `seq` is when it was sent (µs since the epoch).
async fn bare_changes(subscribers: Subscribers, rate: u64, rows: usize) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    loop {
        tick.tick().await;
        let id = xorshift(&mut rng) % rows as u64;
        let queues = subscribers
            .lock()
            .unwrap()
            .get(&id.to_string())
            .cloned()
            .unwrap_or_default();
        let frame = Utf8Bytes::from(bare_delta(std::iter::once((id, epoch_micros()))));
        for queue in queues {
            let _ = queue.try_send(frame.clone()); // a full queue: that client is not keeping up
        }
    }
}

/// The latency reference: as `latency`, against `bare-server --rate`.
pub(super) async fn bare_latency(c: Common) -> Result<Value> {
    let sockets = open(&c, c.connections, |i| latency_subscription(&c, i)).await?;
    let (start, started_at) = (Instant::now(), epoch_micros());
    let until = start + Duration::from_secs(c.seconds);
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|s| {
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                // Frames sent before the run (queued while the connections opened) are not counted.
                drain(s, until, start, |sent, at| {
                    if let Some(sent) = sent.filter(|&sent| sent >= started_at) {
                        latencies.push((started_at + at).saturating_sub(sent))
                    }
                })
                .await;
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for r in readers {
        latencies.extend(r.await?);
    }
    let mut report = percentiles(latencies);
    let run = json!({"mode": "bare_latency", "connections": c.connections,
                     "ids_per_connection": c.ids_per_connection, "seconds": c.seconds});
    report
        .as_object_mut()
        .unwrap()
        .extend(run.as_object().unwrap().clone());
    Ok(report)
}

pub(super) async fn bare_fanout(c: Common) -> Result<Value> {
    let sockets = open(&c, c.connections, |_| json!({"entityCode": "bench_item"})).await?;
    let start = Instant::now();
    let (messages, changes) = total(read_all(
        sockets,
        start + Duration::from_secs(c.seconds),
        start,
    ))
    .await?;
    let secs = c.seconds as f64;
    Ok(json!({
        "mode": "bare_fanout", "connections": c.connections, "seconds": c.seconds,
        "messages_per_s": (messages as f64 / secs).round(), "changes_per_s": (changes as f64 / secs).round(),
    }))
}

/// The reference for latency: a NOTIFY's round trip, from the sending statement to the
/// listening connection receiving it.
pub(super) async fn notify(c: Common) -> Result<Value> {
    use tokio_postgres::AsyncMessage;
    let (listener, mut connection) =
        tokio_postgres::connect(&c.database_url, tokio_postgres::NoTls)
            .await
            .context("connecting")?;
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(_) = message {
                let _ = arrived.send(Instant::now());
            }
        }
    });
    listener.batch_execute("LISTEN bench_round_trip").await?;
    let sender = database(&c.database_url).await?;
    let end = Instant::now() + Duration::from_secs(c.seconds);
    let mut samples = Vec::new();
    while Instant::now() < end {
        let sent = Instant::now();
        sender.batch_execute("NOTIFY bench_round_trip").await?;
        let at = arrivals.recv().await.context("the listener ended")?;
        samples.push(at.duration_since(sent).as_micros() as u64);
    }
    let mut report = percentiles(samples);
    report["mode"] = json!("notify");
    Ok(report)
}
