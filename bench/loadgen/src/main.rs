//! `sync-loadgen`: drives a running gateway and reports what it measured, one JSON line per
//! run. It is its own process so that the gateway's numbers are the gateway's; on a small
//! machine the two still share the cores, and the report says so.
//!
//! - `latency`: N connections, each subscribed (delta) to K rows of `bench_item`; writers
//!   update random rows at a fixed rate and note when each commit returned; every client
//!   notes when each change arrived. Reports commit-to-client percentiles.
//! - `fanout`: N connections subscribed to the whole entity; writers commit single-row
//!   updates as fast as they can; reports messages and changes delivered per second. With
//!   `--backlog`, the changes are written while the gateway is paused and read at full
//!   speed once it resumes: the gateway's limit, not the writers' (which share its cores).
//! - `idle`: opens N connections holding one subscription each and reports the gateway's
//!   resident memory per connection.
//! - `snapshot`: streams `GET /v1/snapshot` of a table of `--rows` rows; reports rows per
//!   second and the gateway's peak resident memory.
//! - `cold-start`: `--connections` clients fetch the snapshot of a table of `--rows` rows at
//!   once, retrying when refused; reports the seconds and the snapshots the gateway read
//!   (its `--admin` metrics).
//!
//! - `notify`: the reference for latency: a NOTIFY's round trip on loopback, from the
//!   sending statement to the listening connection receiving it.
//! - `catchup`: `--changes` changes committed while a client is away (1,000 per
//!   transaction); the time to read them with `sync.changes_since` alone (pages of 10,000,
//!   as a gateway would) and the time for a client resubscribing with `since` to get them all.
//! - `enter`: a project of `--rows` tasks behind a compiled membership policy; a user joins it
//!   and leaves it again, `--rounds` times. Reports the time from the membership's commit to
//!   the user's copy holding the project's rows (the RESYNC, then the refetch in full), and
//!   beside it the same refetch alone, with no membership change. The other `--connections`
//!   are other users of another project, subscribed to the same tasks: the RESYNCs they
//!   receive are counted (a membership write concerns only the user it names).
//! - `bare-server` and `bare-fanout`: the reference for fan-out: a WebSocket server that
//!   only writes the same DELTA frame (`--changes-per-frame` changes) to every connection
//!   as fast as it can, and the clients that count what arrives, as `fanout` does.
//! - `bare-server --rate R` and `bare-latency`: the reference for latency: the server changes
//!   a random row R times a second and sends its one-change DELTA to the connections that
//!   subscribed to that row's id, stamped with the time it was sent; the clients subscribe as
//!   `latency` does and measure stamp → arrival.
//!
//! With `--primary-data DIR` (catchup, snapshot), the report adds the CPU time the primary
//! cluster of that data directory spent while the gateway served (its postmaster and every
//! backend, live and exited); with `--replica-url`, the gateway's part starts once that
//! standby has replayed what was written.
//!
//! With `--rls-claim-sets N`, `bench_item` has row-level security: row `id` belongs to team
//! `id % N`, connection `i` is in team `i % N` (a claim of its token), and sees its team's rows.
//! The policy compares the row's team with the claim, which the gateway compiles; with
//! `--rls-subquery` it looks the user's team up in a membership table instead
//! (`team IN (SELECT …)`), which the gateway compiles too and reads per page. With
//! `--rls-one-team`, every row and every user are of team 0 instead: each change reaches every
//! subscriber, as without RLS, and the policy is still judged for as many claim sets as there
//! are connections (each token its own `sub`; the claim policy matches a `teams` claim naming
//! team 0 and one of the user's own, `claims -> 'teams' ? team`).

mod cold_start;
mod membership;
mod memory;
mod primary;
mod reference;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use primary::{replayed, PrimaryCpu};
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
    Snapshot(Common),
    ColdStart(Common),
    Notify(Common),
    Catchup(Common),
    Enter(Common),
    BareServer(BareServer),
    BareFanout(Common),
    BareLatency(Common),
}

