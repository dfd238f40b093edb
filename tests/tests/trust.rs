//! Trust, third look: each hole an attacker had in pg_sync 0.2.0, tried again as that
//! attacker — a plain login role that owns a tracked table (`mallory`), an app user with a
//! token, any role that can connect — and the guards that close each kind:
//! - every SECURITY DEFINER function pins `search_path` with `pg_temp` last (checked on the
//!   installed catalog, so a future function cannot forget it);
//! - who may read what is re-derived from the catalogs (`sync.access_digests`), so
//!   commands without event triggers take effect within the poll interval;
//! - a log row is judged under the tracking that wrote it;
//! - no row that any role's command writes is on the path of every delivery.

use pg_sync_tests::gateway::{actions, Gateway, Session};
use pg_sync_tests::{column, error_text, Cluster};
use serde_json::{json, Value};
use tokio_postgres::Client;

/// mallory owns a schema and may track and untrack her tables, as README's owners may.
const MALLORY: &str = "
    CREATE ROLE mallory LOGIN;
    CREATE SCHEMA m AUTHORIZATION mallory;
    GRANT USAGE ON SCHEMA sync TO mallory;
    GRANT EXECUTE ON FUNCTION sync.track(regclass, text, text, text[]),
                              sync.untrack(regclass) TO mallory;";

async fn is_superuser(cluster: &Cluster, role: &str) -> bool {
    cluster
        .connect()
        .await
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .unwrap()
        .get(0)
}

/// Every relation of pg_catalog, shadowed by a temporary view of mallory's whose reading
/// runs `m.hit()`: it tries to make mallory a superuser and records whom it ran as.
async fn shadow_the_catalogs(mallory: &Client) {
    mallory
        .batch_execute(
            "CREATE TABLE m.hits (who text, super boolean);
             GRANT INSERT ON m.hits TO PUBLIC;
             CREATE FUNCTION m.hit() RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO m.hits SELECT current_user, rolsuper FROM pg_catalog.pg_roles
                                     WHERE rolname = current_user;
                 BEGIN
                     EXECUTE 'ALTER ROLE mallory SUPERUSER';
                 EXCEPTION WHEN insufficient_privilege THEN NULL;
                 END;
                 RETURN true;
             END $$;
             GRANT EXECUTE ON FUNCTION m.hit() TO PUBLIC;
             DO $$
             DECLARE r name;
             BEGIN
                 FOR r IN SELECT c.relname FROM pg_catalog.pg_class c
                           WHERE c.relnamespace = 'pg_catalog'::regnamespace
                             AND c.relkind IN ('r', 'v') LOOP
                     BEGIN
                         EXECUTE format('CREATE TEMP VIEW %I AS SELECT * FROM pg_catalog.%I WHERE m.hit()', r, r);
                     EXCEPTION WHEN wrong_object_type OR invalid_table_definition THEN
                         NULL; -- pg_statistic's anyarray columns cannot be a view's
                     END;
                 END LOOP;
             END $$;",
        )
        .await
        .unwrap();
}

/// The temp schema comes first in the search path of a function that names only pg_catalog:
/// a table owner's temporary view named like a catalog ran her code as the extension's owner
/// (a superuser) in `track`, `untrack` and the event triggers any ALTER TABLE fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_owner_cannot_become_superuser_through_the_temp_schema() {
    let cluster = Cluster::start().await;
    cluster.execute(MALLORY).await;
    let mallory = cluster.connect_as("mallory", "postgres").await;
    mallory
        .batch_execute(
            "CREATE TABLE m.t (id int PRIMARY KEY, v int); CREATE TABLE m.u (id int PRIMARY KEY)",
        )
        .await
        .unwrap();
    shadow_the_catalogs(&mallory).await;
    for attack in [
        "SELECT sync.track('m.t')",
        "SELECT sync.track('m.t', columns => ARRAY['v'])",
        "ALTER TABLE m.t ADD COLUMN w int",
        "GRANT SELECT ON m.t TO PUBLIC",
        "SELECT sync.untrack('m.t')",
        "SELECT sync.track('m.u')",
        "DROP TABLE m.u",
        "INSERT INTO m.t VALUES (1, 1)",
    ] {
        mallory
            .batch_execute(attack)
            .await
            .unwrap_or_else(|e| panic!("{attack}: {}", error_text(&e)));
        assert!(
            !is_superuser(&cluster, "mallory").await,
            "{attack} made mallory a superuser"
        );
    }
    let elevated: i64 = cluster
        .connect()
        .await
        .query_one("SELECT count(*) FROM m.hits WHERE super", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(elevated, 0, "mallory's code ran as a superuser");
}

