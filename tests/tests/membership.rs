//! Membership policies: a task is visible to the members of its project, so rows enter and
//! leave a user's sight when a row of `member` is inserted or deleted, without changing
//! themselves. Each such write puts an ACCESS row of `task` into the log (the trigger that
//! `sync._watch_policy_inputs` keeps on `member`), and every reader meets it in the log's
//! order: live sockets, replays and `/v1/changes` alike get RESYNC `access_changed` and
//! refetch. The attacks: a table owner who points a policy at a table they may not read, and
//! anyone attaching pg_sync's trigger by hand.

use pg_sync_tests::gateway::{actions, Gateway, Session, PATIENCE};
use pg_sync_tests::{column, error_text, Cluster, APP_ROLE, GATEWAY_ROLE};
use serde_json::{json, Value};

const SCHEMA: &str = "
    CREATE TABLE member (project_id int, user_id text, PRIMARY KEY (project_id, user_id));
    CREATE TABLE task (id int PRIMARY KEY, project_id int NOT NULL, title text);
    ALTER TABLE task ENABLE ROW LEVEL SECURITY;
    CREATE POLICY by_membership ON task USING (EXISTS (
        SELECT 1 FROM member m
         WHERE m.project_id = task.project_id
           AND m.user_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));
    CREATE TABLE marker (id int PRIMARY KEY);
    SELECT sync.track('task');
    SELECT sync.track('marker');";

async fn setup() -> (Cluster, Gateway) {
    let cluster = Cluster::start().await;
    cluster.execute(SCHEMA).await;
    let gateway = Gateway::start(&cluster, &[]).await;
    (cluster, gateway)
}

/// `user` subscribed to markers and tasks once the live stream has passed what is committed
/// now: an earlier membership's ACCESS row, read after the subscription, would have the
/// subscriber refetch.
async fn watching(cluster: &Cluster, gateway: &Gateway, user: &str) -> Session {
    gateway
        .passed(&cluster.current_cursor().await)
        .await
        .unwrap();
    let mut session = gateway.connect(user).await;
    session.subscribe(json!({"entityCode": "marker"})).await;
    session
        .subscribe(json!({"entityCode": "task", "mode": "delta"}))
        .await;
    session
}

fn resyncs(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m["type"] == "RESYNC")
        .map(|m| format!("{} {}", m["payload"]["entityCode"], m["payload"]["reason"]))
        .collect()
}

async fn snapshot_ids(gateway: &Gateway, user: &str) -> Vec<i64> {
    let (_, rows) = gateway.snapshot(user, "task").await.unwrap();
    let mut ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    ids.sort();
    ids
}

/// The `/v1/changes` answer of `user` for tasks after `since`.
async fn changes(gateway: &Gateway, user: &str, since: &str) -> Vec<Value> {
    let (status, body) = gateway
        .call(
            "GET",
            &format!("/v1/changes?since={since}&entityCode=task"),
            user,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["changes"].as_array().unwrap().clone()
}

/// `sql` and marker row `n` in one transaction: what `session` receives up to the marker.
async fn after(cluster: &Cluster, session: &mut Session, sql: &str, n: i32) -> Vec<Value> {
    cluster
        .execute(&format!("{sql}; INSERT INTO marker VALUES ({n});"))
        .await;
    session.changes_until(n).await
}

/// Task's policy plan for app_user, as the gateway reads it.
async fn task_plan(cluster: &Cluster) -> Value {
    cluster
        .connect_as(GATEWAY_ROLE, "postgres")
        .await
        .query_one(
            "SELECT sync.policy_plan('task'::regclass, $1)",
            &[&APP_ROLE],
        )
        .await
        .unwrap()
        .get(0)
}

/// Asserts that task's policy compiles to a membership: the gateway judges it, reading the
/// membership rows per page.
async fn assert_compiled(cluster: &Cluster) {
    let plan = task_plan(cluster).await;
    assert!(plan["expr"]["member"].is_object(), "{plan}");
}

/// b a member of project 1, and `piled` more rows under it (`x1`, `x2`, …) written by
/// app_user (a role, not a login: the superuser's session becomes it).
async fn pile_under_project_1(cluster: &Cluster, piled: usize) {
    cluster
        .connect()
        .await
        .batch_execute(&format!(
            "INSERT INTO member VALUES (1, 'b');
             SET ROLE app_user;
             INSERT INTO member SELECT 1, 'x' || i FROM generate_series(1, {piled}) i"
        ))
        .await
        .unwrap();
}

/// What `sync.members` answers the gateway role for task's membership, `keys` and `wanted`.
async fn members(cluster: &Cluster, keys: &[&str], wanted: Value) -> Value {
    let plan = task_plan(cluster).await;
    cluster
        .connect_as(GATEWAY_ROLE, "postgres")
        .await
        .query_one(
            "SELECT sync.members($1, $2, $3, $4)",
            &[&APP_ROLE, &plan["expr"]["member"], &keys, &wanted],
        )
        .await
        .unwrap()
        .get(0)
}

/// b subscribes, tasks 1 (project 1) and 2 (project 2) are written: b gets task 1 alone.
async fn b_gets_project_1s_new_task(cluster: &Cluster, gateway: &Gateway) {
    let mut b = watching(cluster, gateway, "b").await;
    let seen = after(
        cluster,
        &mut b,
        "INSERT INTO task VALUES (1, 1, 'one'), (2, 2, 'two')",
        1,
    )
    .await;
    assert_eq!(
        actions(&seen),
        [("1".to_owned(), "CREATE".to_owned())],
        "{seen:?}"
    );
}

/// What a replay of tasks from `since` sends `user`, up to its RESYNC or SYNCED.
async fn replayed(cluster: &Cluster, gateway: &Gateway, user: &str, since: &str) -> Vec<Value> {
    // Once the live stream has passed what is written now, so that the replay reaches it
    // (else the replay may end before the changes, and they come live after SYNCED).
    gateway
        .passed(&cluster.current_cursor().await)
        .await
        .unwrap();
    let mut replay = gateway.connect(user).await;
    replay
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "task", "mode": "delta", "since": since}}))
        .await;
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|m: &Value| m["type"] == "RESYNC" || m["type"] == "SYNCED")
    {
        seen.push(replay.next().await.expect("open"));
    }
    seen
}

