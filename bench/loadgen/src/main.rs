//! `sync-loadgen`: drives a running gateway and reports what it measured, one JSON line per
//! run. It is its own process so that the gateway's numbers are the gateway's; on a small
//! machine the two still share the cores, and the report says so.
//!
//! - `latency`: N connections, each subscribed (delta) to K rows of `bench_item`; writers
//!   update random rows at a fixed rate and note when each commit returned; every client
//!   notes when each change arrived. Reports commit-to-client percentiles.
//! - `fanout`: N connections subscribed to the whole entity; writers commit single-row
//!   updates as fast as they can; reports messages and changes delivered per second.
//! - `idle`: opens N connections holding one subscription each and reports the gateway's
//!   resident memory per connection.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Latency(Common),
    Fanout(Common),
    Idle(Common),
}

#[derive(Args, Clone)]
struct Common {
    /// The gateway's address, host:port.
    #[arg(long)]
    gateway: String,
    #[arg(long)]
    database_url: String,
    #[arg(long)]
    secret: String,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Rows of bench_item each connection subscribes to (latency).
    #[arg(long, default_value_t = 10)]
    ids_per_connection: usize,
    /// Rows in bench_item.
    #[arg(long, default_value_t = 1000)]
    rows: usize,
    /// Commits per second (latency).
    #[arg(long, default_value_t = 500)]
    rate: u64,
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// The gateway's process id (idle).
    #[arg(long)]
    gateway_pid: Option<u32>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let report = match Cli::parse().command {
        Mode::Latency(c) => latency(c).await?,
        Mode::Fanout(c) => fanout(c).await?,
        Mode::Idle(c) => idle(c).await?,
    };
    println!("{report}");
    Ok(())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn token(secret: &str, sub: &str) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = json!({"sub": sub, "exp": exp});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Opens `n` connections (200 handshakes at a time), each subscribed with `payload(i)`.
async fn open(c: &Common, n: usize, payload: impl Fn(usize) -> Value) -> Result<Vec<Socket>> {
    let gate = Arc::new(Semaphore::new(200));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let url = format!(
            "ws://{}/ws/sync?token={}",
            c.gateway,
            token(&c.secret, &format!("user{i}"))
        );
        let subscribe = json!({"type": "SUBSCRIBE", "payload": payload(i)}).to_string();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
            socket.send(Message::text(subscribe)).await?;
            loop {
                match socket.next().await {
                    Some(Ok(Message::Text(t))) if t.contains("SUBSCRIBED") => {
                        return Ok::<_, anyhow::Error>(socket)
                    }
                    Some(Ok(Message::Text(t))) => bail!("unexpected answer: {t}"),
                    Some(Ok(_)) => continue,
                    _ => bail!("connection closed while subscribing"),
                }
            }
        }));
    }
    let mut sockets = Vec::with_capacity(n);
    for t in tasks {
        sockets.push(t.await??);
    }
    Ok(sockets)
}

async fn database(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting")?;
    tokio::spawn(connection);
    Ok(client)
}

async fn prepare_table(c: &Common) -> Result<()> {
    let db = database(&c.database_url).await?;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS bench_item;
         CREATE TABLE bench_item (id int PRIMARY KEY, seq bigint NOT NULL DEFAULT 0, pad text);
         INSERT INTO bench_item SELECT g, 0, repeat('x', 40) FROM generate_series(0, {}) g;
         SELECT sync.track('bench_item');",
        c.rows - 1
    ))
    .await?;
    Ok(())
}