/// The kind closed for good: every SECURITY DEFINER function of the installed extension (SQL
/// and Rust alike) and every SQL function of sync sets `search_path = pg_catalog, pg_temp`.
/// (The upgrade tests check that an updated database has the same functions.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_definer_function_of_sync_searches_pg_temp_last() {
    let cluster = Cluster::start().await;
    let loose: Vec<String> = column(
        &cluster.connect().await,
        "SELECT p.oid::regprocedure::text || ' ' || coalesce(p.proconfig::text, 'no settings')
           FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
          WHERE p.pronamespace = 'sync'::regnamespace
            AND (p.prosecdef OR l.lanname IN ('sql', 'plpgsql'))
            AND NOT 'search_path=pg_catalog, pg_temp' = ANY (coalesce(p.proconfig, '{}'))
          ORDER BY 1",
    )
    .await;
    assert!(
        loose.is_empty(),
        "functions without search_path = pg_catalog, pg_temp: {loose:#?}"
    );
}

/// A user subscribed to `doc` (and the `marker` table whose rows end a step).
async fn watching(gateway: &Gateway, sub: &str, token_role: Option<&str>) -> Session {
    let token = match token_role {
        Some(role) => pg_sync_tests::gateway::token(sub, &[("role", json!(role))]),
        None => pg_sync_tests::gateway::token(sub, &[]),
    };
    let mut session = gateway
        .connect_with(&token, "")
        .await
        .unwrap_or_else(|status| panic!("{sub} refused: {status}"));
    session.subscribe(json!({"entityCode": "marker"})).await;
    session
        .subscribe(json!({"entityCode": "doc", "mode": "delta"}))
        .await;
    session
}