/// b joins project 1, whose tasks exist already, then leaves it: each time b's live socket
/// is told to refetch, in order with the writes around it, and the refetched copy is what
/// PostgreSQL lets b SELECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_and_leaving_a_project_reaches_the_live_copy_in_order() {
    let (cluster, gateway) = setup().await;
    assert_compiled(&cluster).await;
    cluster
        .execute("INSERT INTO task VALUES (1, 1, 'one'), (2, 1, 'two'), (3, 2, 'other')")
        .await;
    let mut b = watching(&cluster, &gateway, "b").await;
    cluster.execute("INSERT INTO marker VALUES (1)").await;
    assert!(b.changes_until(1).await.is_empty());

    let seen = after(&cluster, &mut b, "INSERT INTO member VALUES (1, 'b')", 2).await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert_eq!(snapshot_ids(&gateway, "b").await, [1, 2]);

    // Resubscribed after the refetch, b follows its project's tasks as before.
    let mut b = watching(&cluster, &gateway, "b").await;
    let seen = after(
        &cluster,
        &mut b,
        "UPDATE task SET title = 'one again' WHERE id = 1;
             UPDATE task SET title = 'not b''s' WHERE id = 3",
        3,
    )
    .await;
    assert_eq!(
        actions(&seen),
        [("1".to_owned(), "UPDATE".to_owned())],
        "{seen:?}"
    );

    let seen = after(
        &cluster,
        &mut b,
        "DELETE FROM member WHERE user_id = 'b'",
        4,
    )
    .await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert!(snapshot_ids(&gateway, "b").await.is_empty());

    // Someone else's membership: its ACCESS row names the row (2, 'c'), which b's policy
    // cannot match, so b does not refetch.
    let mut b = watching(&cluster, &gateway, "b").await;
    let seen = after(&cluster, &mut b, "INSERT INTO member VALUES (2, 'c')", 5).await;
    assert!(resyncs(&seen).is_empty(), "{seen:?}");

    // 100 statements on the membership table that change nothing: no refetch.
    let mut b = watching(&cluster, &gateway, "b").await;
    let statements = "DELETE FROM member WHERE user_id = 'nobody';".repeat(100);
    let seen = after(&cluster, &mut b, &statements, 6).await;
    assert!(resyncs(&seen).is_empty(), "{seen:?}");
    // A statement that changes three rows of others: an ACCESS row naming each, no refetch.
    let admin = cluster.connect().await;
    let access = "SELECT count(*) FROM sync.change_history WHERE op = 'ACCESS'";
    let before = column::<i64>(&admin, access).await;
    let seen = after(
        &cluster,
        &mut b,
        "INSERT INTO member VALUES (3, 'x'), (4, 'x'), (5, 'x')",
        7,
    )
    .await;
    assert!(resyncs(&seen).is_empty(), "{seen:?}");
    assert_eq!(column::<i64>(&admin, access).await, [before[0] + 3]);
    // A bulk write: the first 100 rows named, then one ACCESS row naming none, where
    // everyone refetches, and none for the rest.
    let seen = after(
        &cluster,
        &mut b,
        "INSERT INTO member SELECT i, 'y' FROM generate_series(1, 150) i",
        8,
    )
    .await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert_eq!(column::<i64>(&admin, access).await, [before[0] + 3 + 101]);
    // TRUNCATE, which no row trigger sees: its own trigger.
    let mut b = watching(&cluster, &gateway, "b").await;
    let seen = after(&cluster, &mut b, "TRUNCATE member", 9).await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
}

