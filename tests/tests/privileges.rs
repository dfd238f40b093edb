//! Least privilege (SPEC 1.9, 2.2), tried as an attacker would: every actor here is a
//! non-superuser — the gateway's login role, app users, a table owner (`mallory`) and a plain
//! writer — and each attack that once worked is repeated and must now fail.

use pg_sync_tests::gateway::{actions, token, Gateway, Session};
use pg_sync_tests::{column, error_text, sqlstate, Cluster, AUTHENTICATOR_ROLE, GATEWAY_ROLE};
use serde_json::{json, Value};
use tokio_postgres::Client;

/// mallory owns a schema and, as README's owners do, may call track.
const MALLORY: &str = "
    CREATE ROLE mallory LOGIN;
    CREATE SCHEMA m AUTHORIZATION mallory;
    GRANT USAGE ON SCHEMA sync TO mallory;
    GRANT EXECUTE ON FUNCTION sync.track(regclass, text, text, text[]) TO mallory;";

/// mallory's trap: an enum whose cast to json, called by to_jsonb, tries to make her a
/// superuser and records whom it ran as.
const TRAP: &str = "
    CREATE TABLE m.ran_as (who text, super boolean);
    CREATE TYPE m.mood AS ENUM ('ok', 'evil');
    CREATE FUNCTION m.evil(m.mood) RETURNS json LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO m.ran_as SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user;
        BEGIN
            EXECUTE 'ALTER ROLE mallory SUPERUSER';
        EXCEPTION WHEN insufficient_privilege THEN NULL;
        END;
        RETURN to_json($1::text);
    END $$;
    CREATE CAST (m.mood AS json) WITH FUNCTION m.evil(m.mood);";

async fn mallory(cluster: &Cluster) -> Client {
    cluster.execute(MALLORY).await;
    cluster.connect_as("mallory", "postgres").await
}

async fn is_superuser(cluster: &Cluster, role: &str) -> bool {
    cluster
        .connect()
        .await
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .unwrap()
        .get(0)
}