fn errors(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m["type"] == "ERROR")
        .map(|m| m["payload"]["code"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Runs `command`, waits until the gateway judges by who may read what after it, then
/// writes `rows` and the marker row `marker`: what `session` received up to the marker.
async fn after_access_change(
    cluster: &Cluster,
    gateway: &Gateway,
    session: &mut Session,
    command: &str,
    rows: &str,
    marker: i32,
) -> Vec<Value> {
    let before = gateway.metric("sync_access_epoch").await;
    cluster.execute(command).await;
    gateway.access_epoch_after(before).await;
    cluster
        .execute(&format!("{rows}; INSERT INTO marker VALUES ({marker})"))
        .await;
    session.changes_until(marker).await
}

const DOCS: &str = "
    CREATE TABLE doc (id int PRIMARY KEY, owner text NOT NULL);
    ALTER TABLE doc ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON doc USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
    CREATE TABLE marker (id int PRIMARY KEY);
    SELECT sync.track('doc'); SELECT sync.track('marker');";

/// DROP OWNED revokes a role's privileges, REASSIGN OWNED takes a table's ownership (and
/// with it the exemption from its policies) from a role: neither was noticed, and open
/// sockets went on receiving rows PostgreSQL no longer let their users SELECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_owned_and_reassign_owned_reach_open_sockets() {
    let cluster = Cluster::start().await;
    cluster
        .execute(&format!(
            "{DOCS}
             CREATE ROLE clerk NOLOGIN; CREATE ROLE keeper NOLOGIN;
             CREATE ROLE readers NOLOGIN; CREATE ROLE watchers NOLOGIN;
             GRANT clerk, keeper TO sync_gateway, sync_authenticator;
             GRANT SELECT ON doc TO clerk, readers;
             GRANT SELECT ON marker TO watchers;
             GRANT readers TO keeper;
             GRANT watchers TO clerk, keeper;
             ALTER TABLE doc OWNER TO keeper;"
        ))
        .await;
    let gateway = Gateway::start(
        &cluster,
        &[
            "--allowed-roles",
            "app_user,clerk,keeper",
            "--poll-interval-ms",
            "200",
        ],
    )
    .await;
    let mut clerk = watching(&gateway, "bob", Some("clerk")).await;
    let mut keeper = watching(&gateway, "carol", Some("keeper")).await;
    cluster
        .execute("INSERT INTO doc VALUES (1, 'bob'), (2, 'alice'); INSERT INTO marker VALUES (1)")
        .await;
    assert_eq!(
        actions(&clerk.changes_until(1).await).len(),
        1,
        "bob's own row"
    );
    assert_eq!(
        actions(&keeper.changes_until(1).await).len(),
        2,
        "the owner sees all"
    );

    // The owner's table goes to another role: carol's role is no longer exempt.
    let seen = after_access_change(
        &cluster,
        &gateway,
        &mut keeper,
        "REASSIGN OWNED BY keeper TO postgres",
        "INSERT INTO doc VALUES (3, 'alice'), (4, 'carol')",
        2,
    )
    .await;
    assert_eq!(
        actions(&seen),
        [("4".to_owned(), "CREATE".to_owned())],
        "after REASSIGN OWNED: {seen:?}"
    );
    clerk.changes_until(2).await;

    // clerk's privileges are dropped: bob's subscription ends, nothing more arrives.
    let seen = after_access_change(
        &cluster,
        &gateway,
        &mut clerk,
        "DROP OWNED BY clerk",
        "INSERT INTO doc VALUES (5, 'bob')",
        3,
    )
    .await;
    assert!(actions(&seen).is_empty(), "after DROP OWNED: {seen:?}");
    assert_eq!(errors(&seen), ["forbidden"], "{seen:?}");
}

/// A role altered to BYPASSRLS, or whose USAGE on the table's schema is revoked, was still
/// acted as for open sockets: live delivery computed its plan with RLS off and sent other
/// users' rows, or ignored that PostgreSQL now refuses the role.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_altered_to_bypass_rls_or_without_schema_usage_is_refused_on_open_sockets() {
    let cluster = Cluster::start().await;
    cluster
        .execute(
            "CREATE SCHEMA app; GRANT USAGE ON SCHEMA app TO app_user;
             CREATE TABLE app.doc (id int PRIMARY KEY, owner text NOT NULL);
             ALTER TABLE app.doc ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON app.doc USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
             GRANT SELECT ON app.doc TO app_user;
             CREATE TABLE marker (id int PRIMARY KEY);
             SELECT sync.track('app.doc'); SELECT sync.track('marker');
             CREATE ROLE auditor NOLOGIN; GRANT auditor TO sync_gateway, sync_authenticator;
             GRANT USAGE ON SCHEMA app TO auditor; GRANT SELECT ON app.doc, marker TO auditor;",
        )
        .await;
    let gateway = Gateway::start(
        &cluster,
        &[
            "--allowed-roles",
            "app_user,auditor",
            "--poll-interval-ms",
            "200",
        ],
    )
    .await;
    let mut bob = watching(&gateway, "bob", None).await;
    let mut dave = watching(&gateway, "dave", Some("auditor")).await;
    // A snapshot and a write of a table outside `public` (the authenticator has no USAGE on
    // its schema, only the role it acts as).
    cluster.execute("GRANT INSERT ON app.doc TO app_user").await;
    assert_eq!(
        gateway
            .snapshot("bob", "doc")
            .await
            .map(|(_, rows)| rows.len()),
        Ok(0)
    );
    let write = json!({"mutations": [{"id": "w1", "entityCode": "doc", "action": "CREATE",
                                      "entityId": "9", "data": {"owner": "bob"}}]});
    let (status, answer) = gateway.call("POST", "/v1/write", "bob", Some(write)).await;
    assert_eq!(status, 200, "{answer}");
    cluster.execute("INSERT INTO marker VALUES (0)").await;
    bob.changes_until(0).await;
    dave.changes_until(0).await;

    // Its refusal is routed before the batch's changes and ends both its subscriptions
    // (marker's too: the role reads nothing any more), so nothing of alice's can follow.
    let seen = after_access_change(
        &cluster,
        &gateway,
        &mut bob,
        "ALTER ROLE auditor BYPASSRLS",
        "INSERT INTO app.doc VALUES (1, 'alice')",
        1,
    )
    .await;
    assert!(actions(&seen).is_empty(), "{seen:?}");
    for _ in 0..2 {
        let message = dave.next().await.expect("open");
        assert_eq!(
            message["type"], "ERROR",
            "a BYPASSRLS role was shown: {message}"
        );
        assert_eq!(message["payload"]["code"], "forbidden", "{message}");
    }

    let seen = after_access_change(
        &cluster,
        &gateway,
        &mut bob,
        "REVOKE USAGE ON SCHEMA app FROM app_user",
        "INSERT INTO app.doc VALUES (2, 'bob')",
        2,
    )
    .await;
    assert!(
        actions(&seen).is_empty(),
        "a role without USAGE was shown a row: {seen:?}"
    );
    assert_eq!(errors(&seen), ["forbidden"], "{seen:?}");
}