/// A membership write concerns the user it names: b joins project 2, and only b refetches,
/// on the live stream, in a replay and in `/v1/changes` from before it. c, a member of
/// project 2 already, whose policy matches no row the write names, is shown the changes
/// around it (written before it in the same transaction too) and no refetch; b is shown
/// none of the versions written before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_membership_write_refetches_only_the_member_it_names() {
    let (cluster, gateway) = setup().await;
    assert_compiled(&cluster).await;
    cluster
        .execute(
            "INSERT INTO member VALUES (1, 'b'), (2, 'c');
             INSERT INTO task VALUES (1, 1, 'one'), (2, 2, 'two');",
        )
        .await;
    let cursor = cluster.current_cursor().await;
    let mut b = watching(&cluster, &gateway, "b").await;
    let mut c = watching(&cluster, &gateway, "c").await;
    let write = "BEGIN;
         UPDATE task SET title = 'two v2' WHERE id = 2;
         INSERT INTO member VALUES (2, 'b');
         UPDATE task SET title = 'two v3' WHERE id = 2;
         INSERT INTO marker VALUES (1);
         COMMIT;";
    cluster.execute(write).await;
    let seen = b.changes_until(1).await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert!(
        !serde_json::to_string(&seen).unwrap().contains("two v2"),
        "{seen:?}"
    );
    let titles = |seen: &[Value]| -> Vec<Value> {
        seen.iter()
            .filter(|m| m["type"] == "DELTA")
            .flat_map(|m| m["payload"]["changes"].as_array().unwrap().clone())
            .map(|c| c["data"]["title"].clone())
            .collect()
    };
    let seen = c.changes_until(1).await;
    assert!(
        resyncs(&seen).is_empty(),
        "c refetched for b's membership: {seen:?}"
    );
    assert_eq!(titles(&seen), ["two v2", "two v3"], "{seen:?}");

    // Read from before it, as an offline client would: the same.
    let answer = changes(&gateway, "c", &cursor).await;
    let text = serde_json::to_string(&answer).unwrap();
    assert!(!text.contains("RESYNC"), "{text}");
    assert_eq!(
        answer
            .iter()
            .map(|c| c["data"]["title"].clone())
            .collect::<Vec<_>>(),
        [json!("two v2"), json!("two v3")],
        "{text}"
    );
    let answer = changes(&gateway, "b", &cursor).await;
    let text = serde_json::to_string(&answer).unwrap();
    assert!(!text.contains("two v2"), "{text}");
    assert_eq!(answer[0]["action"], "RESYNC", "{text}");
    let seen = replayed(&cluster, &gateway, "c", &cursor).await;
    assert!(resyncs(&seen).is_empty(), "{seen:?}");
    assert_eq!(titles(&seen), ["two v2", "two v3"], "{seen:?}");
    let seen = replayed(&cluster, &gateway, "b", &cursor).await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert!(
        !serde_json::to_string(&seen).unwrap().contains("two v2"),
        "{seen:?}"
    );
    assert_eq!(snapshot_ids(&gateway, "b").await, [1, 2]);
}

/// c is a member of project 5 and holds task 1 from a snapshot; task 1 moves to project 1,
/// where c is no member, and then c's membership of 5 ends. Judged by the membership of the
/// moment of reading, the move is no longer c's to see and the DELETE vanished: an offline
/// client kept task 1 for good. Now the membership's end is in the log after the move, and
/// both a replay and `/v1/changes` from c's cursor end with the refetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_membership_that_ends_before_the_change_is_read_still_removes_the_row() {
    let (cluster, gateway) = setup().await;
    cluster
        .execute(
            "INSERT INTO member VALUES (5, 'c');
             INSERT INTO task VALUES (1, 5, 'moving');",
        )
        .await;
    let (cursor, rows) = gateway.snapshot("c", "task").await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    cluster
        .execute(
            "UPDATE task SET project_id = 1 WHERE id = 1;
             DELETE FROM member WHERE project_id = 5 AND user_id = 'c';",
        )
        .await;

    let answer = changes(&gateway, "c", &cursor).await;
    assert_eq!(
        answer.last().map(|c| c["action"].clone()),
        Some(json!("RESYNC")),
        "the row stays in c's copy: {answer:?}"
    );

    let seen = replayed(&cluster, &gateway, "c", &cursor).await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert!(snapshot_ids(&gateway, "c").await.is_empty());
}

/// Task 7 of project 2 is updated to v2, then v3, and then b joins project 2. PostgreSQL
/// only ever let b SELECT v3, but judged by the membership at the time of reading, b's
/// `/v1/changes` from an older cursor returned UPDATE v2 and UPDATE v3. Now every version
/// written before the membership is shown to nobody, and b refetches (getting v3).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_never_shows_versions_written_before_the_membership() {
    let (cluster, gateway) = setup().await;
    cluster
        .execute("INSERT INTO task VALUES (7, 2, 'v1')")
        .await;
    let cursor = cluster.current_cursor().await;
    cluster
        .execute(
            "UPDATE task SET title = 'v2' WHERE id = 7;
             UPDATE task SET title = 'v3' WHERE id = 7;
             INSERT INTO member VALUES (2, 'b');",
        )
        .await;

    let answer = changes(&gateway, "b", &cursor).await;
    let text = serde_json::to_string(&answer).unwrap();
    assert!(!text.contains("v2") && !text.contains("v3"), "{text}");
    assert_eq!(answer.len(), 1, "{text}");
    assert_eq!(answer[0]["action"], "RESYNC", "{text}");

    let seen = replayed(&cluster, &gateway, "b", &cursor).await;
    let text = serde_json::to_string(&seen).unwrap();
    assert!(!text.contains("v2") && !text.contains("v3"), "{text}");
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{text}");
    let (_, rows) = gateway.snapshot("b", "task").await.unwrap();
    assert_eq!(rows, [json!({"id": 7, "project_id": 2, "title": "v3"})]);
}

