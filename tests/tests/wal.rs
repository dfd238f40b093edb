//! WAL capture on a real cluster with wal_level=logical: enrichment, ingest's
//! store-then-move discipline under failures and crashes, origin tags, and the gateway
//! driving it.

use pg_sync_tests::gateway::{actions, Gateway};
use pg_sync_tests::{drain, sqlstate, Change, Cluster};
use serde_json::json;
use tokio_postgres::Client;

/// The same table twice, one captured by trigger and one from the WAL, with many types.
const TWINS: &str = "
    CREATE TABLE by_trigger (id int PRIMARY KEY, n numeric, f float8, t timestamptz, d date,
                             j jsonb, a int[], b bool, u uuid, big text, hidden text);
    CREATE TABLE by_wal (LIKE by_trigger INCLUDING ALL);
    SELECT sync.track('by_trigger', columns => ARRAY['n', 'f', 't', 'd', 'j', 'a', 'b', 'u', 'big']);
    SELECT sync.track('by_wal', capture => 'wal', columns => ARRAY['n', 'f', 't', 'd', 'j', 'a', 'b', 'u', 'big']);";

/// Creates the twin tables. Tracking for WAL capture needs the replication slot first, and the
/// statements run in one transaction, which cannot create it once it has written.
async fn twins(cluster: &Cluster) {
    cluster.execute("SELECT sync.create_wal_slot()").await;
    cluster.execute(TWINS).await;
}

async fn ingest(client: &Client) -> i64 {
    client
        .query_one("SELECT sync.ingest_wal(100000)", &[])
        .await
        .unwrap()
        .get(0)
}