/// `sync.ingest_wal()` as the gateway's login role calls it.
async fn ingest_as_gateway(cluster: &Cluster) -> i64 {
    let gateway_login = cluster.connect_as(GATEWAY_ROLE, "postgres").await;
    count(&gateway_login, "SELECT sync.ingest_wal()").await
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_owner_cannot_become_superuser_through_capture_or_ingest() {
    let cluster = Cluster::start().await;
    let admin = cluster.connect().await;
    let mallory = mallory(&cluster).await;
    mallory.batch_execute(TRAP).await.unwrap();
    mallory
        .batch_execute(
            "CREATE TABLE m.t (id int PRIMARY KEY, mood m.mood);
             CREATE TABLE m.w (id int PRIMARY KEY, mood m.mood);
             SELECT sync.track('m.t');",
        )
        .await
        .unwrap();
    // track makes the slot itself; it must be the transaction's first write.
    mallory
        .batch_execute("SELECT sync.track('m.w', capture => 'wal')")
        .await
        .unwrap();

    // Trigger capture: the cast runs in the writer's transaction, as the writer.
    mallory
        .batch_execute("INSERT INTO m.t VALUES (1, 'evil')")
        .await
        .unwrap();
    // WAL capture: ingest runs as the extension's owner, the cast as the table's owner.
    mallory
        .batch_execute("INSERT INTO m.w VALUES (1, 'evil')")
        .await
        .unwrap();
    assert_eq!(ingest_as_gateway(&cluster).await, 1);

    let ran_as: Vec<(String, bool)> = admin
        .query("SELECT who, super FROM m.ran_as", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // The trap was sprung on both paths (so this test can fail), never with rights.
    assert_eq!(ran_as.len(), 2, "{ran_as:?}");
    assert!(
        ran_as.iter().all(|(who, sup)| who == "mallory" && !sup),
        "{ran_as:?}"
    );
    assert!(!is_superuser(&cluster, "mallory").await);
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM sync.change_history WHERE data->>'mood' = 'evil'"
        )
        .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_setting_changed_by_a_table_owners_code_does_not_outlive_it_in_ingest() {
    let cluster = Cluster::start().await;
    let mallory = mallory(&cluster).await;
    // A domain whose check moves search_path to mallory's schema for the rest of the
    // session, and a `now()` there that tries to make her a superuser: ingest (as the
    // extension's owner) calls now() after typing her values.
    mallory
        .batch_execute(
            "CREATE TABLE m.ran_as (who text);
             CREATE FUNCTION m.hijack(int) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_catalog.set_config('search_path', 'm, pg_catalog', false); RETURN true; END $$;
             CREATE DOMAIN m.hooked AS int CHECK (m.hijack(VALUE));
             CREATE FUNCTION m.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO m.ran_as VALUES (current_user);
                 BEGIN EXECUTE 'ALTER ROLE mallory SUPERUSER';
                 EXCEPTION WHEN insufficient_privilege THEN NULL; END;
                 RETURN pg_catalog.now();
             END $$;
             GRANT USAGE ON SCHEMA m TO PUBLIC;
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA m TO PUBLIC;
             GRANT INSERT ON m.ran_as TO PUBLIC;
             CREATE TABLE m.w (id int PRIMARY KEY, v m.hooked);",
        )
        .await
        .unwrap();
    mallory
        .batch_execute("SELECT sync.track('m.w', capture => 'wal')")
        .await
        .unwrap();
    mallory
        .batch_execute("INSERT INTO m.w VALUES (1, 1)")
        .await
        .unwrap();
    assert_eq!(ingest_as_gateway(&cluster).await, 1);
    assert!(!is_superuser(&cluster, "mallory").await);
    let ran: i64 = count(&cluster.connect().await, "SELECT count(*) FROM m.ran_as").await;
    assert_eq!(ran, 0, "mallory's now() ran inside ingest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_capture_trigger_raises_and_writes_nothing() {
    let cluster = Cluster::start().await;
    let admin = cluster.connect().await;
    admin
        .batch_execute(
            "CREATE TABLE doc (id int PRIMARY KEY, body text); SELECT sync.track('doc');",
        )
        .await
        .unwrap();
    let mallory = mallory(&cluster).await;
    mallory
        .batch_execute("CREATE TABLE m.t (id int PRIMARY KEY); SELECT sync.track('m.t');")
        .await
        .unwrap();

    // Without EXECUTE on sync.capture she cannot even make the trigger.
    let error = mallory
        .batch_execute(
            "CREATE TEMP TABLE x (id int PRIMARY KEY);
             CREATE TRIGGER f AFTER INSERT ON x FOR EACH ROW EXECUTE FUNCTION sync.capture('doc', '1');",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42501", "{}", error_text(&error));

    // Granted it by mistake, her triggers still write nothing: neither on a table of her own
    // that is not tracked, nor on her tracked table under another entity's name.
    admin
        .batch_execute("GRANT EXECUTE ON FUNCTION sync.capture() TO mallory")
        .await
        .unwrap();
    mallory
        .batch_execute(
            "CREATE TEMP TABLE x (id int PRIMARY KEY);
             CREATE TRIGGER f AFTER INSERT OR DELETE OR UPDATE ON x
                 FOR EACH ROW EXECUTE FUNCTION sync.capture('doc', '1');
             CREATE TRIGGER g AFTER TRUNCATE ON x
                 FOR EACH STATEMENT EXECUTE FUNCTION sync.capture('doc', '1');
             CREATE TRIGGER f AFTER INSERT ON m.t
                 FOR EACH ROW EXECUTE FUNCTION sync.capture('doc', '1');",
        )
        .await
        .unwrap();
    for attack in [
        "INSERT INTO x VALUES (999)",
        "TRUNCATE x",
        "INSERT INTO m.t VALUES (999)",
    ] {
        let error = mallory.batch_execute(attack).await.unwrap_err();
        assert_eq!(
            sqlstate(&error),
            "42501",
            "{attack}: {}",
            error_text(&error)
        );
        assert!(
            error_text(&error).contains("not tracked"),
            "{attack}: {}",
            error_text(&error)
        );
    }
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM sync.change_history WHERE entity_code = 'doc'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_in_sync_is_anyones_by_default() {
    let cluster = Cluster::start().await;
    let admin = cluster.connect().await;
    // No function, table, sequence or type of the schema grants anything to PUBLIC (a NULL
    // ACL means the default, which for functions and types is PUBLIC's).
    let public: Vec<String> = admin
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
              WHERE p.pronamespace = 'sync'::regnamespace
                AND (p.proacl IS NULL OR EXISTS (SELECT FROM aclexplode(p.proacl) a WHERE a.grantee = 0))
             UNION ALL
             SELECT c.oid::regclass::text FROM pg_class c
              WHERE c.relnamespace = 'sync'::regnamespace
                AND EXISTS (SELECT FROM aclexplode(c.relacl) a WHERE a.grantee = 0)
             UNION ALL
             SELECT t.oid::regtype::text FROM pg_type t
              WHERE t.typnamespace = 'sync'::regnamespace AND t.typtype = 'c'
                AND t.typrelid IN (SELECT oid FROM pg_class WHERE relkind = 'c')
                AND (t.typacl IS NULL OR EXISTS (SELECT FROM aclexplode(t.typacl) a WHERE a.grantee = 0))",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(public.is_empty(), "granted to PUBLIC: {public:?}");

    // An app user given USAGE on the schema (as writers are, for tag_origin) still cannot
    // call the gateway's helpers or read the log.
    let mallory = mallory(&cluster).await;
    for attack in [
        "SELECT sync.claim_mutation('alice', 'her-next-mutation')",
        "SELECT sync.ingest_wal()",
        "SELECT sync._wal_settled('doc')",
        "SELECT sync.prune('0 seconds')",
        "SELECT sync.grant_gateway('mallory')",
        "SELECT count(*) FROM sync.change_history",
        "SELECT * FROM sync.changes_since(NULL)",
        "INSERT INTO sync.tracked (relid, entity_code) VALUES ('pg_class'::regclass, 'doc')",
    ] {
        let error = mallory.batch_execute(attack).await.unwrap_err();
        assert_eq!(
            sqlstate(&error),
            "42501",
            "{attack}: {}",
            error_text(&error)
        );
    }
    // The fault-injection setting is for superusers.
    let error = mallory
        .batch_execute("SET sync.test_ingest_fault = 'fail_after_store'")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42501", "{}", error_text(&error));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ddl_and_writes_work_for_roles_without_rights_on_sync() {
    let cluster = Cluster::start().await;
    let admin = cluster.connect().await;
    admin
        .batch_execute(
            "CREATE ROLE dev LOGIN; CREATE SCHEMA d AUTHORIZATION dev;
             CREATE ROLE writer LOGIN;
             CREATE TABLE item (id int PRIMARY KEY, body text); SELECT sync.track('item');
             GRANT SELECT, INSERT, UPDATE ON item TO writer;",
        )
        .await
        .unwrap();
    // A role that has never heard of pg_sync: its DDL runs the event triggers untouched.
    let dev = cluster.connect_as("dev", "postgres").await;
    dev.batch_execute(
        "CREATE TABLE d.x (id int PRIMARY KEY);
         ALTER TABLE d.x ADD COLUMN y text;
         DROP TABLE d.x;",
    )
    .await
    .unwrap();
    // Its track of a table it does not own is refused.
    let error = dev
        .batch_execute("SELECT sync.track('public.item')")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&error), "42501", "{}", error_text(&error));

    // A writer with no grant on sync is captured, with its origin tag.
    let writer = cluster.connect_as("writer", "postgres").await;
    writer
        .batch_execute(
            "BEGIN; SET LOCAL sync.client_id = 'tab-9'; INSERT INTO item VALUES (1, 'a'); COMMIT;
             UPDATE item SET body = 'b' WHERE id = 1;",
        )
        .await
        .unwrap();
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM sync.change_history WHERE entity_code = 'item'
                AND (client_id = 'tab-9' OR op = 'UPDATE')"
        )
        .await,
        2
    );

    // The owner of a tracked table alters and drops it; sync.tracked follows.
    let mallory = mallory(&cluster).await;
    mallory
        .batch_execute(
            "CREATE TABLE m.t (id int PRIMARY KEY); SELECT sync.track('m.t');
             ALTER TABLE m.t ADD COLUMN note text;
             INSERT INTO m.t VALUES (1, 'n');",
        )
        .await
        .unwrap();
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM sync.change_history
              WHERE entity_code = 't' AND schema_version = 2 AND op = 'INSERT'"
        )
        .await,
        1
    );
    mallory.batch_execute("DROP TABLE m.t").await.unwrap();
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM sync.tracked WHERE entity_code = 't'"
        )
        .await,
        0
    );
}