/// The trigger follows the policies: a policy that reads another table adds it, a renamed
/// trigger is still found, a dropped policy removes it, and a table owner cannot have it put
/// on a table the owner may not alter, nor attach it by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_watched_tables_follow_the_policies_and_no_one_else() {
    let (cluster, _gateway) = setup().await;
    let admin = cluster.connect().await;
    let watched = || {
        column::<String>(
            &admin,
            "SELECT tgrelid::regclass::text || ' ' || encode(tgargs, 'escape')
               FROM pg_trigger WHERE tgfoid = 'sync._policy_input()'::regprocedure ORDER BY 1",
        )
    };
    let oid = |table: &'static str| {
        let admin = &admin;
        async move {
            let oid: String = admin
                .query_one(&format!("SELECT '{table}'::regclass::oid::text"), &[])
                .await
                .unwrap()
                .get(0);
            oid
        }
    };
    let (task, member) = (oid("task").await, oid("member").await);
    // One trigger per changed row, one at TRUNCATE; their arguments name the table, the
    // columns the policy reads of it, and the tracked table whose policy reads it.
    let args = format!(
        "member {{\"input\" : {member}, \"columns\" : [\"project_id\",\"user_id\"]}}\\000{task}\\000"
    );
    let both = [args.clone(), args];
    assert_eq!(watched().await, both);
    // Renamed by the owner of `member`, it is still pg_sync's, and not made twice.
    cluster
        .execute(
            "DO $$ BEGIN EXECUTE format('ALTER TRIGGER %I ON member RENAME TO renamed',
                 (SELECT min(tgname) FROM pg_trigger
                   WHERE tgfoid = 'sync._policy_input()'::regprocedure));
             END $$;
             GRANT SELECT ON member TO PUBLIC;",
        )
        .await;
    assert_eq!(watched().await, both);

    cluster.execute("DROP POLICY by_membership ON task").await;
    assert!(watched().await.is_empty());

    // An owner of a tracked table whose policy reads a table it may read but not alter: a
    // trigger there would be pg_sync's doing, not hers (and would slow its writers).
    cluster
        .execute(
            "CREATE TABLE payroll (id int PRIMARY KEY, salary int);
             GRANT SELECT ON payroll TO PUBLIC;
             CREATE ROLE mallory LOGIN;
             GRANT USAGE, CREATE ON SCHEMA public TO mallory;
             GRANT USAGE ON SCHEMA sync TO mallory;
             GRANT EXECUTE ON FUNCTION sync.track(regclass, text, text, text[]) TO mallory;",
        )
        .await;
    let mallory = cluster.connect_as("mallory", "postgres").await;
    mallory
        .batch_execute(
            "CREATE TABLE mine (id int PRIMARY KEY);
             ALTER TABLE mine ENABLE ROW LEVEL SECURITY;
             CREATE POLICY peek ON mine USING (EXISTS (SELECT 1 FROM payroll));
             SELECT sync.track('mine');",
        )
        .await
        .unwrap();
    assert!(watched().await.is_empty());

    // Nobody but pg_sync may attach the trigger: it writes ACCESS rows of whatever it names.
    let forged = mallory
        .batch_execute(&format!(
            "CREATE TABLE noise (id int);
             CREATE TRIGGER forged AFTER INSERT ON noise FOR EACH STATEMENT
                 EXECUTE FUNCTION sync._policy_input('{}')",
            task
        ))
        .await
        .unwrap_err();
    assert_eq!(
        forged.code().map(|c| c.code()),
        Some("42501"),
        "{}",
        error_text(&forged)
    );
}

