//! The gateway's memory: per idle connection, and at its peak while it streams a snapshot
//! (with the snapshot's rows per second).

use super::{database, open, prepare_table, primary::PrimaryCpu, token, Common};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub(super) async fn idle(c: Common) -> Result<Value> {
    let pid = c.gateway_pid.context("--gateway-pid is required")?;
    prepare_table(&c).await?;
    let before = status_kib(pid, "VmRSS:")?;
    let rows = c.rows;
    let sockets = open(
        &c,
        c.connections,
        |i| json!({"entityCode": "bench_item", "entityIds": [(i % rows).to_string()]}),
    )
    .await?;
    // Let allocations settle, then read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = status_kib(pid, "VmRSS:")?;
    drop(sockets);
    Ok(json!({
        "mode": "idle", "connections": c.connections, "rss_before_kib": before, "rss_after_kib": after,
        "kib_per_connection": ((after.saturating_sub(before)) as f64 / c.connections as f64 * 10.0).round() / 10.0,
    }))
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .context("field")?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

pub(super) async fn snapshot(c: Common) -> Result<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pid = c.gateway_pid.context("--gateway-pid is required")?;
    let db = database(&c.database_url).await?;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS bench_snapshot;
         CREATE TABLE bench_snapshot (id int PRIMARY KEY, n int, label text, at timestamptz DEFAULT now());
         INSERT INTO bench_snapshot SELECT g, g % 1000, 'row ' || g FROM generate_series(1, {}) g;
         ANALYZE bench_snapshot;
         SELECT sync.track('bench_snapshot');",
        c.rows
    ))
    .await?;
    let before = status_kib(pid, "VmRSS:")?;
    let cpu = PrimaryCpu::start(&c, &db).await?;
    let mut stream = tokio::net::TcpStream::connect(&c.gateway).await?;
    let request = format!(
        "GET /v1/snapshot/bench_snapshot HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        token(&c, 0)
    );
    let start = Instant::now();
    stream.write_all(request.as_bytes()).await?;
    let (mut lines, mut bytes, mut buffer) = (0u64, 0u64, vec![0u8; 1 << 16]);
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        lines += buffer[..n].iter().filter(|b| **b == b'\n').count() as u64;
    }
    let seconds = start.elapsed().as_secs_f64();
    // Chunk headers and the cursor line add a few newlines; the rows dominate.
    let rows = c.rows as f64;
    if (lines as f64) < rows {
        bail!("only {lines} lines for {rows} rows");
    }
    let mut report = json!({
        "mode": "snapshot", "rows": c.rows, "seconds": (seconds * 100.0).round() / 100.0,
        "rows_per_s": (rows / seconds).round(), "megabytes": bytes / 1_000_000,
        "gateway_rss_before_kib": before, "gateway_peak_rss_kib": status_kib(pid, "VmHWM:")?,
    });
    cpu.report(&mut report)?;
    Ok(report)
}