#[derive(Args, Clone)]
struct BareServer {
    #[arg(long)]
    listen: String,
    #[arg(long, default_value_t = 1)]
    changes_per_frame: usize,
    /// Changes per second sent to the connections subscribed to each changed row (the latency
    /// reference); without it, frames are written as fast as possible (the fan-out reference).
    #[arg(long)]
    rate: Option<u64>,
    /// Rows the changes pick from (with `--rate`).
    #[arg(long, default_value_t = 1000)]
    rows: usize,
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
    /// The gateway's process id (idle, snapshot).
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Row-level security with this many distinct claim sets (0: none).
    #[arg(long, default_value_t = 0)]
    rls_claim_sets: usize,
    /// With row-level security: a membership-subquery policy.
    #[arg(long)]
    rls_subquery: bool,
    /// With row-level security: every row and every user in one team, so that each change
    /// reaches every subscriber through a claim set of its own.
    #[arg(long)]
    rls_one_team: bool,
    /// Without row-level security, this many subscription filters (0: none): connection `i`
    /// subscribes to the rows of team `i % N`, so that each change reaches the subscribers
    /// it reaches with N claim sets (the reference of those rows: the same deliveries).
    #[arg(long, default_value_t = 0)]
    filter_sets: usize,
    /// Rows each writer's transaction updates (fan-out): with many claim sets a change
    /// reaches few subscribers, and single-row commits would measure PostgreSQL's commit
    /// rate rather than the gateway.
    #[arg(long, default_value_t = 1)]
    rows_per_commit: usize,
    /// Changes missed while away (catchup); changes written while the gateway is paused
    /// (fanout --backlog).
    #[arg(long, default_value_t = 1_000_000)]
    changes: usize,
    /// Fan-out of a backlog: `--changes` changes are written while the gateway (its
    /// `--gateway-pid`) is paused, then it resumes and reads them at full speed, with no
    /// writer sharing the cores; reports deliveries per second from the resume to the last.
    #[arg(long)]
    backlog: bool,
    /// The primary's data directory: report its CPU time while the gateway serves.
    #[arg(long)]
    primary_data: Option<String>,
    /// A standby the gateway reads from: wait for its replay before the gateway's part.
    #[arg(long)]
    replica_url: Option<String>,
    /// Joins and leaves (enter).
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// The gateway's admin listener, host:port (cold-start reads its metrics).
    #[arg(long)]
    admin: Option<String>,
    /// The gateway shares snapshots (`--snapshot-share-for`): labels the cold-start report.
    #[arg(long)]
    shared_snapshots: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let report = match Cli::parse().command {
        Mode::Latency(c) => latency(c).await?,
        Mode::Fanout(c) => fanout(c).await?,
        Mode::Idle(c) => memory::idle(c).await?,
        Mode::Snapshot(c) => memory::snapshot(c).await?,
        Mode::ColdStart(c) => cold_start::cold_start(c).await?,
        Mode::Notify(c) => reference::notify(c).await?,
        Mode::Catchup(c) => catchup(c).await?,
        Mode::Enter(c) => membership::enter(c).await?,
        Mode::BareServer(b) => return reference::bare_server(b).await,
        Mode::BareFanout(c) => reference::bare_fanout(c).await?,
        Mode::BareLatency(c) => reference::bare_latency(c).await?,
    };
    println!("{report}");
    Ok(())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next message the server sends, as JSON (control frames passed over).
async fn next_message(socket: &mut Socket) -> Result<Value> {
    loop {
        let frame = socket.next().await.context("connection closed")??;
        if let Message::Text(text) = frame {
            return Ok(serde_json::from_str(&text)?);
        }
    }
}

/// The token of connection `i`: its own user and, with RLS, its team.
fn token(c: &Common, i: usize) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut claims = json!({"sub": format!("user{i}"), "exp": exp});
    if c.rls_claim_sets > 0 {
        claims["role"] = json!("bench_user");
        if c.rls_one_team {
            claims["teams"] = json!(["0", format!("own{i}")]);
        } else {
            claims["team"] = json!((i % c.rls_claim_sets).to_string());
        }
    }
    let key = EncodingKey::from_secret(c.secret.as_bytes());
    encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

/// A GET over HTTP/1.1 (the body read to the connection's end): the status, `Retry-After`,
/// and the body (chunked framing left in: callers count lines or rows in it).
async fn http_get(
    address: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, Option<u64>, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("an HTTP answer")?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("a status")?;
    let retry_after = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("retry-after")
            .then(|| value.trim().parse().ok())
            .flatten()
    });
    Ok((status, retry_after, answer[split + 4..].to_vec()))
}

/// A connection, subscribed with `subscribe`.
struct Subscriber {
    socket: Socket,
    subscribe: String,
}