/// A policy that starts reading another table, or reads more of it, moves its tracked table's
/// access once: the triggers on the table read are made (or replaced) before who may read the
/// tracked table is noted again, so the next, unrelated command writes no ACCESS row of it.
/// (Noted first, the digest moved once more at the next command that notes access; and
/// pg_sync's own ALTER and DROP of its triggers noted it in passing, once each: every
/// subscriber of the table refetched 2-4 times for one command.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_that_starts_reading_a_table_moves_access_once() {
    let cluster = Cluster::start().await;
    cluster.execute(SCHEMA).await;
    let admin = cluster.connect().await;
    let accesses = || {
        column::<i64>(
            &admin,
            "SELECT count(*) FROM sync.change_history WHERE op = 'ACCESS' AND entity_code = 'task'",
        )
    };
    let before = accesses().await[0];
    cluster
        .execute(
            "CREATE TABLE viewer (user_id text PRIMARY KEY, active bool);
             CREATE POLICY by_viewer ON task USING (EXISTS (
                 SELECT 1 FROM viewer v
                  WHERE v.user_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'))",
        )
        .await;
    assert_eq!(accesses().await, [before + 1]);
    cluster.execute("GRANT SELECT ON marker TO PUBLIC").await;
    assert_eq!(accesses().await, [before + 1]);
    // Reading another column of it replaces the triggers, which name the columns read.
    cluster
        .execute(
            "ALTER POLICY by_viewer ON task USING (EXISTS (
                 SELECT 1 FROM viewer v
                  WHERE v.active
                    AND v.user_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'))",
        )
        .await;
    assert_eq!(accesses().await, [before + 2]);
    cluster.execute("REVOKE SELECT ON marker FROM PUBLIC").await;
    assert_eq!(accesses().await, [before + 2]);
}

/// Plain inheritance: the policy's `FROM member` reads the rows of the tables inheriting from
/// `member` too, but PostgreSQL fires the row triggers of the table a row is in, not its
/// parent's. So each inheriting table is watched as `member` is: a membership written into
/// one, or through `member` into one, reaches b as a refetch; and so does a table with rows
/// that starts or stops inheriting (`ALTER TABLE ... [NO] INHERIT`), which changes no row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memberships_in_inheriting_tables_reach_the_copy() {
    let (cluster, gateway) = setup().await;
    cluster
        .execute(
            "INSERT INTO task VALUES (1, 1, 'one');
             CREATE TABLE guest (since date) INHERITS (member);
             CREATE TABLE visitor (project_id int NOT NULL, user_id text NOT NULL);
             INSERT INTO visitor VALUES (1, 'b')",
        )
        .await;
    assert_compiled(&cluster).await;
    let access_changed = ["\"task\" \"access_changed\""];
    let mut marker = 0;
    let steps: [(&str, &[i64]); 8] = [
        ("INSERT INTO guest VALUES (1, 'b')", &[1]),
        ("DELETE FROM member WHERE user_id = 'b'", &[]),
        ("ALTER TABLE visitor INHERIT member", &[1]),
        ("UPDATE member SET user_id = 'c' WHERE user_id = 'b'", &[]),
        ("UPDATE visitor SET user_id = 'b'", &[1]),
        ("ALTER TABLE visitor NO INHERIT member", &[]),
        // A table made inside CREATE SCHEMA, whose command is CREATE SCHEMA.
        (
            "CREATE SCHEMA annex CREATE TABLE h () INHERITS (member)",
            &[],
        ),
        ("INSERT INTO annex.h VALUES (1, 'b')", &[1]),
    ];
    for (sql, visible) in steps {
        marker += 1;
        let mut b = watching(&cluster, &gateway, "b").await;
        let seen = after(&cluster, &mut b, sql, marker).await;
        assert_eq!(resyncs(&seen), access_changed, "{sql}: {seen:?}");
        assert_eq!(snapshot_ids(&gateway, "b").await, visible, "{sql}");
    }
}

/// A partitioned membership table: PostgreSQL copies its row trigger onto each partition,
/// and those copies are not pg_sync's to drop (every DDL command, which watches the tables
/// again, failed on them); a write straight into a partition is seen through its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_membership_table_is_watched_through_its_partitions() {
    let cluster = Cluster::start().await;
    cluster
        .execute(&SCHEMA.replace(
            "CREATE TABLE member (project_id int, user_id text, PRIMARY KEY (project_id, user_id));",
            "CREATE TABLE member (project_id int, user_id text, PRIMARY KEY (project_id, user_id))
                 PARTITION BY RANGE (project_id);
             CREATE TABLE member_low PARTITION OF member FOR VALUES FROM (0) TO (100);",
        ))
        .await;
    // DDL after the watch began: it watches again, and leaves the copies alone.
    cluster
        .execute(
            "GRANT SELECT ON member TO PUBLIC;
             CREATE TABLE member_high PARTITION OF member FOR VALUES FROM (100) TO (200);",
        )
        .await;
    let gateway = Gateway::start(&cluster, &[]).await;
    cluster
        .execute("INSERT INTO task VALUES (1, 1, 'one')")
        .await;
    let mut b = watching(&cluster, &gateway, "b").await;
    let seen = after(
        &cluster,
        &mut b,
        "INSERT INTO member_low VALUES (1, 'b')",
        1,
    )
    .await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert_eq!(snapshot_ids(&gateway, "b").await, [1]);
}