/// Replays and `/v1/changes` judged old log rows under the entity's current table: track
/// `payroll` as `doc`, write, untrack it, track a readable table as `doc`, and a user with an
/// old cursor received the payroll rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_cursor_never_replays_another_tables_history_under_a_reused_code() {
    let cluster = Cluster::start().await;
    cluster
        .execute(
            "CREATE TABLE payroll (id int PRIMARY KEY, salary int);
             CREATE TABLE marker (id int PRIMARY KEY);
             SELECT sync.track('payroll', 'doc'); SELECT sync.track('marker');",
        )
        .await;
    let gateway = Gateway::start(&cluster, &[]).await;
    let old_cursor = cluster.current_cursor().await;
    let mut live = watching(&gateway, "bob", None).await;
    cluster
        .execute("INSERT INTO payroll VALUES (1, 250000); INSERT INTO marker VALUES (1)")
        .await;
    live.changes_until(1).await;

    cluster
        .execute(
            "SELECT sync.untrack('payroll');
             CREATE TABLE notes (id int PRIMARY KEY, body text);
             INSERT INTO notes VALUES (1, 'hello');
             SELECT sync.track('notes', 'doc');",
        )
        .await;
    // The live subscriber's copy holds the payroll table's rows: it refetches.
    let resync = live.expect("RESYNC").await;
    assert_eq!(resync["entityCode"], "doc");
    assert_eq!(resync["reason"], "entity_changed");

    let mut replaying = gateway.connect("bob").await;
    replaying
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "doc", "mode": "delta", "since": old_cursor}}))
        .await;
    let mut seen = Vec::new();
    loop {
        let message = replaying.next().await.expect("open");
        let kind = message["type"].as_str().unwrap_or_default().to_owned();
        seen.push(message);
        if kind == "RESYNC" || kind == "SYNCED" || kind == "ERROR" {
            break;
        }
    }
    let text = serde_json::to_string(&seen).unwrap();
    assert!(
        !text.contains("250000"),
        "payroll rows replayed as doc: {text}"
    );
    assert_eq!(
        seen.last().unwrap()["payload"]["reason"],
        "entity_changed",
        "{text}"
    );

    let (status, body) = gateway
        .call(
            "GET",
            &format!("/v1/changes?since={old_cursor}&entityCode=doc"),
            "bob",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = body.to_string();
    assert!(
        !text.contains("250000"),
        "payroll rows in /v1/changes: {text}"
    );
    assert_eq!(body["changes"][0]["action"], "RESYNC", "{text}");

    // A copy taken before the code changed table, with nothing written to either table
    // after it: the replay from its cursor still says so (the re-track writes an ACCESS row).
    let taken = cluster.current_cursor().await;
    cluster
        .execute(
            "SELECT sync.untrack('notes');
             CREATE TABLE drafts (id int PRIMARY KEY, body text);
             SELECT sync.track('drafts', 'doc');",
        )
        .await;
    let mut resuming = gateway.connect("bob").await;
    resuming
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "doc", "mode": "delta", "since": taken}}))
        .await;
    let answer = loop {
        let message = resuming.next().await.expect("open");
        if message["type"] != "SUBSCRIBED" {
            break message;
        }
    };
    assert_eq!(answer["type"], "RESYNC", "{answer}");
}