/// Opens `n` connections (200 handshakes at a time), each subscribed with `payload(i)`.
async fn open(c: &Common, n: usize, payload: impl Fn(usize) -> Value) -> Result<Vec<Subscriber>> {
    let gate = Arc::new(Semaphore::new(200));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let url = format!("ws://{}/ws/sync?token={}", c.gateway, token(c, i));
        let subscribe = json!({"type": "SUBSCRIBE", "payload": payload(i)}).to_string();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let mut socket = connect(&url).await?;
            socket.send(Message::text(subscribe.clone())).await?;
            loop {
                match socket.next().await {
                    Some(Ok(Message::Text(t))) if t.contains("SUBSCRIBED") => {
                        return Ok::<_, anyhow::Error>(Subscriber { socket, subscribe });
                    }
                    // Checked against the gateway's catalog from before the table was made
                    // again for this run: subscribe again, as a client would, once the
                    // gateway has had a moment to read the log that far.
                    Some(Ok(Message::Text(t))) if t.contains("entity_changed") => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        socket.send(Message::text(subscribe.clone())).await?;
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

/// The load generator's sockets read in chunks of 16 KiB, not tungstenite's 128 KiB: each read
/// zeroes its chunk first, and with 1,000 sockets that was 7 % of the machine's CPU during a
/// fan-out, taken from the gateway it shares the cores with.
fn client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// Connects as a client should: refused for now (503, the gateway's admission rate), it comes
/// back after the `Retry-After` it was told, spread over a second.
async fn connect(url: &str) -> Result<Socket> {
    use tokio_tungstenite::tungstenite::Error;
    let mut spread = url.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    loop {
        match tokio_tungstenite::connect_async_with_config(url, Some(client_config()), false).await
        {
            Ok((socket, _)) => return Ok(socket),
            Err(Error::Http(refusal)) if refusal.status() == 503 => {
                let after: u64 = refusal
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1);
                spread = spread
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let jitter = Duration::from_millis((spread >> 33) % 1000);
                tokio::time::sleep(Duration::from_secs(after) + jitter).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
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
    let teams = teams(c).max(1);
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS bench_item;
         CREATE TABLE bench_item (id int PRIMARY KEY, team text NOT NULL, seq bigint NOT NULL DEFAULT 0, pad text);
         INSERT INTO bench_item SELECT g, (g % {teams})::text, 0, repeat('x', 40) FROM generate_series(0, {}) g;
         SELECT sync.track('bench_item');",
        c.rows - 1
    ))
    .await?;
    if c.rls_claim_sets > 0 {
        db.batch_execute(
            "DO $$ BEGIN CREATE ROLE bench_user NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             GRANT SELECT ON bench_item TO bench_user;
             ALTER TABLE bench_item ENABLE ROW LEVEL SECURITY;",
        )
        .await?;
    }
    if c.rls_claim_sets > 0 && c.rls_subquery {
        db.batch_execute(&format!(
            "DROP TABLE IF EXISTS bench_member;
             CREATE TABLE bench_member (user_id text PRIMARY KEY, team text NOT NULL);
             INSERT INTO bench_member SELECT 'user' || g, (g % {teams})::text FROM generate_series(0, {}) g;
             GRANT SELECT ON bench_member TO bench_user;
             CREATE POLICY team ON bench_item USING (team IN (
                 SELECT m.team FROM bench_member m
                  WHERE m.user_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));",
            c.connections - 1
        ))
        .await?;
    } else if c.rls_claim_sets > 0 && c.rls_one_team {
        db.batch_execute(
            "CREATE POLICY team ON bench_item
                 USING ((current_setting('request.jwt.claims', true)::jsonb -> 'teams') ? team);",
        )
        .await?;
    } else if c.rls_claim_sets > 0 {
        db.batch_execute(
            "CREATE POLICY team ON bench_item
                 USING (team = current_setting('request.jwt.claims', true)::jsonb ->> 'team');",
        )
        .await?;
    }
    // A gateway reading a standby knows the table once the standby has it.
    replayed(c, &db).await
}

/// Connections writing `bench_item` at once (`write`, `write_blocks`), each on rows of its own.
const WRITERS: u64 = 4;

/// Writers updating `bench_item`: at `rate` per second in all (None: as fast as they can),
/// for `seconds`. Returns, per sequence number, when its commit returned (µs since `start`).
async fn write(c: &Common, rate: Option<u64>, start: Instant) -> Result<Arc<Vec<AtomicU64>>> {
    let capacity = rate.unwrap_or(20_000) * c.seconds * 2 + 1;
    let commits: Arc<Vec<AtomicU64>> = Arc::new((0..capacity).map(|_| AtomicU64::new(0)).collect());
    let next = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let db = database(&c.database_url).await?;
        let (commits, next, rows, seconds, per_commit) = (
            commits.clone(),
            next.clone(),
            c.rows as u64,
            c.seconds,
            c.rows_per_commit.max(1),
        );
        tasks.push(tokio::spawn(async move {
            let own_rows = (rows / WRITERS).max(1);
            let update = db
                .prepare("UPDATE bench_item SET seq = $1 WHERE id = ANY ($2)")
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
                // Each writer updates rows of its own (`id % WRITERS == w`): writers never
                // wait for each other's locks, so large transactions commit at full speed.
                let ids: std::collections::BTreeSet<i32> = (0..per_commit)
                    .map(|_| ((xorshift(&mut rng) % own_rows) * WRITERS + w) as i32)
                    .collect();
                let ids: Vec<i32> = ids.into_iter().collect();
                db.execute(&update, &[&(seq as i64), &ids]).await?;
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

/// Reads a socket until `until`, calling `on_change(seq, received_at_us)` for every change
/// (`seq`: its `data.seq`, which DELTA changes carry);
/// returns (messages, changes). A RESYNC is answered as a client does, by subscribing again
/// (from the live position: these runs count live changes only). The gateway sends one when
/// it read the table's last change of definition (the run's RLS set-up) after the SUBSCRIBE.
async fn drain(
    Subscriber {
        mut socket,
        subscribe,
    }: Subscriber,
    until: Instant,
    start: Instant,
    mut on_change: impl FnMut(Option<u64>, u64),
) -> (u64, u64) {
    let (mut messages, mut changes) = (0, 0);
    // A stream that is always ready never times out: the deadline is checked as well.
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until.into(), socket.next()).await {
        if Instant::now() >= until {
            break;
        }
        let Message::Text(text) = frame else { continue };
        let at = start.elapsed().as_micros() as u64;
        messages += 1;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if value["type"] == "RESYNC" && socket.send(Message::text(subscribe.clone())).await.is_err()
        {
            break;
        }
        for change in value["payload"]["changes"].as_array().into_iter().flatten() {
            changes += 1;
            on_change(change["data"]["seq"].as_u64(), at);
        }
    }
    (messages, changes)
}

/// Connection `i`'s subscription in the latency runs: `ids_per_connection` rows of its own.
fn latency_subscription(c: &Common, i: usize) -> Value {
    let (rows, k) = (c.rows, c.ids_per_connection);
    let ids: Vec<String> = (0..k).map(|j| ((i * k + j) % rows).to_string()).collect();
    json!({"entityCode": "bench_item", "entityIds": ids, "mode": "delta"})
}

async fn latency(c: Common) -> Result<Value> {
    prepare_table(&c).await?;
    let k = c.ids_per_connection;
    let sockets = open(&c, c.connections, |i| latency_subscription(&c, i)).await?;
    let start = Instant::now();
    let until = start + Duration::from_secs(c.seconds + 3);
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|s| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let counts = drain(s, until, start, |seq, at| {
                    seen.extend(seq.map(|seq| (seq, at)))
                })
                .await;
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
    let committed = commits
        .iter()
        .filter(|a| a.load(Ordering::SeqCst) > 0)
        .count();
    let mut report = percentiles(latencies);
    let run = json!({
        "mode": "latency", "connections": c.connections, "ids_per_connection": k, "rate": c.rate,
        "seconds": c.seconds, "commits": committed, "messages": messages,
    });
    report
        .as_object_mut()
        .unwrap()
        .extend(run.as_object().unwrap().clone());
    Ok(report)
}

async fn fanout(c: Common) -> Result<Value> {
    prepare_table(&c).await?;
    let sockets = open(&c, c.connections, |i| match c.filter_sets {
        0 => json!({"entityCode": "bench_item"}),
        n => json!({"entityCode": "bench_item",
                    "filter": [{"column": "team", "op": "eq", "value": (i % n).to_string()}]}),
    })
    .await?;
    if c.backlog {
        return backlog(c, sockets).await;
    }
    let start = Instant::now();
    let readers = read_all(sockets, start + Duration::from_secs(c.seconds), start);
    let commits = write(&c, None, start).await?;
    let (messages, changes) = total(readers).await?;
    let committed = commits
        .iter()
        .filter(|a| a.load(Ordering::SeqCst) > 0)
        .count();
    let secs = c.seconds as f64;
    Ok(json!({
        "mode": "fanout", "connections": c.connections, "rls_claim_sets": c.rls_claim_sets,
        "rls_policy": if c.rls_subquery { "subquery" } else { "claim" },
        "rows_per_commit": c.rows_per_commit,
        "seconds": c.seconds, "commits": committed,
        "messages_per_s": (messages as f64 / secs).round(), "changes_per_s": (changes as f64 / secs).round(),
    }))
}

/// `fanout --backlog`: the gateway is paused (SIGSTOP) while writers update `bench_item`
/// in transactions of `--rows-per-commit` consecutive rows until `--changes` are written;
/// then it resumes (SIGCONT). The readers count deliveries until all that the policy lets
/// each subscriber see have arrived, or none arrives for 10 s.
async fn backlog(c: Common, sockets: Vec<Subscriber>) -> Result<Value> {
    let pid = c.gateway_pid.context("--backlog needs --gateway-pid")? as i32;
    let passes = c.changes.div_ceil(c.rows);
    let expected = passes as u64 * deliveries_per_pass(&c);
    let (delivered, last) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // SAFETY: kill(2) with a pid and a signal number; nothing is shared with the process.
    let signal = |sig| unsafe { libc::kill(pid, sig) };
    if signal(libc::SIGSTOP) != 0 {
        bail!("cannot pause the gateway (pid {pid})");
    }
    // Statistics of the log as autovacuum keeps them in a running system: a log never
    // analyzed yet makes the planner scan all of it where one index range would do.
    let written = async {
        write_blocks(&c, passes).await?;
        let db = database(&c.database_url).await?;
        db.batch_execute("ANALYZE sync.change_history").await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let resumed = Instant::now();
    if signal(libc::SIGCONT) != 0 {
        bail!("cannot resume the gateway (pid {pid})");
    }
    written?;
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|s| {
            let (delivered, last) = (delivered.clone(), last.clone());
            tokio::spawn(async move {
                let until = resumed + Duration::from_secs(600);
                drain(s, until, resumed, |_, at| {
                    delivered.fetch_add(1, Ordering::Relaxed);
                    last.fetch_max(at, Ordering::Relaxed);
                })
                .await
            })
        })
        .collect();
    let mut seen = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now >= expected || seen.1.elapsed() > Duration::from_secs(10) {
            break;
        }
        if now > seen.0 {
            seen = (now, Instant::now());
        }
    }
    readers.iter().for_each(|r| r.abort());
    let seconds = last.load(Ordering::Relaxed) as f64 / 1e6;
    let delivered = delivered.load(Ordering::Relaxed);
    Ok(json!({
        "mode": "fanout", "backlog": true, "connections": c.connections,
        "rls_claim_sets": c.rls_claim_sets, "filter_sets": c.filter_sets,
        "rls_policy": if c.rls_subquery { "subquery" } else { "claim" },
        "rls_one_team": c.rls_one_team,
        "rows_per_commit": c.rows_per_commit, "changes_written": passes * c.rows,
        "deliveries_expected": expected, "changes_delivered": delivered,
        "seconds": (seconds * 100.0).round() / 100.0,
        "changes_per_s": (delivered as f64 / seconds).round(),
    }))
}

/// The teams of `bench_item`'s rows and of the users: N claim sets or filters, one with
/// `--rls-one-team`, none without RLS or filters.
fn teams(c: &Common) -> usize {
    match c.rls_claim_sets > 0 && c.rls_one_team {
        true => 1,
        false => c.rls_claim_sets.max(c.filter_sets),
    }
}

/// The deliveries one update of every row of `bench_item` makes: row `id` reaches the
/// connections of team `id % N` (all of them without teams).
fn deliveries_per_pass(c: &Common) -> u64 {
    let teams = teams(c);
    if teams == 0 {
        return (c.rows * c.connections) as u64;
    }
    let mut per_team = vec![0u64; teams];
    (0..c.connections).for_each(|i| per_team[i % teams] += 1);
    (0..c.rows).map(|id| per_team[id % teams]).sum()
}

/// Updates every row of `bench_item` `passes` times, in transactions of `--rows-per-commit`
/// consecutive rows; the writers take the blocks in turn, so no two touch one row at once.
async fn write_blocks(c: &Common, passes: usize) -> Result<()> {
    let block = c.rows_per_commit.max(1);
    let blocks = c.rows.div_ceil(block);
    let mut tasks = Vec::new();
    for w in 0..WRITERS as usize {
        let db = database(&c.database_url).await?;
        tasks.push(tokio::spawn(async move {
            let update = db
                .prepare("UPDATE bench_item SET seq = seq + 1 WHERE id >= $1 AND id < $2")
                .await?;
            for _ in 0..passes {
                for b in (w..blocks).step_by(WRITERS as usize) {
                    let from = (b * block) as i32;
                    db.execute(&update, &[&from, &(from + block as i32)])
                        .await?;
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

type Reader = tokio::task::JoinHandle<(u64, u64)>;

/// Reads every socket until `until`, counting messages and changes.
fn read_all(sockets: Vec<Subscriber>, until: Instant, start: Instant) -> Vec<Reader> {
    sockets
        .into_iter()
        .map(|s| tokio::spawn(async move { drain(s, until, start, |_, _| {}).await }))
        .collect()
}

/// Messages and changes all readers counted.
async fn total(readers: Vec<Reader>) -> Result<(u64, u64)> {
    let (mut messages, mut changes) = (0, 0);
    for r in readers {
        let (m, ch) = r.await?;
        messages += m;
        changes += ch;
    }
    Ok((messages, changes))
}

/// Percentiles in ms of samples in µs (sorted here).
fn percentiles(mut samples: Vec<u64>) -> Value {
    samples.sort_unstable();
    let pct = |p: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * p) as usize)
            .map(|us| *us as f64 / 1000.0)
    };
    json!({"samples": samples.len(), "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "max_ms": pct(1.0)})
}

async fn catchup(c: Common) -> Result<Value> {
    let mut db = database(&c.database_url).await?;
    db.batch_execute(
        "DROP TABLE IF EXISTS bench_catchup;
         CREATE TABLE bench_catchup (id int PRIMARY KEY, n int NOT NULL, pad text);
         SELECT sync.track('bench_catchup');",
    )
    .await?;
    let away: String = db
        .query_one("SELECT sync.current_cursor()", &[])
        .await?
        .get(0);
    db.batch_execute(&format!(
        "DO $$ BEGIN FOR b IN 0..{} LOOP
             INSERT INTO bench_catchup SELECT g, g, repeat('x', 40)
               FROM generate_series(b * 1000 + 1, b * 1000 + 1000) g;
             COMMIT;
         END LOOP; END $$;",
        c.changes.div_ceil(1000) - 1
    ))
    .await?;
    let changes = c.changes.div_ceil(1000) * 1000;

    // The log read alone, in pages, each in a REPEATABLE READ transaction as the gateway does.
    let start = Instant::now();
    let (mut cursor, mut read) = (away.clone(), 0usize);
    loop {
        let tx = db
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await?;
        let rows = tx
            .query("SELECT * FROM sync.changes_since($1, 10000)", &[&cursor])
            .await?;
        tx.commit().await?;
        read += rows.len();
        match rows.last() {
            Some(last) => cursor = last.get("cursor"),
            None => break,
        }
    }
    let sql_seconds = start.elapsed().as_secs_f64();
    if read != changes {
        bail!("changes_since read {read} changes, not {changes}");
    }

    // A client resubscribing with `since`: until SYNCED.
    let cpu = PrimaryCpu::start(&c, &db).await?;
    let url = format!("ws://{}/ws/sync?token={}", c.gateway, token(&c, 0));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    let start = Instant::now();
    let subscribe = json!({"type": "SUBSCRIBE", "payload": {"entityCode": "bench_catchup", "mode": "delta", "since": away}});
    socket.send(Message::text(subscribe.to_string())).await?;
    let mut received = 0usize;
    loop {
        let value = next_message(&mut socket).await?;
        match value["type"].as_str() {
            Some("DELTA") => received += value["payload"]["changes"].as_array().map_or(0, Vec::len),
            Some("SYNCED") => break,
            Some("SUBSCRIBED") => {}
            _ => bail!("unexpected: {value}"),
        }
    }
    let gateway_seconds = start.elapsed().as_secs_f64();
    if received != changes {
        bail!("the client received {received} changes, not {changes}");
    }
    let mut report = json!({
        "mode": "catchup", "changes": changes,
        "changes_since_seconds": (sql_seconds * 100.0).round() / 100.0,
        "gateway_seconds": (gateway_seconds * 100.0).round() / 100.0,
    });
    cpu.report(&mut report)?;
    Ok(report)
}

/// The next number of a xorshift sequence (the writers' and the bare server's row picks).
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Microseconds since the Unix epoch (the bare server's stamps).
fn epoch_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}