/// `/v1/changes` of tasks for `user` from `since`, `limit` at a time, up to its RESYNC or the
/// log's end: every change of every page, in order.
async fn changes_in_pages(gateway: &Gateway, user: &str, since: &str, limit: u32) -> Vec<Value> {
    let mut since = since.to_owned();
    let mut all = Vec::new();
    for _ in 0..100 {
        let (status, body) = gateway
            .call(
                "GET",
                &format!("/v1/changes?since={since}&entityCode=task&limit={limit}"),
                user,
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let page = body["changes"].as_array().unwrap();
        all.extend(page.iter().cloned());
        let next = body["cursor"].as_str().unwrap();
        if page.iter().any(|c| c["action"] == "RESYNC") || next == since {
            return all;
        }
        since = next.to_owned();
    }
    panic!("no end after 100 pages: {all:?}");
}

/// The same across pages: versions written in transactions before b joins project 2, read
/// in pages that end before the membership row (`/v1/changes` 500 at a time, a replay of a
/// transaction larger than its page). Judged by the membership as it was when each page was
/// read, b was shown every version of the pages before the one holding the ACCESS row. Now a
/// page of changes that the log already follows with an ACCESS row of their entity is shown
/// to nobody, and b refetches where that row is. Changes after an ACCESS row are shown as
/// ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_before_the_membership_show_none_of_its_versions() {
    let (cluster, gateway) = setup().await;
    cluster
        .execute("INSERT INTO task VALUES (7, 2, 'v1')")
        .await;
    let cursor = cluster.current_cursor().await;
    cluster
        .execute("UPDATE task SET title = 'v2' WHERE id = 7")
        .await;
    cluster
        .execute(
            "DO $$ BEGIN
                 FOR i IN 1..2500 LOOP UPDATE task SET title = 'w' || i WHERE id = 7; END LOOP;
             END $$",
        )
        .await;
    cluster.execute("INSERT INTO member VALUES (2, 'b')").await;

    let answer = changes_in_pages(&gateway, "b", &cursor, 500).await;
    let text = serde_json::to_string(&answer).unwrap();
    assert!(!text.contains("\"v2\"") && !text.contains("\"w"), "{text}");
    assert_eq!(answer.len(), 1, "{text}");
    assert_eq!(answer[0]["action"], "RESYNC", "{text}");

    let seen = replayed(&cluster, &gateway, "b", &cursor).await;
    let text = serde_json::to_string(&seen).unwrap();
    assert!(!text.contains("\"v2\"") && !text.contains("\"w"), "{text}");
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{text}");

    // A change after an ACCESS row of the same read is b's as before.
    let cursor = cluster.current_cursor().await;
    cluster.execute("INSERT INTO member VALUES (3, 'b')").await;
    cluster
        .execute("UPDATE task SET title = 'after' WHERE id = 7")
        .await;
    let (status, body) = gateway
        .call(
            "GET",
            &format!("/v1/changes?since={cursor}&entityCode=task&limit=1"),
            "b",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"][0]["action"], "RESYNC", "{body}");
    let next = body["cursor"].as_str().unwrap();
    let after = changes(&gateway, "b", next).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["data"]["title"], "after", "{after:?}");
}

/// Membership one level further: a task is visible to the members of its project's
/// organisation. Both tables the policy reads are watched, so joining the organisation,
/// moving a project to another organisation and leaving each reach b's live copy as a
/// refetch, in order with the writes around them, and the refetched copy is what PostgreSQL
/// lets b SELECT; a replay and `/v1/changes` from before the join show none of the versions
/// written before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nested_membership_reaches_the_copy_through_either_table() {
    let cluster = Cluster::start().await;
    cluster
        .execute(
            "CREATE TABLE org_member (org_id int, user_id text, PRIMARY KEY (org_id, user_id));
             CREATE TABLE project (id int PRIMARY KEY, org_id int NOT NULL);
             CREATE TABLE task (id int PRIMARY KEY, project_id int NOT NULL, title text);
             ALTER TABLE task ENABLE ROW LEVEL SECURITY;
             CREATE POLICY by_organisation ON task USING (EXISTS (
                 SELECT 1 FROM project p JOIN org_member o ON o.org_id = p.org_id
                  WHERE p.id = task.project_id
                    AND o.user_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));
             CREATE TABLE marker (id int PRIMARY KEY);
             SELECT sync.track('task');
             SELECT sync.track('marker');
             INSERT INTO project VALUES (1, 10), (2, 10), (3, 20);
             INSERT INTO task VALUES (1, 1, 'one'), (2, 2, 'two'), (3, 3, 'three');",
        )
        .await;
    let gateway = Gateway::start(&cluster, &[]).await;
    let before = cluster.current_cursor().await;
    cluster
        .execute("UPDATE task SET title = 'written before' WHERE id = 1")
        .await;

    let mut b = watching(&cluster, &gateway, "b").await;
    let seen = after(
        &cluster,
        &mut b,
        "INSERT INTO org_member VALUES (10, 'b')",
        1,
    )
    .await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert_eq!(snapshot_ids(&gateway, "b").await, [1, 2]);

    let mut b = watching(&cluster, &gateway, "b").await;
    let seen = after(
        &cluster,
        &mut b,
        "UPDATE project SET org_id = 20 WHERE id = 2",
        2,
    )
    .await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert_eq!(snapshot_ids(&gateway, "b").await, [1]);

    // Between the refetches, b follows its organisation's tasks as any subscriber does.
    let mut b = watching(&cluster, &gateway, "b").await;
    let seen = after(
        &cluster,
        &mut b,
        "UPDATE task SET title = 'one again' WHERE id = 1;
         UPDATE task SET title = 'not b''s' WHERE id = 3",
        3,
    )
    .await;
    assert_eq!(
        actions(&seen),
        [("1".to_owned(), "UPDATE".to_owned())],
        "{seen:?}"
    );

    let seen = after(
        &cluster,
        &mut b,
        "DELETE FROM org_member WHERE user_id = 'b'",
        4,
    )
    .await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert!(snapshot_ids(&gateway, "b").await.is_empty());

    for answer in [
        serde_json::to_string(&changes_in_pages(&gateway, "b", &before, 1).await).unwrap(),
        serde_json::to_string(&replayed(&cluster, &gateway, "b", &before).await).unwrap(),
    ] {
        assert!(!answer.contains("written before"), "{answer}");
        assert!(answer.contains("access_changed"), "{answer}");
    }
}