/// The event trigger updated the one row of sync.state on every GRANT, REVOKE, ALTER and
/// policy command by anyone, and WAL ingest and prune update the same row: any role could
/// leave `GRANT … ON <its temp table>` open and stall WAL delivery, prune and everyone's
/// DDL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_grant_of_any_role_stalls_nobody() {
    let cluster = Cluster::start().await;
    cluster
        .execute(
            "CREATE ROLE anyone LOGIN;
             CREATE TABLE event (id int PRIMARY KEY);
             CREATE TABLE other (id int PRIMARY KEY);",
        )
        .await;
    cluster
        .execute("SELECT sync.track('event', capture => 'wal')")
        .await;
    cluster.wait_for_slot().await;
    let gateway = Gateway::start(&cluster, &[]).await;
    let mut bob = gateway.connect("bob").await;
    bob.subscribe(json!({"entityCode": "event", "mode": "delta"}))
        .await;

    let anyone = cluster.connect_as("anyone", "postgres").await;
    anyone
        .batch_execute("BEGIN; CREATE TEMP TABLE h (id int); GRANT SELECT ON h TO PUBLIC;")
        .await
        .unwrap();

    // A WAL change is ingested and delivered; prune and another role's DDL complete. (A lock
    // wait would end at the statement timeout, failing the step.)
    let admin = cluster.connect().await;
    admin
        .batch_execute("SET statement_timeout = '10s'")
        .await
        .unwrap();
    admin
        .batch_execute("INSERT INTO event VALUES (1)")
        .await
        .unwrap();
    let delivered = bob.expect("DELTA").await;
    assert_eq!(delivered["changes"][0]["entityId"], "1");
    for step in [
        "SELECT sync.prune('0')",
        "GRANT SELECT ON other TO app_user",
        "CREATE POLICY p ON other USING (true)",
    ] {
        admin
            .batch_execute(step)
            .await
            .unwrap_or_else(|e| panic!("{step} behind anyone's open GRANT: {}", error_text(&e)));
    }
    anyone.batch_execute("ROLLBACK").await.unwrap();
}

/// A tracked table dropped and created again with a hidden column, tracked with an
/// allow-list: for about a second every snapshot sent the new table's unpublished column
/// (the gateway's catalog still described the old table); and a policy reading a column the
/// old table lacked made every snapshot 403 for as long as the gateway ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_replaced_under_its_code_is_never_served_as_the_old_one() {
    let cluster = Cluster::start().await;
    cluster
        .execute(
            "CREATE TABLE doc (id int PRIMARY KEY, title text);
             INSERT INTO doc VALUES (1, 'old');
             SELECT sync.track('doc');",
        )
        .await;
    let gateway = Gateway::start(&cluster, &[]).await;
    let (_, rows) = gateway.snapshot("bob", "doc").await.unwrap();
    assert_eq!(rows, [json!({"id": 1, "title": "old"})]);

    cluster
        .execute(
            "DROP TABLE doc;
             CREATE TABLE doc (id int PRIMARY KEY, title text, secret text);
             INSERT INTO doc VALUES (2, 'new', 'the combination');
             SELECT sync.track('doc', columns => ARRAY['title']);",
        )
        .await;
    let (_, rows) = gateway.snapshot("bob", "doc").await.unwrap();
    assert_eq!(
        rows,
        [json!({"id": 2, "title": "new"})],
        "the unpublished column leaked"
    );

    cluster
        .execute(
            "DROP TABLE doc;
             CREATE TABLE doc (id int PRIMARY KEY, title text, org text);
             INSERT INTO doc VALUES (3, 'mine', 'acme'), (4, 'theirs', 'other');
             ALTER TABLE doc ENABLE ROW LEVEL SECURITY;
             CREATE POLICY by_org ON doc USING (org = current_setting('request.jwt.claims', true)::jsonb ->> 'org');
             SELECT sync.track('doc');",
        )
        .await;
    let auth = format!(
        "Bearer {}",
        pg_sync_tests::gateway::token("bob", &[("org", json!("acme"))])
    );
    let response = gateway
        .request("GET", "/v1/snapshot/doc", &[("Authorization", &auth)], None)
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&response.body).into_owned();
    assert_eq!(response.status, 200, "{body}");
    assert!(body.contains("mine") && !body.contains("theirs"), "{body}");
}

/// A snapshot asked for right after its table was replaced under the same code, before the
/// gateway read its catalog again, and with no plan of the old table cached: the plan of the
/// dropped table failed on its missing schema and the snapshot answered 500 (seen through a
/// standby's gateway, which learns of the new table later still).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_right_after_its_table_was_replaced_serves_the_new_one() {
    let cluster = Cluster::start().await;
    cluster
        .execute(
            "CREATE TABLE doc (id int PRIMARY KEY, title text);
             SELECT sync.track('doc');",
        )
        .await;
    let gateway = Gateway::start(&cluster, &["--poll-interval-ms", "60000"]).await;
    cluster
        .execute(
            "DROP TABLE doc;
             CREATE TABLE doc (id int PRIMARY KEY, title text);
             INSERT INTO doc VALUES (2, 'new');
             SELECT sync.track('doc');",
        )
        .await;
    let (_, rows) = gateway.snapshot("bob", "doc").await.unwrap();
    assert_eq!(rows, [json!({"id": 2, "title": "new"})]);
}
