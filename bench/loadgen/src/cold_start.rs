//! A cold start of many clients at once: each fetches the snapshot of one table (no copy to
//! resume from), retrying after `Retry-After` when the gateway is at its snapshot caps.
//! Reports the seconds until the last has its rows, the refusals, and how many snapshots the
//! gateway read from the database meanwhile (`sync_snapshots_read_total`), to compare a
//! gateway that shares snapshots within an audience (`--snapshot-share-for`) with one that
//! does not, in the same run.

use super::{database, http_get, token, Common};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(super) async fn cold_start(c: Common) -> Result<Value> {
    let admin = c.admin.clone().context("--admin is required")?;
    database(&c.database_url)
        .await?
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS bench_cold;
             CREATE TABLE bench_cold (id int PRIMARY KEY, n int, label text);
             INSERT INTO bench_cold SELECT g, g % 1000, 'row ' || g FROM generate_series(1, {}) g;
             ANALYZE bench_cold;
             SELECT sync.track('bench_cold');",
            c.rows
        ))
        .await?;
    let reads_before = snapshots_read(&admin).await?;
    let refused = AtomicU64::new(0);
    let start = Instant::now();
    let clients = (0..c.connections).map(|i| {
        let (c, refused) = (&c, &refused);
        async move {
            loop {
                let (status, retry_after, body) =
                    http_get(&c.gateway, "/v1/snapshot/bench_cold", Some(&token(c, i))).await?;
                match status {
                    200 => return Ok(body.iter().filter(|b| **b == b'\n').count()),
                    503 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(1))).await;
                    }
                    other => bail!("snapshot answered {other}"),
                }
            }
        }
    });
    let lines: Vec<usize> = futures_util::future::try_join_all(clients).await?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(short) = lines.iter().find(|l| **l < c.rows) {
        bail!("a snapshot of {short} lines for {} rows", c.rows);
    }
    Ok(json!({
        "mode": "cold_start", "clients": c.connections, "rows": c.rows,
        "shared_snapshots": c.shared_snapshots,
        "seconds": (seconds * 100.0).round() / 100.0,
        "refused": refused.load(Ordering::Relaxed),
        "snapshot_reads": snapshots_read(&admin).await? - reads_before,
    }))
}

/// `sync_snapshots_read_total` of the gateway's `/metrics`.
async fn snapshots_read(admin: &str) -> Result<u64> {
    let (_, _, body) = http_get(admin, "/metrics", None).await?;
    let text = String::from_utf8(body)?;
    text.lines()
        .find_map(|l| l.strip_prefix("sync_snapshots_read_total "))
        .context("sync_snapshots_read_total in /metrics")?
        .trim()
        .parse()
        .context("a count")
}