/// Tables for the gateway tests: `doc` readable by every app user; `secret` with an owner
/// policy; `reader2`, an allowed role that may read `marker` only.
const APP: &str = "
    CREATE TABLE doc (id text PRIMARY KEY, body text);
    CREATE TABLE secret (id text PRIMARY KEY, owner text NOT NULL);
    ALTER TABLE secret ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON secret
        USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
    CREATE TABLE marker (id int PRIMARY KEY);
    CREATE ROLE reader2 NOLOGIN;
    GRANT reader2 TO sync_gateway, sync_authenticator;
    GRANT SELECT ON marker TO reader2;
    CREATE ROLE other_role NOLOGIN;
    GRANT other_role TO sync_gateway, sync_authenticator;
    GRANT SELECT ON doc, secret, marker TO other_role;
    SELECT sync.track('doc'); SELECT sync.track('secret'); SELECT sync.track('marker');";

/// Each path a token opens: the socket (refused before the upgrade), snapshot, changes and
/// write, as the HTTP status each answered.
async fn statuses(gateway: &Gateway, token: &str) -> [u16; 4] {
    let auth = format!("Bearer {token}");
    let headers = [("Authorization", auth.as_str())];
    let socket = match gateway.connect_with(token, "").await {
        Ok(_) => 101,
        Err(status) => status,
    };
    let snapshot = gateway
        .request("GET", "/v1/snapshot/doc", &headers, None)
        .await
        .unwrap()
        .status;
    let cursor = cursor(gateway).await;
    let changes = gateway
        .request(
            "GET",
            &format!("/v1/changes?since={cursor}"),
            &headers,
            None,
        )
        .await
        .unwrap()
        .status;
    let write = json!({"mutations": [{"id": "m1", "entityCode": "doc", "action": "CREATE",
                                      "entityId": "x", "data": {"body": "pwned"}}]});
    let write = gateway
        .request("POST", "/v1/write", &headers, Some(&write))
        .await
        .unwrap()
        .status;
    [socket, snapshot, changes, write]
}