/// What one page's question found is kept for the next, and must not outlive the row it
/// is about. c's task page is judged in the database (nothing follows it then); c leaves, so
/// that the page of b joining project 2, its ACCESS row, asks nothing; then task 1 changes.
/// The ACCESS row is before that change, not after it: b, subscribed after joining, gets the
/// change. (The first version of the question, kept as "nothing seen by this snapshot",
/// found the ACCESS row again and hid the change from everyone, with no refetch to follow.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_after_a_membership_is_not_hidden_by_it() {
    let (cluster, gateway) = setup().await;
    cluster
        .execute("INSERT INTO member VALUES (2, 'c'); INSERT INTO task VALUES (1, 2, 'one')")
        .await;
    // The live stream has passed those writes before c subscribes.
    let mut probe = gateway.connect("probe").await;
    probe.subscribe(json!({"entityCode": "marker"})).await;
    cluster.execute("INSERT INTO marker VALUES (0)").await;
    probe.changes_until(0).await;
    let mut c = watching(&cluster, &gateway, "c").await;
    let seen = after(
        &cluster,
        &mut c,
        "UPDATE task SET title = 'c saw' WHERE id = 1",
        1,
    )
    .await;
    assert_eq!(
        actions(&seen),
        [("1".to_owned(), "UPDATE".to_owned())],
        "{seen:?}"
    );
    let subscriptions = gateway.metric("sync_subscriptions").await;
    c.drop_connection();
    tokio::time::timeout(PATIENCE, async {
        while gateway.metric("sync_subscriptions").await > subscriptions - 2 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("c's subscriptions end");
    after(
        &cluster,
        &mut probe,
        "INSERT INTO member VALUES (2, 'b')",
        2,
    )
    .await;

    // The change ends its transaction and so the live read's batch: its cursor is the
    // batch's end.
    let mut b = watching(&cluster, &gateway, "b").await;
    cluster
        .execute("INSERT INTO marker VALUES (3); UPDATE task SET title = 'b sees' WHERE id = 1")
        .await;
    b.changes_until(3).await;
    let next = b.next_within(PATIENCE).await;
    let Some(Ok(message)) = next else {
        panic!("b never got the change: {next:?}");
    };
    assert_eq!(
        actions(std::slice::from_ref(&message)),
        [("1".to_owned(), "UPDATE".to_owned())],
        "{message}"
    );
}

/// A policy starts reading another column of `member` while a reader holds `member`: the
/// trigger, which names the columns the policies read, cannot be replaced (its update waits
/// 1 s for the lock, then warns) and keeps naming the old ones. An UPDATE of the new column
/// alone must still reach the member it makes an editor: its ACCESS row names a row that
/// lacks the column the compiled policy compares, which concerns every subscriber.
#[tokio::test]
async fn a_column_the_trigger_does_not_name_yet_still_refetches() {
    let (cluster, gateway) = setup().await;
    cluster
        .execute(
            "ALTER TABLE member ADD COLUMN role text NOT NULL DEFAULT 'viewer';
             INSERT INTO member VALUES (1, 'b');
             INSERT INTO task VALUES (1, 1, 'one');",
        )
        .await;
    let reader = cluster.connect().await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM member;")
        .await
        .unwrap();
    cluster
        .execute(
            "DROP POLICY by_membership ON task;
             CREATE POLICY by_membership ON task USING (EXISTS (
                 SELECT 1 FROM member m
                  WHERE m.project_id = task.project_id AND m.role = 'editor'
                    AND m.user_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));",
        )
        .await;
    reader.batch_execute("COMMIT").await.unwrap();
    let admin = cluster.connect().await;
    let args = column::<String>(
        &admin,
        "SELECT DISTINCT encode(tgargs, 'escape') FROM pg_trigger
          WHERE tgfoid = 'sync._policy_input()'::regprocedure",
    )
    .await;
    assert!(
        args.len() == 1 && !args[0].contains("role"),
        "the trigger was replaced after all: {args:?}"
    );
    assert_compiled(&cluster).await;
    assert!(snapshot_ids(&gateway, "b").await.is_empty());

    let mut b = watching(&cluster, &gateway, "b").await;
    let seen = after(
        &cluster,
        &mut b,
        "UPDATE member SET role = 'editor' WHERE user_id = 'b'",
        1,
    )
    .await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert_eq!(snapshot_ids(&gateway, "b").await, [1]);
}

/// The table's owner renames the membership column the policy reads and gives its name to a
/// new column that says otherwise. PostgreSQL's policy still reads the old column (by
/// number), so c, named only in the new one, sees nothing; the compiled policy, planned
/// before the rename, must not read the new column in its place: c gets no task (its reading
/// of tasks is refused instead, as the plan no longer holds).
#[tokio::test]
async fn a_renamed_membership_column_is_not_read_in_its_place() {
    let (cluster, gateway) = setup().await;
    cluster.execute("INSERT INTO member VALUES (1, 'b')").await;
    let mut c = watching(&cluster, &gateway, "c").await;
    // Judged once: the gateway holds the plan.
    let seen = after(&cluster, &mut c, "INSERT INTO task VALUES (1, 1, 'one')", 1).await;
    assert!(seen.is_empty(), "{seen:?}");
    let seen = after(
        &cluster,
        &mut c,
        "ALTER TABLE member RENAME COLUMN user_id TO invited_by;
         ALTER TABLE member ADD COLUMN user_id text;
         UPDATE member SET user_id = 'c'",
        2,
    )
    .await;
    assert_eq!(resyncs(&seen), ["\"task\" \"access_changed\""], "{seen:?}");
    assert!(snapshot_ids(&gateway, "c").await.is_empty());
    let mut c = watching(&cluster, &gateway, "c").await;
    let seen = after(&cluster, &mut c, "INSERT INTO task VALUES (2, 1, 'two')", 3).await;
    assert!(
        !seen.iter().any(|m| m["type"] == "DELTA"),
        "c was shown a task of a project it is no member of: {seen:?}"
    );
}

/// The membership table's owner changes what the compiled policy relies on: its triggers
/// disabled (no change of it would be seen), row-level security on it, a column renamed.
/// Each is a change of who may read tasks: subscribers refetch, and the policy is planned
/// again (judged in the database while the watch is off).
#[tokio::test]
async fn what_the_membership_table_is_refetches_when_it_changes() {
    let (cluster, gateway) = setup().await;
    cluster.execute("INSERT INTO member VALUES (1, 'b')").await;
    let mut b = watching(&cluster, &gateway, "b").await;
    for (n, ddl) in [
        "ALTER TABLE member DISABLE TRIGGER ALL",
        "ALTER TABLE member ENABLE TRIGGER ALL",
        "ALTER TABLE member ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE member DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE member RENAME COLUMN user_id TO login",
    ]
    .into_iter()
    .enumerate()
    {
        let n = n as i32 + 1;
        let seen = after(&cluster, &mut b, ddl, n).await;
        assert_eq!(
            resyncs(&seen),
            ["\"task\" \"access_changed\""],
            "{ddl}: {seen:?}"
        );
        b = watching(&cluster, &gateway, "b").await;
    }
    // Planned again after the rename: b still follows its project's tasks.
    let seen = after(
        &cluster,
        &mut b,
        "INSERT INTO task VALUES (1, 1, 'one')",
        10,
    )
    .await;
    assert_eq!(
        actions(&seen),
        [("1".to_owned(), "CREATE".to_owned())],
        "{seen:?}"
    );
}

/// The IN form of the policy compiles too, and judges as PostgreSQL does: b, a member of
/// project 1 only, follows project 1's tasks and nothing of project 2's.
#[tokio::test]
async fn a_membership_written_with_in_follows_the_members_projects() {
    let (cluster, gateway) = setup().await;
    cluster
        .execute(
            "DROP POLICY by_membership ON task;
             CREATE POLICY by_membership ON task USING (project_id IN (
                 SELECT m.project_id FROM member m
                  WHERE m.user_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));
             INSERT INTO member VALUES (1, 'b')",
        )
        .await;
    assert_compiled(&cluster).await;
    let mut b = watching(&cluster, &gateway, "b").await;
    let seen = after(
        &cluster,
        &mut b,
        "INSERT INTO task VALUES (1, 1, 'b''s'), (2, 2, 'not b''s');
         UPDATE task SET project_id = 1 WHERE id = 2",
        1,
    )
    .await;
    let mut actions = actions(&seen);
    actions.sort();
    assert_eq!(
        actions,
        [
            ("1".to_owned(), "CREATE".to_owned()),
            ("2".to_owned(), "CREATE".to_owned())
        ],
        "{seen:?}"
    );
    assert_eq!(snapshot_ids(&gateway, "b").await, [1, 2]);
}

/// A user who may write the membership table piles 10,000 rows under project 1, for users
/// nobody subscribes as (or for the users of a role that others share). The gateway asks
/// only for the rows its subscribers' claims can match, so the answer for a page of that
/// project stays the real member's row, and the member still follows the project's tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_piled_under_a_key_are_not_read_for_anyone() {
    let (cluster, gateway) = setup().await;
    assert_compiled(&cluster).await;
    pile_under_project_1(&cluster, 10_000).await;
    // What the gateway asks for a page of project 1's tasks with b, c and x5 subscribed.
    let answer = members(&cluster, &["1", "2"], json!([["b"], ["c"], ["x5"]])).await;
    assert_eq!(answer, json!({"1": [["b"], ["x5"]]}));
    b_gets_project_1s_new_task(&cluster, &gateway).await;
}

/// Past the rows `sync.members` scans under a page's keys (100,000), its answer is `null`
/// and the gateway has the database judge the page for that role instead: the policy's
/// own EXISTS probes the primary key. The member still follows the project.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_with_more_rows_than_are_scanned_is_judged_by_the_database() {
    let (cluster, gateway) = setup().await;
    assert_compiled(&cluster).await;
    pile_under_project_1(&cluster, 100_000).await;
    assert_eq!(members(&cluster, &["1"], json!([["b"]])).await, Value::Null);
    b_gets_project_1s_new_task(&cluster, &gateway).await;
}