async fn log(
    client: &Client,
    entity: &str,
) -> Vec<(
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<Vec<String>>,
    Option<String>,
)> {
    client
        .query(
            "SELECT op, entity_id, data::text, old_data::text, changed_columns, client_id
               FROM sync.change_history WHERE entity_code = $1 ORDER BY id",
            &[&entity],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_capture_writes_what_trigger_capture_writes() {
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    let client = cluster.connect().await;
    // The first ingest creates the slot: changes count from there.
    ingest(&client).await;
    for table in ["by_trigger", "by_wal"] {
        cluster
            .execute(&format!(
                "INSERT INTO {table} VALUES
                    (1, 12345678901234567890123456789.125, 1.5, '2026-01-02 03:04:05.678+00', '2026-01-02',
                     '{{\"k\": [1, \"two\"]}}', '{{1,2,3}}', true, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
                     repeat('toast', 40000), 'never published'),
                    (2, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL, 'short', 'x');
                 UPDATE {table} SET b = false, hidden = 'changed' WHERE id = 1;   -- big unchanged and TOASTed
                 UPDATE {table} SET hidden = 'only hidden' WHERE id = 1;          -- nothing published
                 UPDATE {table} SET id = 3 WHERE id = 2;                          -- key change
                 DELETE FROM {table} WHERE id = 3;
                 TRUNCATE {table};"
            ))
            .await;
    }
    assert!(ingest(&client).await > 0);
    let (by_trigger, by_wal) = (
        log(&client, "by_trigger").await,
        log(&client, "by_wal").await,
    );
    assert_eq!(by_wal, by_trigger);
    let ops: Vec<&str> = by_wal.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        ops,
        ["INSERT", "INSERT", "UPDATE", "DELETE", "INSERT", "DELETE", "TRUNCATE"]
    );
    // The UPDATE left the 200 kB column out of wal2json's columns; it is not NULL.
    assert!(
        by_wal[2].2.as_ref().unwrap().contains("toasttoast"),
        "{:?}",
        &by_wal[2].2.as_ref().map(|d| &d[..80])
    );
    assert_eq!(by_wal[2].4, Some(vec!["b".to_owned()]));
    let sources: Vec<String> = client
        .query("SELECT DISTINCT source || ':' || (lsn IS NOT NULL) FROM sync.change_history WHERE entity_code = 'by_wal'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sources, ["wal:true"]);
    // The log's own writes were not decoded back: nothing more to ingest.
    assert_eq!(ingest(&client).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origin_tags_follow_the_transaction_and_rollbacks_leave_nothing() {
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    let client = cluster.connect().await;
    ingest(&client).await;
    cluster
        .execute(
            "BEGIN; SELECT sync.tag_origin('tab-7'); INSERT INTO by_wal (id) VALUES (1); INSERT INTO by_trigger (id) VALUES (1); COMMIT;
             BEGIN; INSERT INTO by_wal (id) VALUES (2); SELECT sync.tag_origin('late'); INSERT INTO by_wal (id) VALUES (3); COMMIT;
             BEGIN; SELECT sync.tag_origin('gone'); INSERT INTO by_wal (id) VALUES (4); ROLLBACK;
             INSERT INTO by_wal (id) VALUES (5);",
        )
        .await;
    ingest(&client).await;
    let tags: Vec<(Option<String>, Option<String>)> = log(&client, "by_wal")
        .await
        .into_iter()
        .map(|r| (r.1, r.5))
        .collect();
    assert_eq!(
        tags,
        [
            (Some("1".into()), Some("tab-7".into())),
            (Some("2".into()), Some("late".into())),
            (Some("3".into()), Some("late".into())),
            (Some("5".into()), None),
        ]
    );
    assert_eq!(
        log(&client, "by_trigger").await[0].5.as_deref(),
        Some("tab-7")
    );
    let error = client
        .batch_execute("SELECT sync.tag_origin('')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "22023");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_larger_than_max_changes_is_stored_whole() {
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    let client = cluster.connect().await;
    ingest(&client).await;
    cluster
        .execute("INSERT INTO by_wal (id) SELECT g FROM generate_series(1, 5000) g")
        .await;
    cluster
        .execute("INSERT INTO by_wal (id) VALUES (9999)")
        .await;
    let first: i64 = client
        .query_one("SELECT sync.ingest_wal(10)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(first, 5000);
    let second: i64 = client
        .query_one("SELECT sync.ingest_wal(10)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(second, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_between_storing_and_moving_the_slot_stores_nothing_twice() {
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    let client = cluster.connect().await;
    ingest(&client).await;
    cluster
        .execute("INSERT INTO by_wal (id) SELECT g FROM generate_series(1, 100) g")
        .await;
    // Fails after storing: the transaction rolls back, nothing is stored, the slot stays.
    let error = client
        .batch_execute(
            "SET sync.test_ingest_fault = 'fail_after_store'; SELECT sync.ingest_wal(100000)",
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("db error"), "{error}");
    client
        .batch_execute("RESET sync.test_ingest_fault")
        .await
        .unwrap();
    assert_eq!(ingest(&client).await, 100);
    // Stored and committed, but the slot not moved (the next ingest would move it): the same
    // changes are decoded again and recognised.
    client
        .batch_execute("SET sync.test_ingest_fault = 'skip_advance'")
        .await
        .unwrap();
    assert_eq!(ingest(&client).await, 0);
    client
        .batch_execute("RESET sync.test_ingest_fault")
        .await
        .unwrap();
    cluster
        .execute("INSERT INTO by_wal (id) VALUES (101)")
        .await;
    assert_eq!(ingest(&client).await, 1);
    let ids: Vec<i64> = client
        .query("SELECT count(*) FROM sync.change_history WHERE entity_code = 'by_wal' GROUP BY entity_id HAVING count(*) > 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ids.is_empty(), "duplicates: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_in_the_middle_of_a_backlog_loses_and_doubles_nothing() {
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    ingest(&cluster.connect().await).await;
    for batch in 0..20 {
        cluster
            .execute(&format!(
                "INSERT INTO by_wal (id) SELECT g FROM generate_series({}, {}) g",
                batch * 100 + 1,
                batch * 100 + 100
            ))
            .await;
    }
    for round in 0..6 {
        let client = cluster.connect().await;
        let _: i64 = client
            .query_one("SELECT sync.ingest_wal(300)", &[])
            .await
            .unwrap()
            .get(0);
        if round % 2 == 0 {
            cluster.restart_immediate();
        }
    }
    let client = cluster.connect().await;
    while ingest(&client).await > 0 {}
    let (rows, distinct): (i64, i64) = {
        let r = client
            .query_one("SELECT count(*), count(DISTINCT entity_id) FROM sync.change_history WHERE entity_code = 'by_wal'", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((rows, distinct), (2000, 2000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trigger_and_wal_changes_of_one_transaction_read_back_in_a_consistent_order() {
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    let client = cluster.connect().await;
    ingest(&client).await;
    let mut reader = cluster.connect().await;
    let (_, start) = drain(&mut reader, None, 100).await;
    cluster
        .execute(
            "BEGIN; INSERT INTO by_trigger (id) VALUES (1); INSERT INTO by_wal (id) VALUES (1);
                    INSERT INTO by_trigger (id) VALUES (2); INSERT INTO by_wal (id) VALUES (2); COMMIT;",
        )
        .await;
    ingest(&client).await;
    let (changes, _) = drain(&mut reader, Some(start.clone()), 1).await;
    let seen: Vec<(String, String)> = changes
        .iter()
        .map(|c: &Change| (c.entity_code.clone(), c.entity_id.clone().unwrap()))
        .collect();
    // The trigger's rows in the writer's transaction, the WAL's in the ingest's, after it;
    // each group in the order the writer made them.
    assert_eq!(
        seen,
        [
            ("by_trigger".to_owned(), "1".to_owned()),
            ("by_trigger".into(), "2".into()),
            ("by_wal".into(), "1".into()),
            ("by_wal".into(), "2".into()),
        ]
    );
    // Read again in other page sizes: the same order.
    let (again, _) = drain(&mut reader, Some(start), 3).await;
    assert_eq!(
        again.iter().map(|c| c.id).collect::<Vec<_>>(),
        changes.iter().map(|c| c.id).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ingests_do_not_overlap() {
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    let first = cluster.connect().await;
    ingest(&first).await;
    cluster.execute("INSERT INTO by_wal (id) VALUES (1)").await;
    first.batch_execute("BEGIN").await.unwrap();
    assert_eq!(ingest(&first).await, 1); // holds the ingest lock until COMMIT
    let second = cluster.connect().await;
    assert_eq!(ingest(&second).await, 0);
    first.batch_execute("COMMIT").await.unwrap();
    assert_eq!(ingest(&second).await, 0);
    assert_eq!(log(&second, "by_wal").await.len(), 1);
}

/// The sequence that once lost row 1 (SPEC 1.5): `track` makes the slot, so a change made
/// before any ingest is still captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_change_after_track_is_missed_before_the_first_ingest() {
    let cluster = Cluster::start().await;
    let client = cluster.connect().await;
    for statement in [
        "CREATE TABLE doc (id int PRIMARY KEY, title text)",
        "SELECT sync.track('doc', capture => 'wal')",
        "INSERT INTO doc VALUES (1, 'a')",
    ] {
        client.batch_execute(statement).await.unwrap();
    }
    assert_eq!(ingest(&client).await, 1);
    assert_eq!(ingest(&client).await, 0);
    client
        .batch_execute("INSERT INTO doc VALUES (2, 'b')")
        .await
        .unwrap();
    assert_eq!(ingest(&client).await, 1);
    let ids: Vec<Option<String>> = log(&client, "doc").await.into_iter().map(|r| r.1).collect();
    assert_eq!(ids, [Some("1".to_owned()), Some("2".to_owned())]);

    // A transaction that has written cannot make the slot: track says so, and changes nothing.
    let other = Cluster::start().await;
    let error = other
        .connect()
        .await
        .batch_execute(
            "CREATE TABLE doc (id int PRIMARY KEY); SELECT sync.track('doc', capture => 'wal')",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "55000");
    let db = error.as_db_error().unwrap();
    assert!(
        db.message().contains("replication slot"),
        "{}",
        db.message()
    );
    assert!(db
        .hint()
        .unwrap_or_default()
        .contains("sync.create_wal_slot()"));
    let tracked: i64 = other
        .connect()
        .await
        .query_one("SELECT count(*) FROM sync.tracked", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tracked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_slot_is_announced_not_hidden() {
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    let client = cluster.connect().await;
    ingest(&client).await;
    cluster.execute("INSERT INTO by_wal (id) VALUES (1)").await;
    ingest(&client).await;
    client
        .batch_execute("SELECT pg_drop_replication_slot('pg_sync')")
        .await
        .unwrap();
    cluster.execute("INSERT INTO by_wal (id) VALUES (2)").await; // lost with the slot
    ingest(&client).await;
    // Recreated: from here on nothing is missed again, with or without an ingest between.
    cluster.execute("INSERT INTO by_wal (id) VALUES (3)").await;
    ingest(&client).await;
    let rows: Vec<(String, Option<String>)> = log(&client, "by_wal")
        .await
        .into_iter()
        .map(|r| (r.0, r.1))
        .collect();
    let at = |op: &str, id: Option<&str>| (op.to_owned(), id.map(str::to_owned));
    assert_eq!(
        rows,
        [
            at("INSERT", Some("1")),
            at("TRUNCATE", None),
            at("INSERT", Some("3"))
        ]
    );
    let lost: bool = client
        .query_one(
            "SELECT (sync.status()->'wal_slot'->>'lost_at') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(lost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_capture_needs_logical_decoding() {
    let cluster = Cluster::start_with(&["wal_level=replica"]).await;
    cluster.execute("CREATE TABLE t (id int PRIMARY KEY)").await;
    let error = cluster
        .connect()
        .await
        .batch_execute("SELECT sync.track('t', capture => 'wal')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "55000");
    assert!(
        error.as_db_error().unwrap().message().contains("wal_level"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_ingests_and_delivers_wal_changes() {
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    let gateway = Gateway::start(&cluster, &["--wal-ingest-interval-ms", "50"]).await;
    let mut session = gateway.connect("alice").await;
    session
        .subscribe(json!({"entityCode": "by_wal", "mode": "delta"}))
        .await;
    cluster.wait_for_slot().await;
    cluster
        .execute("INSERT INTO by_wal (id, big) VALUES (1, 'from the wal')")
        .await;
    let delta = session.expect("DELTA").await;
    assert_eq!(
        actions(&[json!({"type": "DELTA", "payload": delta.clone()})]),
        [("1".to_owned(), "CREATE".to_owned())]
    );
    assert_eq!(delta["changes"][0]["data"]["big"], "from the wal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_waits_for_its_wal_changes_to_reach_the_log() {
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    let mut client = cluster.connect().await;
    // The first ingest creates the slot. No gateway ingests after it: a change committed now
    // is in the table and not yet in the log.
    ingest(&client).await;
    let gateway = Gateway::start(&cluster, &["--wal-ingest", "false"]).await;
    cluster
        .execute("INSERT INTO by_wal (id, big) VALUES (1, 'committed, not ingested')")
        .await;
    let (cursor, rows) = gateway.snapshot("alice", "by_wal").await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["big"], "committed, not ingested");
    // The snapshot shows the row, so its change is before the cursor, not after it, once
    // everything is ingested.
    ingest(&client).await;
    let (after, _) = drain(&mut client, Some(cursor), 100).await;
    assert!(after.is_empty(), "sent again after the snapshot: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ingesting_backend_does_not_grow_over_thousands_of_calls() {
    const CALLS: usize = 1500;
    let cluster = Cluster::start().await;
    twins(&cluster).await;
    let (writer, ingester) = (cluster.connect().await, cluster.connect().await);
    // The backend's memory, all contexts (superuser: the view is restricted).
    let memory = || async {
        ingester
            .query_one(
                "SELECT sum(total_bytes)::int8 FROM pg_backend_memory_contexts",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut before = 0;
    for call in 0..CALLS {
        // Each call stores a change of several types, as a gateway ingesting every 200 ms.
        writer
            .execute(
                "INSERT INTO by_wal (id, n, t, j, a, u) VALUES ($1, 1.5, now(), '{\"k\": 1}', '{1}', gen_random_uuid())",
                &[&(call as i32)],
            )
            .await
            .unwrap();
        assert_eq!(ingest(&ingester).await, 1);
        if call == CALLS / 10 {
            before = memory().await; // after caches and buffers have warmed up
        }
    }
    let grown = memory().await - before;
    assert!(
        grown < 256 << 10,
        "the ingesting backend grew by {grown} bytes"
    );
}