/// A cursor, from a snapshot read as an ordinary user.
async fn cursor(gateway: &Gateway) -> String {
    gateway.snapshot("someone", "marker").await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_naming_roles_the_gateway_may_not_act_as_are_refused_on_every_path() {
    let cluster = Cluster::start().await;
    cluster.execute(APP).await;
    let gateway = Gateway::start(&cluster, &[]).await;
    for role in [
        "postgres",
        "none",
        GATEWAY_ROLE,
        AUTHENTICATOR_ROLE,
        "other_role",
        "pg_read_all_data",
    ] {
        let token = token("mallory", &[("role", json!(role))]);
        assert_eq!(statuses(&gateway, &token).await, [401; 4], "role {role}");
    }
    // The allowed role, for contrast, opens every path.
    let good = token("alice", &[("role", json!("app_user"))]);
    assert_eq!(statuses(&gateway, &good).await, [101, 200, 200, 200]);
    assert_eq!(
        cluster
            .connect()
            .await
            .query_one("SELECT count(*) FROM doc WHERE body = 'pwned'", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1
    );
}

/// A gateway's arguments with the test login role and `flags` alone (no authenticator unless
/// `flags` name one).
fn as_gateway_login(cluster: &Cluster, flags: &[&str]) -> Vec<String> {
    let login = cluster.url_as(GATEWAY_ROLE, "postgres");
    ["--database-url", login.as_str()]
        .iter()
        .chain(flags)
        .map(|a| a.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_refuses_to_run_as_a_superuser_or_with_unsafe_roles() {
    let cluster = Cluster::start().await;
    cluster.execute(APP).await;
    let as_superuser = |extra: &[&str]| {
        let mut args = vec!["--database-url".to_owned(), cluster.url("postgres")];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let refused = Gateway::launch(&as_superuser(&["--default-role", "app_user"]))
        .await
        .err()
        .expect("a superuser login is refused");
    assert!(refused.contains("superuser"), "{refused}");
    // Allowed roles that bypass RLS or are the login role itself are refused too.
    for roles in [
        "app_user,postgres",
        "app_user,sync_gateway",
        "none",
        "nobody",
    ] {
        let args = as_gateway_login(&cluster, &["--allowed-roles", roles]);
        let refused = Gateway::launch(&args).await.err().expect("refused");
        assert!(refused.contains("cannot be acted as"), "{roles}: {refused}");
    }
    // --insecure-superuser starts, for development, and says so.
    let gateway = Gateway::launch(&as_superuser(&[
        "--default-role",
        "app_user",
        "--insecure-superuser",
    ]))
    .await
    .expect("starts");
    drop(gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_without_a_role_reads_and_writes_no_table() {
    let cluster = Cluster::start().await;
    cluster.execute(APP).await;
    // No --default-role: a token must name its role.
    let args = as_gateway_login(&cluster, &["--allowed-roles", "app_user"]);
    let gateway = Gateway::launch(&args).await.unwrap();
    let roleless = token("mallory", &[]);
    let mut session = gateway.connect_with(&roleless, "").await.unwrap();
    for entity in ["doc", "secret"] {
        session
            .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": entity, "ref": entity}}))
            .await;
        let error = session.expect("ERROR").await;
        assert_eq!(error["code"], "forbidden", "{error}");
    }
    let auth = format!("Bearer {roleless}");
    let headers = [("Authorization", auth.as_str())];
    let alice = token("alice", &[("role", json!("app_user"))]);
    let (cursor, _) = {
        let auth = format!("Bearer {alice}");
        let r = gateway
            .request(
                "GET",
                "/v1/snapshot/marker",
                &[("Authorization", &auth)],
                None,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.body).unwrap();
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        (first["cursor"].as_str().unwrap().to_owned(), ())
    };
    for (method, path) in [
        ("GET", "/v1/snapshot/secret".to_owned()),
        ("GET", format!("/v1/changes?since={cursor}")),
    ] {
        let status = gateway
            .request(method, &path, &headers, None)
            .await
            .unwrap()
            .status;
        assert_eq!(status, 403, "{path}");
    }
    let write = json!({"mutations": [{"id": "m1", "entityCode": "secret", "action": "CREATE",
                                      "entityId": "s1", "data": {"owner": "alice"}}]});
    let status = gateway
        .request("POST", "/v1/write", &headers, Some(&write))
        .await
        .unwrap()
        .status;
    assert_eq!(status, 403);
}

/// Subscribes to `doc` and waits until a marker row shows the subscription is live.
async fn watch_doc(gateway: &Gateway, sub: &str, query: &str) -> Session {
    let mut session = gateway.connect_with(&token(sub, &[]), query).await.unwrap();
    session.subscribe(json!({"entityCode": "marker"})).await;
    session
        .subscribe(json!({"entityCode": "doc", "mode": "delta"}))
        .await;
    session
}

/// `sub` creates `doc` row `id` with the client id `client_id`.
async fn write(gateway: &Gateway, sub: &str, client_id: &str, id: &str) -> (u16, Value) {
    let body = json!({"clientId": client_id, "mutations": [{"id": format!("m-{id}"),
        "entityCode": "doc", "action": "CREATE", "entityId": id, "data": {"body": sub}}]});
    post_write(gateway, sub, &body).await
}

/// `POST /v1/write` of `body` as `sub`: the status and the answer.
async fn post_write(gateway: &Gateway, sub: &str, body: &Value) -> (u16, Value) {
    let auth = format!("Bearer {}", token(sub, &[]));
    let r = gateway
        .request("POST", "/v1/write", &[("Authorization", &auth)], Some(body))
        .await
        .unwrap();
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_borrowed_client_id_does_not_suppress_another_users_delivery() {
    let cluster = Cluster::start().await;
    cluster.execute(APP).await;
    let gateway = Gateway::start(&cluster, &[]).await;
    let mut alice = watch_doc(&gateway, "alice", "?clientId=tab-1").await;
    // Alice's own write is not echoed to her (the control), mallory's with her client id is.
    assert_eq!(write(&gateway, "alice", "tab-1", "hers").await.0, 200);
    assert_eq!(write(&gateway, "mallory", "tab-1", "forged").await.0, 200);
    cluster.execute("INSERT INTO marker VALUES (1)").await;
    let seen = actions(&alice.changes_until(1).await);
    assert_eq!(seen, [("forged".to_owned(), "CREATE".to_owned())]);
    // Spelling the tag out is refused.
    let (status, answer) = write(&gateway, "mallory", "alice:tab-1", "x").await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        gateway
            .connect_with(&token("mallory", &[]), "?clientId=alice:tab-1")
            .await
            .err(),
        Some(400)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_to_a_wal_table_is_not_echoed_and_is_tagged_with_its_user() {
    let cluster = Cluster::start().await;
    cluster.execute("SELECT sync.create_wal_slot()").await;
    cluster
        .execute(
            "CREATE TABLE doc (id text PRIMARY KEY, body text);
             CREATE TABLE marker (id int PRIMARY KEY);
             SELECT sync.track('doc', capture => 'wal'); SELECT sync.track('marker', capture => 'wal');",
        )
        .await;
    let gateway = Gateway::start(&cluster, &["--wal-ingest-interval-ms", "50"]).await;
    let mut alice = watch_doc(&gateway, "alice", "?clientId=tab-1").await;
    assert_eq!(write(&gateway, "alice", "tab-1", "hers").await.0, 200);
    assert_eq!(write(&gateway, "bob", "tab-1", "his").await.0, 200);
    cluster.execute("INSERT INTO marker VALUES (1)").await;
    let seen = actions(&alice.changes_until(1).await);
    assert_eq!(seen, [("his".to_owned(), "CREATE".to_owned())]);
    let tags: Vec<String> = column(
        &cluster.connect().await,
        "SELECT client_id FROM sync.change_history WHERE entity_code = 'doc' ORDER BY id",
    )
    .await;
    assert_eq!(tags, ["alice:tab-1", "bob:tab-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refreshed_token_keeps_only_what_its_role_may_read() {
    let cluster = Cluster::start().await;
    cluster.execute(APP).await;
    let gateway = Gateway::start(&cluster, &["--allowed-roles", "app_user,reader2"]).await;
    let mut session = watch_doc(&gateway, "alice", "").await;
    // reader2 may read marker, not doc: the doc subscription ends, the marker one stays.
    let refreshed = token("alice", &[("role", json!("reader2"))]);
    session
        .send(json!({"type": "AUTH", "payload": {"token": refreshed}}))
        .await;
    let error = session.expect("ERROR").await;
    assert_eq!(error["code"], "forbidden", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("doc"),
        "{error}"
    );
    cluster
        .execute("INSERT INTO doc VALUES ('after', 'x'); INSERT INTO marker VALUES (1);")
        .await;
    assert!(session.changes_until(1).await.is_empty());
    // A refresh naming a role the gateway may not act as is refused; the old one stays.
    session
        .send(json!({"type": "AUTH", "payload": {"token": token("alice", &[("role", json!("postgres"))])}}))
        .await;
    assert_eq!(session.expect("ERROR").await["code"], "forbidden");
}

/// A table owner's code that runs in a user's query (a trigger on a write, a policy function
/// on a snapshot) resets the role and reads the log, answering what it found in an error
/// message, which the gateway passes on. And a trigger of hers sets, for the session, the
/// origin tag of bob's tab, so that the next user's write on that connection would be
/// skipped by bob's socket.
const LOOTER: &str = "
    CREATE TABLE notes (id text PRIMARY KEY, body text);
    ALTER TABLE notes OWNER TO mallory;
    SELECT sync.track('notes');
    CREATE FUNCTION m.loot() RETURNS text LANGUAGE plpgsql AS $$
    DECLARE found text;
    BEGIN
        RESET ROLE;
        BEGIN
            SELECT coalesce(string_agg(data::text, ','), 'nothing') INTO found FROM sync.change_history;
        EXCEPTION WHEN insufficient_privilege THEN found := 'denied';
        END;
        RAISE EXCEPTION 'loot: %', found USING ERRCODE = '23514';
    END $$;
    INSERT INTO notes VALUES ('n0', 'seed');
    CREATE FUNCTION m.loot_on_write() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM m.loot(); RETURN NEW; END $$;
    CREATE TRIGGER loot BEFORE INSERT ON notes FOR EACH ROW EXECUTE FUNCTION m.loot_on_write();
    ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
    CREATE POLICY loot ON notes USING (m.loot() IS NOT NULL);
    CREATE TABLE tagged (id text PRIMARY KEY, body text);
    ALTER TABLE tagged OWNER TO mallory;
    SELECT sync.track('tagged');
    CREATE FUNCTION m.retag() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        -- For the session, beyond this transaction (which commits).
        PERFORM pg_catalog.set_config('sync.client_id', 'bob:tab-1', false);
        RETURN NEW;
    END $$;
    CREATE TRIGGER retag BEFORE INSERT ON tagged FOR EACH ROW EXECUTE FUNCTION m.retag();
    GRANT USAGE ON SCHEMA m TO app_user;
    INSERT INTO doc VALUES ('d1', 'top-secret');";

/// What a write of `notes` and a snapshot of it answer as an app user.
async fn looted(gateway: &Gateway) -> [String; 2] {
    let auth = format!("Bearer {}", token("eve", &[]));
    let headers = [("Authorization", auth.as_str())];
    let write = json!({"mutations": [{"id": "m1", "entityCode": "notes", "action": "CREATE",
                                      "entityId": "n1", "data": {"body": "x"}}]});
    let write = gateway
        .request("POST", "/v1/write", &headers, Some(&write))
        .await
        .unwrap();
    let snapshot = gateway
        .request("GET", "/v1/snapshot/notes", &headers, None)
        .await
        .unwrap();
    [write, snapshot].map(|r| format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_owners_code_in_a_users_query_cannot_read_the_log() {
    let cluster = Cluster::start().await;
    cluster.execute(MALLORY).await;
    cluster.execute(APP).await;
    cluster.execute(LOOTER).await;
    // With an authenticator (as make run and the README set it up), RESET ROLE lands on a
    // login that may read nothing of the log.
    // One connection per pool: the next user's query gets the one mallory's code ran on.
    let gateway = Gateway::start(&cluster, &["--client-pool-size", "1"]).await;
    let mut bob = watch_doc(&gateway, "bob", "?clientId=tab-1").await;
    for answer in looted(&gateway).await {
        assert!(answer.contains("loot: denied"), "{answer}");
        assert!(!answer.contains("top-secret"), "{answer}");
    }
    // The setting goes with the connection's cleaning: eve's next write is not tagged bob's.
    for (id, entity, row) in [("m2", "tagged", "t1"), ("m3", "doc", "d2")] {
        let write = json!({"mutations": [{"id": id, "entityCode": entity, "action": "CREATE",
                                          "entityId": row, "data": {"body": "eve's"}}]});
        let (status, answer) = post_write(&gateway, "eve", &write).await;
        assert_eq!(status, 200, "{answer}");
    }
    cluster.execute("INSERT INTO marker VALUES (1)").await;
    assert_eq!(
        actions(&bob.changes_until(1).await),
        [("d2".to_owned(), "CREATE".to_owned())]
    );
    drop(gateway);
    // The contrast, the fallback README warns of: without --authenticator-url, users' queries
    // run on the gateway's login, and the same code reads the whole log.
    let args = as_gateway_login(&cluster, &["--default-role", "app_user"]);
    let gateway = Gateway::launch(&args).await.unwrap();
    for answer in looted(&gateway).await {
        assert!(answer.contains("top-secret"), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_refuses_an_authenticator_that_can_reach_the_log() {
    let cluster = Cluster::start().await;
    cluster.execute(APP).await;
    let base = |authenticator: &str| {
        let authenticator = cluster.url_as(authenticator, "postgres");
        as_gateway_login(
            &cluster,
            &[
                "--authenticator-url",
                &authenticator,
                "--default-role",
                "app_user",
            ],
        )
    };
    // The gateway's own login as the authenticator, one that may SET ROLE to it, one with a
    // column of the log, one that may read the replication slot, one that may grant itself
    // roles.
    cluster
        .execute(
            "CREATE ROLE climber LOGIN NOINHERIT;
             GRANT app_user, sync_gateway TO climber;
             CREATE ROLE columns LOGIN NOINHERIT;
             GRANT app_user TO columns;
             GRANT USAGE ON SCHEMA sync TO columns;
             GRANT SELECT (data) ON sync.change_history TO columns;
             CREATE ROLE replicator LOGIN NOINHERIT REPLICATION;
             GRANT app_user TO replicator;
             CREATE ROLE granter LOGIN NOINHERIT CREATEROLE;
             GRANT app_user TO granter;",
        )
        .await;
    for (authenticator, why) in [
        (GATEWAY_ROLE, "may read or change the change log"),
        ("climber", "may read or change the change log"),
        ("columns", "may read or change the change log"),
        ("replicator", "may read the replication slot"),
        ("granter", "may grant itself other roles"),
    ] {
        let refused = Gateway::launch(&base(authenticator))
            .await
            .err()
            .expect("refused");
        assert!(refused.contains(why), "{authenticator}: {refused}");
    }
    // Granted while a gateway runs: it acts as nobody until the grant is revoked.
    let gateway = Gateway::launch(&base(AUTHENTICATOR_ROLE)).await.unwrap();
    let status = || async { gateway.snapshot("alice", "doc").await.err().unwrap_or(200) };
    assert_eq!(status().await, 200);
    cluster
        .execute("GRANT SELECT ON sync.change_history TO app_user")
        .await;
    until_status(&status, 401).await;
    cluster
        .execute("REVOKE SELECT ON sync.change_history FROM app_user")
        .await;
    until_status(&status, 200).await;
}

/// Waits (the gateway re-reads roles every 2 s) until `status` answers `expected`.
async fn until_status<F, Fut>(status: &F, expected: u16)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let deadline = tokio::time::Instant::now() + pg_sync_tests::gateway::PATIENCE;
    while status().await != expected {
        assert!(tokio::time::Instant::now() < deadline, "never {expected}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// pg_sync's locks cannot be held by anyone else: a role that may use the schema `sync` (as
/// README's writers may) takes the advisory keys pg_sync once locked with and tries its lock
/// tables; the log's readers and WAL ingestion go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_role_can_hold_pg_syncs_locks() {
    let cluster = Cluster::start().await;
    cluster.execute("SELECT sync.create_wal_slot()").await;
    cluster
        .execute(
            "CREATE TABLE doc (id text PRIMARY KEY, body text);
             CREATE TABLE marker (id int PRIMARY KEY);
             SELECT sync.track('doc', capture => 'wal'); SELECT sync.track('marker');
             CREATE ROLE holder LOGIN;
             GRANT USAGE ON SCHEMA sync TO holder;",
        )
        .await;
    let holder = cluster.connect_as("holder", "postgres").await;
    holder
        .batch_execute(
            "SELECT pg_advisory_lock(7378659442), pg_advisory_lock(7378659443),
                    pg_advisory_lock(7378659444)",
        )
        .await
        .unwrap();
    for table in ["sync_lock.log_read", "sync_lock.ingest"] {
        let refused = holder
            .batch_execute(&format!("BEGIN; LOCK TABLE {table} IN ACCESS SHARE MODE"))
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&refused), "42501", "{table}");
        holder.batch_execute("ROLLBACK").await.unwrap();
    }
    let gateway = Gateway::start(&cluster, &["--wal-ingest-interval-ms", "50"]).await;
    let mut bob = watch_doc(&gateway, "bob", "").await;
    cluster.execute("INSERT INTO doc VALUES ('d1', 'x')").await;
    // The WAL change is ingested before the marker's (trigger-captured) change is read.
    let ingested = "SELECT EXISTS (SELECT FROM sync.change_history WHERE entity_code = 'doc')";
    cluster.wait_until(ingested, &[], "never ingested").await;
    cluster.execute("INSERT INTO marker VALUES (1)").await;
    assert_eq!(
        actions(&bob.changes_until(1).await),
        [("d1".to_owned(), "CREATE".to_owned())]
    );
}
