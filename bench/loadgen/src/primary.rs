//! The primary's side of a run: its CPU time while the gateway served (with
//! `--primary-data`), and waiting for the standby of `--replica-url` to replay.

use super::{database, Common};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::time::Duration;

/// CPU seconds the cluster of `data` has used so far: its postmaster's own and that of the
/// backends it reaped, plus every live child's.
fn cluster_cpu_seconds(data: &str) -> Result<f64> {
    let pid_file = std::fs::read_to_string(format!("{data}/postmaster.pid"))?;
    let postmaster: u32 = pid_file
        .lines()
        .next()
        .context("postmaster.pid")?
        .trim()
        .parse()?;
    // utime, stime, cutime, cstime are fields 14 to 17 of /proc/<pid>/stat (after the name).
    let times = |pid: u32, with_children: bool| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let parent: u32 = fields[1].parse().ok()?;
        if pid != postmaster && parent != postmaster {
            return None;
        }
        let n = if with_children { 4 } else { 2 };
        Some(
            fields[11..11 + n]
                .iter()
                .filter_map(|f| f.parse::<u64>().ok())
                .sum(),
        )
    };
    let mut ticks = times(postmaster, true).context("the postmaster")?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        {
            if pid != postmaster {
                ticks += times(pid, false).unwrap_or(0);
            }
        }
    }
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / per_second)
}

/// Returns once the standby of `--replica-url` (if any) replayed what `primary` wrote so far.
pub(super) async fn replayed(c: &Common, primary: &tokio_postgres::Client) -> Result<()> {
    let Some(url) = &c.replica_url else {
        return Ok(());
    };
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let replica = database(url).await?;
    while !replica
        .query_one(
            "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
            &[&lsn],
        )
        .await?
        .get::<_, bool>(0)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Measures the primary's CPU across the gateway's part of a run (when asked to), after the
/// standby (when there is one) replayed what was written.
pub(super) struct PrimaryCpu {
    data: Option<String>,
    before: f64,
}

impl PrimaryCpu {
    pub(super) async fn start(c: &Common, primary: &tokio_postgres::Client) -> Result<PrimaryCpu> {
        replayed(c, primary).await?;
        let before = match &c.primary_data {
            Some(data) => cluster_cpu_seconds(data)?,
            None => 0.0,
        };
        Ok(PrimaryCpu {
            data: c.primary_data.clone(),
            before,
        })
    }

    /// Adds `primary_cpu_seconds` to `report`.
    pub(super) fn report(&self, report: &mut Value) -> Result<()> {
        if let Some(data) = &self.data {
            let spent = cluster_cpu_seconds(data)? - self.before;
            report["primary_cpu_seconds"] = json!((spent * 100.0).round() / 100.0);
        }
        Ok(())
    }
}
