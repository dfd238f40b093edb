//! Reading the log on a PostgreSQL hot standby (SPEC 2.7): a standby cannot make a cursor of
//! its own snapshot, so its cursors are built from marks the primary made (`sync.tick()`)
//! plus what it replayed since. Tried with writers committing out of order on the primary,
//! with replay paused and resumed, across a standby's restart and its promotion.

use pg_sync_tests::{drain, sqlstate, workload, Change, Cluster};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Calls `sync.tick()` on `primary` every few milliseconds until cancelled.
async fn ticking(primary: &Cluster) -> CancellationToken {
    let stop = CancellationToken::new();
    let client = primary.connect().await;
    let done = stop.clone();
    tokio::spawn(async move {
        while !done.is_cancelled() {
            client.query_one("SELECT sync.tick()", &[]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    stop
}

/// A primary with the workload's schema and a streaming standby of it, the primary ticking.
async fn ticked_standby() -> (Cluster, Cluster, CancellationToken) {
    let primary = Cluster::start().await;
    primary.execute(workload::SCHEMA).await;
    primary.execute("SELECT sync.tick()").await;
    let standby = primary.standby().await;
    let ticker = ticking(&primary).await;
    (primary, standby, ticker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_out_of_order_on_the_primary_are_read_exactly_once_on_the_standby() {
    let seed = pg_sync_tests::seed();
    let (primary, standby, ticker) = ticked_standby().await;
    standby.caught_up_with(&primary).await;

    let mut writers = workload::start(&primary, seed, 0, 8, 40).await;
    // And one that holds its transactions open a long while, so that a standby's snapshot
    // often falls between a later transaction's commit and its own.
    let slow = primary.connect().await;
    writers.push(tokio::spawn(async move {
        let mut committed = Vec::new();
        for id in 1_000_000..1_000_010 {
            slow.batch_execute(&format!("BEGIN; INSERT INTO item (id) VALUES ({id})"))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            slow.batch_execute("COMMIT").await.unwrap();
            committed.push(id);
        }
        committed
    }));
    let mut reader = standby.connect().await;
    let mut delivered: Vec<Change> = Vec::new();
    let mut cursor = None;
    while writers.iter().any(|w| !w.is_finished()) {
        let (page, next) = drain(&mut reader, cursor.take(), 3).await;
        delivered.extend(page);
        cursor = Some(next);
    }
    let committed = workload::committed(writers).await;
    standby.caught_up_with(&primary).await;
    let (rest, _) = drain(&mut reader, cursor, 3).await;
    delivered.extend(rest);
    ticker.cancel();
    workload::check(&delivered, &reader, &committed, seed).await;
}

/// Reads one page after another, now on the primary, now on the standby, with replay paused
/// a while and the standby restarted, while writers commit out of order: a cursor from either
/// reads on at the other, and one the standby has not replayed as far as waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cursor_moves_between_primary_and_standby_across_paused_replay_and_restart() {
    let seed = pg_sync_tests::seed();
    let (primary, standby, ticker) = ticked_standby().await;
    standby.caught_up_with(&primary).await;

    let writers = workload::start(&primary, seed, 0, 6, 60).await;
    let mut on_primary = primary.connect().await;
    let mut delivered: Vec<Change> = Vec::new();
    let mut cursor = None;
    let mut round = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        round += 1;
        match round % 12 {
            3 => standby.execute("SELECT pg_wal_replay_pause()").await,
            6 => standby.execute("SELECT pg_wal_replay_resume()").await,
            9 => standby.restart_immediate(),
            _ => {}
        }
        let (page, next) = if round % 2 == 0 {
            drain(&mut on_primary, cursor.take(), 4).await
        } else {
            drain(&mut standby.connect().await, cursor.take(), 4).await
        };
        delivered.extend(page);
        cursor = Some(next);
    }
    let committed = workload::committed(writers).await;
    standby.execute("SELECT pg_wal_replay_resume()").await;
    primary.execute("SELECT sync.tick()").await;
    standby.caught_up_with(&primary).await;
    let (rest, _) = drain(&mut standby.connect().await, cursor, 4).await;
    delivered.extend(rest);
    ticker.cancel();
    workload::check(&delivered, &on_primary, &committed, seed).await;
}

/// A reader on the standby reads on when the standby is promoted (the primary lost), from its
/// cursor, and on through what the new primary writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reading_goes_on_across_the_standbys_promotion() {
    let seed = pg_sync_tests::seed();
    let (primary, standby, ticker) = ticked_standby().await;
    let before = workload::start(&primary, seed, 0, 4, 30).await;
    let mut reader = standby.connect().await;
    let mut delivered: Vec<Change> = Vec::new();
    let mut cursor = None;
    while before.iter().any(|w| !w.is_finished()) {
        let (page, next) = drain(&mut reader, cursor.take(), 5).await;
        delivered.extend(page);
        cursor = Some(next);
    }
    let mut committed = workload::committed(before).await;
    ticker.cancel();
    standby.caught_up_with(&primary).await;
    primary.stop_immediate();
    let promoted: bool = reader
        .query_one("SELECT pg_promote()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(promoted);

    let after = workload::start(&standby, seed, 100_000, 4, 30).await;
    while after.iter().any(|w| !w.is_finished()) {
        let (page, next) = drain(&mut reader, cursor.take(), 5).await;
        delivered.extend(page);
        cursor = Some(next);
    }
    committed.extend(workload::committed(after).await);
    let (rest, _) = drain(&mut reader, cursor, 5).await;
    delivered.extend(rest);
    workload::check(&delivered, &reader, &committed, seed).await;
}

/// Before the first tick a standby cannot say a cursor, and says so; after it, it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_without_a_tick_asks_for_one() {
    let primary = Cluster::start().await;
    primary.execute(workload::SCHEMA).await;
    let standby = primary.standby().await;
    let reader = standby.connect().await;
    let refused = reader
        .query_one("SELECT sync.current_cursor()", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&refused), "55000");
    primary.execute("SELECT sync.tick()").await;
    standby.caught_up_with(&primary).await;
    reader
        .query_one("SELECT sync.current_cursor()", &[])
        .await
        .unwrap();
    // A standby cannot tick.
    let ticked = reader
        .query_one("SELECT sync.tick()", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&ticked), "25006");
}