/// Writers updating `bench_item`: at `rate` per second in all (None: as fast as they can),
/// for `seconds`. Returns, per sequence number, when its commit returned (µs since `start`).
async fn write(c: &Common, rate: Option<u64>, start: Instant) -> Result<Arc<Vec<AtomicU64>>> {
    const WRITERS: u64 = 4;
    let capacity = rate.unwrap_or(20_000) * c.seconds * 2 + 1;
    let commits: Arc<Vec<AtomicU64>> = Arc::new((0..capacity).map(|_| AtomicU64::new(0)).collect());
    let next = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let db = database(&c.database_url).await?;
        let (commits, next, rows, seconds) =
            (commits.clone(), next.clone(), c.rows as u64, c.seconds);
        tasks.push(tokio::spawn(async move {
            let update = db
                .prepare("UPDATE bench_item SET seq = $1 WHERE id = $2")
                .await?;
            let end = start + Duration::from_secs(seconds);
            let mut tick = rate.map(|r| {
                let period = Duration::from_secs_f64(WRITERS as f64 / r as f64);
                let mut i = tokio::time::interval_at(
                    (start + period * w as u32 / WRITERS as u32).into(),
                    period,
                );
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1);
            while Instant::now() < end {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let seq = next.fetch_add(1, Ordering::SeqCst);
                if seq as usize >= commits.len() {
                    break;
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let id = (rng % rows) as i32;
                db.execute(&update, &[&(seq as i64), &id]).await?;
                commits[seq as usize].store(start.elapsed().as_micros() as u64, Ordering::SeqCst);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(commits)
}

/// Reads a socket until `until`, calling `on_change(seq, received_at_us)` for DELTA changes;
/// returns (messages, changes).
async fn drain(
    mut socket: Socket,
    until: Instant,
    start: Instant,
    mut on_change: impl FnMut(u64, u64),
) -> (u64, u64) {
    let (mut messages, mut changes) = (0, 0);
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until.into(), socket.next()).await {
        let Message::Text(text) = frame else { continue };
        let at = start.elapsed().as_micros() as u64;
        messages += 1;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        for change in value["payload"]["changes"].as_array().into_iter().flatten() {
            changes += 1;
            if let Some(seq) = change["data"]["seq"].as_u64() {
                on_change(seq, at);
            }
        }
    }
    (messages, changes)
}

async fn latency(c: Common) -> Result<Value> {
    prepare_table(&c).await?;
    let (rows, k) = (c.rows, c.ids_per_connection);
    let sockets = open(&c, c.connections, |i| {
        let ids: Vec<String> = (0..k).map(|j| ((i * k + j) % rows).to_string()).collect();
        json!({"entityCode": "bench_item", "entityIds": ids, "mode": "delta"})
    })
    .await?;
    let start = Instant::now();
    let until = start + Duration::from_secs(c.seconds + 3);
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|s| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let counts = drain(s, until, start, |seq, at| seen.push((seq, at))).await;
                (seen, counts)
            })
        })
        .collect();
    let commits = write(&c, Some(c.rate), start).await?;
    let mut latencies = Vec::new();
    let mut messages = 0;
    for r in readers {
        let (seen, (m, _)) = r.await?;
        messages += m;
        for (seq, at) in seen {
            let committed = commits
                .get(seq as usize)
                .map(|a| a.load(Ordering::SeqCst))
                .unwrap_or(0);
            if committed > 0 {
                latencies.push(at.saturating_sub(committed));
            }
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .map(|us| *us as f64 / 1000.0)
    };
    let committed = commits
        .iter()
        .filter(|a| a.load(Ordering::SeqCst) > 0)
        .count();
    Ok(json!({
        "mode": "latency", "connections": c.connections, "ids_per_connection": k, "rate": c.rate,
        "seconds": c.seconds, "commits": committed, "deliveries": latencies.len(), "messages": messages,
        "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "max_ms": pct(1.0),
    }))
}

async fn fanout(c: Common) -> Result<Value> {
    prepare_table(&c).await?;
    let sockets = open(&c, c.connections, |_| json!({"entityCode": "bench_item"})).await?;
    let start = Instant::now();
    let until = start + Duration::from_secs(c.seconds);
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|s| tokio::spawn(async move { drain(s, until, start, |_, _| {}).await }))
        .collect();
    let commits = write(&c, None, start).await?;
    let (mut messages, mut changes) = (0u64, 0u64);
    for r in readers {
        let (m, ch) = r.await?;
        messages += m;
        changes += ch;
    }
    let committed = commits
        .iter()
        .filter(|a| a.load(Ordering::SeqCst) > 0)
        .count();
    let secs = c.seconds as f64;
    Ok(json!({
        "mode": "fanout", "connections": c.connections, "seconds": c.seconds, "commits": committed,
        "messages_per_s": (messages as f64 / secs).round(), "changes_per_s": (changes as f64 / secs).round(),
    }))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

async fn idle(c: Common) -> Result<Value> {
    let pid = c.gateway_pid.context("--gateway-pid is required")?;
    prepare_table(&c).await?;
    let before = rss_kib(pid)?;
    let rows = c.rows;
    let sockets = open(
        &c,
        c.connections,
        |i| json!({"entityCode": "bench_item", "entityIds": [(i % rows).to_string()]}),
    )
    .await?;
    // Let allocations settle, then read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    drop(sockets);
    Ok(json!({
        "mode": "idle", "connections": c.connections, "rss_before_kib": before, "rss_after_kib": after,
        "kib_per_connection": ((after.saturating_sub(before)) as f64 / c.connections as f64 * 10.0).round() / 10.0,
    }))
}
