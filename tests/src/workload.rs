//! The workload that tries cursors hardest: writers whose transactions capture in one order
//! and commit in another (some roll back), each inserting items and bumping a shared counter,
//! and the checks that a reader saw each committed change exactly once, each row's versions
//! in commit order, and each transaction whole.

use crate::{Change, Cluster, Rng};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// The tables the workload writes (run once on a cluster).
pub const SCHEMA: &str = "
    CREATE TABLE item (id int PRIMARY KEY, v int NOT NULL DEFAULT 0, note text);
    SELECT sync.track('item');
    CREATE TABLE counter (id int PRIMARY KEY, version int NOT NULL);
    INSERT INTO counter SELECT g, 0 FROM generate_series(1, 4) g;
    SELECT sync.track('counter');";

const COUNTERS: u64 = 4;

/// Starts `writers` writers of `transactions` transactions each, inserting items from
/// `first_id` up; each answers the item ids it committed.
pub async fn start(
    cluster: &Cluster,
    seed: u64,
    first_id: i32,
    writers: u64,
    transactions: u64,
) -> Vec<JoinHandle<Vec<i32>>> {
    let mut handles = Vec::new();
    for w in 0..writers {
        let client = cluster.connect().await;
        let mut rng = Rng(seed.wrapping_mul(w + 1) | 1);
        handles.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for t in 0..transactions {
                client.batch_execute("BEGIN").await.unwrap();
                let mut ids = Vec::new();
                for k in 0..=rng.below(3) {
                    let id = first_id + ((w * transactions + t) * 4 + k) as i32;
                    client
                        .execute("INSERT INTO item (id) VALUES ($1)", &[&id])
                        .await
                        .unwrap();
                    ids.push(id);
                }
                let counter = (rng.below(COUNTERS) + 1) as i32;
                client
                    .execute(
                        "UPDATE counter SET version = version + 1 WHERE id = $1",
                        &[&counter],
                    )
                    .await
                    .unwrap();
                // Vary how long each transaction stays open, so commits interleave.
                tokio::time::sleep(Duration::from_micros(rng.below(3000))).await;
                if rng.below(10) == 0 {
                    client.batch_execute("ROLLBACK").await.unwrap();
                } else {
                    client.batch_execute("COMMIT").await.unwrap();
                    committed.extend(ids);
                }
            }
            committed
        }));
    }
    handles
}

/// The item ids the writers committed, once they all finished.
pub async fn committed(writers: Vec<JoinHandle<Vec<i32>>>) -> HashSet<i32> {
    let mut items = HashSet::new();
    for w in writers {
        items.extend(w.await.unwrap());
    }
    items
}

/// Checks what a reader delivered against the log (read through `log`) and the committed
/// items: every log row exactly once, exactly the committed inserts, each counter's versions
/// 1, 2, 3… in order, each transaction's changes together.
pub async fn check(delivered: &[Change], log: &Client, committed: &HashSet<i32>, seed: u64) {
    let mut delivered_ids: Vec<i64> = delivered.iter().map(|c| c.id).collect();
    delivered_ids.sort();
    let log_ids: Vec<i64> = crate::column(
        log,
        "SELECT id FROM sync.change_history WHERE op <> 'END' ORDER BY id",
    )
    .await;
    assert_eq!(delivered_ids, log_ids, "every log row once, seed {seed}");
    let items: HashSet<i32> = delivered
        .iter()
        .filter(|c| c.entity_code == "item")
        .map(|c| c.entity_id.as_ref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(&items, committed, "the committed inserts, seed {seed}");
    let mut versions: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for c in delivered.iter().filter(|c| c.entity_code == "counter") {
        let data: serde_json::Value = serde_json::from_str(c.data.as_deref().unwrap()).unwrap();
        versions
            .entry(c.entity_id.clone().unwrap())
            .or_default()
            .push(data["version"].as_i64().unwrap());
    }
    for (row, seen) in versions {
        let expected: Vec<i64> = (1..=seen.len() as i64).collect();
        assert_eq!(seen, expected, "counter {row} in commit order, seed {seed}");
    }
    let mut finished: HashSet<&str> = HashSet::new();
    for pair in delivered.windows(2) {
        if pair[0].txid != pair[1].txid {
            assert!(
                finished.insert(&pair[0].txid),
                "transaction {} split, seed {seed}",
                pair[0].txid
            );
            assert!(!finished.contains(pair[1].txid.as_str()), "seed {seed}");
        }
    }
}
