//! `ALTER EXTENSION pg_sync UPDATE` from 0.1.0 and from 0.2.0: a database made with an earlier
//! version's SQL keeps its log, cursors and tracked tables, and ends up as a fresh install
//! would be.

use pg_sync_tests::{drain, Cluster};
use std::time::Duration;
use tokio_postgres::Client;

/// Every object of the extension as lines of text: tables and columns, indexes,
/// constraints, functions (signature, attributes, rights, source), triggers, event triggers,
/// types, the schema's rights and the extension's members.
const SCHEMA_SQL: &str = "
SELECT kind || ': ' || line FROM (
    SELECT 'relation', format('%s.%s %s %s', c.relnamespace::regnamespace, c.relname, c.relkind, c.relacl)
      FROM pg_class c WHERE c.relnamespace IN ('sync'::regnamespace, 'sync_lock'::regnamespace)
    UNION ALL
    SELECT 'column', format('%s.%s #%s %s not null %s default %s', c.relname, a.attname, a.attnum,
                            format_type(a.atttypid, a.atttypmod), a.attnotnull,
                            pg_get_expr(d.adbin, d.adrelid))
      FROM pg_class c
      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
     WHERE c.relnamespace = 'sync'::regnamespace
    UNION ALL
    SELECT 'index', pg_get_indexdef(i.indexrelid)
      FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
     WHERE c.relnamespace = 'sync'::regnamespace
    UNION ALL
    SELECT 'constraint', format('%s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
      FROM pg_constraint WHERE connamespace = 'sync'::regnamespace
    UNION ALL
    SELECT 'function', format('%s(%s) %s definer %s config %s volatile %s parallel %s strict %s acl %s source %s',
                              p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
                              p.prosecdef, p.proconfig, p.provolatile, p.proparallel, p.proisstrict,
                              p.proacl, md5(p.prosrc))
      FROM pg_proc p WHERE p.pronamespace = 'sync'::regnamespace
    UNION ALL
    SELECT 'trigger', pg_get_triggerdef(t.oid)
      FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
     WHERE c.relnamespace = 'sync'::regnamespace AND NOT t.tgisinternal
    UNION ALL
    SELECT 'event trigger', format('%s %s %s %s %s', evtname, evtevent, evtfoid::regproc, evtenabled, evttags)
      FROM pg_event_trigger
    UNION ALL
    SELECT 'type', format('%s %s', typname, typacl) FROM pg_type WHERE typnamespace = 'sync'::regnamespace
    UNION ALL
    SELECT 'schema', format('%s %s', nspname, nspacl) FROM pg_namespace WHERE nspname IN ('sync', 'sync_lock')
    UNION ALL
    SELECT 'member', pg_describe_object(classid, objid, objsubid)
      FROM pg_depend
     WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
       AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_sync')
    UNION ALL
    SELECT 'version', extversion FROM pg_extension WHERE extname = 'pg_sync'
) objects(kind, line) ORDER BY 1";

async fn schema(client: &Client) -> Vec<String> {
    let rows = client.query(SCHEMA_SQL, &[]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

fn ids(changes: &[pg_sync_tests::Change]) -> Vec<&str> {
    changes
        .iter()
        .map(|c| c.entity_id.as_deref().unwrap_or(""))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_of_0_1_0_upgrades_in_place_and_reads_on_from_a_cursor_taken_before() {
    upgrades_in_place("0.1.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_of_0_2_0_upgrades_in_place_and_reads_on_from_a_cursor_taken_before() {
    upgrades_in_place("0.2.0").await;
}

/// A database of `version` with a log and a cursor into it, updated while a writer is in
/// flight: the cursor reads on, and the schema is a fresh install's.
async fn upgrades_in_place(version: &str) {
    let cluster = Cluster::start().await;
    let database = format!("v{}", version.replace('.', ""));
    cluster
        .execute(&format!("CREATE DATABASE {database}"))
        .await;
    cluster.execute("CREATE DATABASE fresh").await;
    let old = cluster.connect_to(&database).await;
    old.batch_execute(&format!("CREATE EXTENSION pg_sync VERSION '{version}'"))
        .await
        .unwrap();
    old.batch_execute(
        "CREATE TABLE item (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         SELECT sync.track('item');
         INSERT INTO item VALUES (1);
         BEGIN; INSERT INTO item VALUES (2), (3); UPDATE item SET v = 1 WHERE id = 1; COMMIT;",
    )
    .await
    .unwrap();
    // A client's cursor, taken before the upgrade.
    let cursor: String = old
        .query_one("SELECT sync.current_cursor()", &[])
        .await
        .unwrap()
        .get(0);
    old.batch_execute(
        "INSERT INTO item VALUES (4);
         BEGIN; DELETE FROM item WHERE id = 2; INSERT INTO item VALUES (5); COMMIT;",
    )
    .await
    .unwrap();

    // A writer in flight holds the log: the update waits for it, and its change is kept.
    let in_flight = cluster.connect_to(&database).await;
    in_flight
        .batch_execute("BEGIN; INSERT INTO item VALUES (6)")
        .await
        .unwrap();
    let updater = cluster.connect_to(&database).await;
    let update = tokio::spawn(async move {
        updater
            .batch_execute("ALTER EXTENSION pg_sync UPDATE")
            .await
            .map(|_| updater)
    });
    wait_until_blocked(&old, "ALTER EXTENSION pg_sync UPDATE").await;
    in_flight.batch_execute("COMMIT").await.unwrap();
    let updater = update.await.unwrap().unwrap();
    updater
        .batch_execute("INSERT INTO item VALUES (7); BEGIN; SAVEPOINT s; INSERT INTO item VALUES (8); ROLLBACK TO s; UPDATE item SET v = 2 WHERE id = 7; COMMIT;")
        .await
        .unwrap();

    let mut reader = cluster.connect_to(&database).await;
    let (after, _) = drain(&mut reader, Some(cursor), 2).await;
    assert_eq!(ids(&after), ["4", "2", "5", "6", "7", "7"]);
    let (all, _) = drain(&mut reader, None, 3).await;
    assert_eq!(
        ids(&all),
        ["1", "2", "3", "1", "4", "2", "5", "6", "7", "7"]
    );
    // Every row of the log, old and new, names the tracking of the table that wrote it.
    let untagged: i64 = reader
        .query_one(
            "SELECT count(*) FROM sync.change_history h
              WHERE h.op <> 'END'
                AND h.tracking IS DISTINCT FROM (SELECT t.tracking FROM sync.tracked t)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(untagged, 0);

    let fresh = cluster.connect_to("fresh").await;
    fresh
        .batch_execute("CREATE EXTENSION pg_sync")
        .await
        .unwrap();
    let (upgraded, installed) = (schema(&old).await, schema(&fresh).await);
    let missing: Vec<_> = installed.iter().filter(|l| !upgraded.contains(l)).collect();
    let extra: Vec<_> = upgraded.iter().filter(|l| !installed.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the upgraded schema differs from a fresh install\nmissing: {missing:#?}\nextra: {extra:#?}"
    );
}

/// Waits until the statement `query` waits for a lock.
async fn wait_until_blocked(client: &Client, query: &str) {
    for _ in 0..500 {
        let waiting: bool = client
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_stat_activity
                                 WHERE query = $1 AND wait_event_type = 'Lock')",
                &[&query],
            )
            .await
            .unwrap()
            .get(0);
        if waiting {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{query} never waited for the writer");
}
