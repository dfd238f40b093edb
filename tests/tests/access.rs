//! Row-level security on every path, and the HTTP side (snapshot, changes, write, metrics),
//! with a real cluster, gateway and clients.

use pg_sync_tests::gateway::{actions, token, Gateway, Session, PATIENCE};
use pg_sync_tests::Cluster;
use serde_json::{json, Value};

/// Documents owned by users: each user sees (and may write) only their own, as the policy
/// reads the `sub` claim the gateway sets.
const SCHEMA: &str = "
    CREATE TABLE doc (id int PRIMARY KEY, owner text NOT NULL, title text, version int NOT NULL DEFAULT 1);
    ALTER TABLE doc ENABLE ROW LEVEL SECURITY;
    CREATE POLICY own ON doc
        USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub')
        WITH CHECK (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
    CREATE TABLE marker (id int PRIMARY KEY);
    -- (app_user, the tokens' default role, may read and write both: see the harness.)
    -- A role whose policy raises: its checks fail, nobody else's.
    CREATE ROLE broken_user NOLOGIN;
    GRANT broken_user TO sync_gateway, sync_authenticator;
    GRANT SELECT ON doc, marker TO broken_user;
    CREATE FUNCTION fail() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'broken policy'; END $$;
    CREATE POLICY broken ON doc FOR SELECT TO broken_user USING (fail());
    SELECT sync.track('doc');
    SELECT sync.track('marker');";

async fn setup() -> (Cluster, Gateway) {
    let cluster = Cluster::start().await;
    cluster.execute(SCHEMA).await;
    let gateway = Gateway::start(&cluster, &["--allowed-roles", "app_user,broken_user"]).await;
    (cluster, gateway)
}

async fn subscribed(gateway: &Gateway, user: &str, mode: &str) -> Session {
    let mut session = gateway.connect(user).await;
    session.subscribe(json!({"entityCode": "marker"})).await;
    session
        .subscribe(json!({"entityCode": "doc", "mode": mode}))
        .await;
    session
}

fn ids(changes: &Value) -> Vec<String> {
    changes
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["entityId"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_see_only_their_rows_on_every_path() {
    let (cluster, gateway) = setup().await;
    let start = cluster.current_cursor().await;
    let mut alice_delta = subscribed(&gateway, "alice", "delta").await;
    let mut alice_ids = subscribed(&gateway, "alice", "invalidate").await;
    let mut bob = subscribed(&gateway, "bob", "delta").await;
    cluster
        .execute(
            "INSERT INTO doc VALUES (1, 'alice', 'a'), (2, 'bob', 'secret of bob');
             UPDATE doc SET title = 'a2' WHERE id = 1;
             UPDATE doc SET title = 'bob again' WHERE id = 2;
             INSERT INTO marker VALUES (1);",
        )
        .await;
    let seen = alice_delta.changes_until(1).await;
    assert!(actions(&seen).iter().all(|(id, _)| id == "1"), "{seen:?}");
    assert!(
        !serde_json::to_string(&seen).unwrap().contains("bob"),
        "{seen:?}"
    );
    assert!(actions(&alice_ids.changes_until(1).await)
        .iter()
        .all(|(id, _)| id == "1"));
    let bobs = actions(&bob.changes_until(1).await);
    assert!(
        !bobs.is_empty() && bobs.iter().all(|(id, _)| id == "2"),
        "{bobs:?}"
    );

    // Snapshot: only her row.
    let (_cursor, rows) = gateway.snapshot("alice", "doc").await.unwrap();
    assert_eq!(
        rows,
        [json!({"id": 1, "owner": "alice", "title": "a2", "version": 1})]
    );

    // Changes: only her row.
    let (status, answer) = gateway
        .call("GET", &format!("/v1/changes?since={start}"), "alice", None)
        .await;
    assert_eq!(status, 200, "{answer}");
    let docs: Vec<Value> = answer["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["entityCode"] == "doc")
        .cloned()
        .collect();
    assert!(
        !docs.is_empty() && ids(&Value::Array(docs.clone())).iter().all(|id| id == "1"),
        "{docs:?}"
    );

    // Writes: bob's row is not hers to update, and the answer does not show it.
    let update = |id: i32, expect: Value| {
        json!({"mutations": [{"id": format!("m-{id}-{expect}"), "entityCode": "doc", "action": "UPDATE",
                              "entityId": id.to_string(), "data": {"title": "mine now"}, "expect": expect}]})
    };
    let (status, answer) = gateway
        .call(
            "POST",
            "/v1/write",
            "alice",
            Some(update(2, json!({"version": 1}))),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    assert!(!answer.to_string().contains("bob"), "{answer}");
    let untouched: String = cluster
        .connect()
        .await
        .query_one("SELECT title FROM doc WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(untouched, "bob again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_moved_out_of_sight_is_deleted_for_those_who_named_it() {
    let (cluster, gateway) = setup().await;
    let mut by_id = gateway.connect("alice").await;
    by_id.subscribe(json!({"entityCode": "marker"})).await;
    by_id
        .subscribe(json!({"entityCode": "doc", "entityIds": ["1"], "mode": "delta"}))
        .await;
    cluster
        .execute("INSERT INTO doc VALUES (1, 'alice', 'a'); INSERT INTO marker VALUES (0);")
        .await;
    assert_eq!(
        actions(&by_id.changes_until(0).await),
        [("1".to_owned(), "CREATE".to_owned())]
    );
    cluster.execute("UPDATE doc SET owner = 'bob', title = 'now bob''s' WHERE id = 1; INSERT INTO marker VALUES (1);").await;
    let seen = by_id.changes_until(1).await;
    assert_eq!(actions(&seen), [("1".to_owned(), "DELETE".to_owned())]);
    assert!(
        !serde_json::to_string(&seen).unwrap().contains("bob"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_that_raises_fails_only_its_own_subscribers() {
    let (cluster, gateway) = setup().await;
    let mut broken = gateway
        .connect_with(&token("carol", &[("role", json!("broken_user"))]), "")
        .await
        .unwrap();
    broken.subscribe(json!({"entityCode": "doc"})).await;
    let mut alice = subscribed(&gateway, "alice", "delta").await;
    cluster
        .execute("INSERT INTO doc VALUES (1, 'alice', 'a'); INSERT INTO marker VALUES (1);")
        .await;
    assert_eq!(
        actions(&alice.changes_until(1).await),
        [("1".to_owned(), "CREATE".to_owned())]
    );
    assert_eq!(broken.expect("ERROR").await["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_taken_under_writes_and_its_cursor_rebuild_the_table() {
    let (cluster, gateway) = setup().await;
    cluster
        .execute("INSERT INTO doc SELECT g, 'alice', 'v0' FROM generate_series(1, 300) g")
        .await;
    let writer = cluster.connect().await;
    let writes = tokio::spawn(async move {
        for i in 0..300 {
            let id = (i * 7) % 350 + 1;
            writer
                .execute(
                    "INSERT INTO doc VALUES ($1, 'alice', 'new') ON CONFLICT (id) DO UPDATE SET version = doc.version + 1",
                    &[&id],
                )
                .await
                .unwrap();
            if i % 10 == 0 {
                writer
                    .execute("DELETE FROM doc WHERE id = $1", &[&(id + 1)])
                    .await
                    .unwrap();
            }
        }
    });
    let (cursor, rows) = gateway.snapshot("alice", "doc").await.unwrap();
    let mut cache: std::collections::BTreeMap<String, Value> = rows
        .into_iter()
        .map(|row| (row["id"].to_string(), row))
        .collect();
    writes.await.unwrap();

    let mut session = gateway.connect("alice").await;
    session.subscribe(json!({"entityCode": "marker"})).await;
    session
        .subscribe(json!({"entityCode": "doc", "mode": "delta", "since": cursor}))
        .await;
    let mut marker_seen = false;
    while !marker_seen {
        let message = session.next().await.unwrap();
        if message["payload"]["entityCode"] == "marker" {
            marker_seen = message["type"] == "INVALIDATE";
            continue;
        }
        if message["type"] == "SYNCED" {
            // The replay is done; what follows the marker's write is all live.
            cluster.execute("INSERT INTO marker VALUES (1)").await;
        }
        if message["type"] != "DELTA" {
            continue;
        }
        for change in message["payload"]["changes"].as_array().unwrap() {
            let id = change["entityId"].as_str().unwrap().to_owned();
            match change["action"].as_str().unwrap() {
                "DELETE" => {
                    cache.remove(&id);
                }
                _ => {
                    cache.insert(id, change["data"].clone());
                }
            }
        }
    }
    let table: std::collections::BTreeMap<String, Value> = cluster
        .connect()
        .await
        .query("SELECT id::text, to_jsonb(doc) FROM doc", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(cache, table);
}

fn create(id: &str, doc: i32, owner: &str) -> Value {
    json!({"id": id, "entityCode": "doc", "action": "CREATE", "data": {"id": doc, "owner": owner, "title": "t"}})
}

async fn count(cluster: &Cluster, sql: &str) -> i64 {
    cluster
        .connect()
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_apply_once_atomically_and_as_the_user() {
    let (cluster, gateway) = setup().await;
    let batch = json!({"clientId": "tab-1", "mutations": [create("m1", 1, "alice"), create("m2", 2, "alice")]});
    let (status, first) = gateway
        .call("POST", "/v1/write", "alice", Some(batch.clone()))
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        first["results"],
        json!([{"id": "m1", "status": "applied"}, {"id": "m2", "status": "applied"}])
    );
    assert!(first["cursor"].is_string());
    let (status, retry) = gateway
        .call("POST", "/v1/write", "alice", Some(batch))
        .await;
    assert_eq!(status, 200, "{retry}");
    assert_eq!(
        retry["results"],
        json!([{"id": "m1", "status": "duplicate"}, {"id": "m2", "status": "duplicate"}])
    );
    assert_eq!(count(&cluster, "SELECT count(*) FROM doc").await, 2);
    assert_eq!(
        count(
            &cluster,
            "SELECT count(*) FROM sync.change_history WHERE client_id = 'alice:tab-1'"
        )
        .await,
        2
    );

    // A failed expect: 409 with the current row, and the batch's first mutation undone.
    let batch = json!({"mutations": [
        {"id": "m3", "entityCode": "doc", "action": "UPDATE", "entityId": "1", "data": {"title": "changed"}},
        {"id": "m4", "entityCode": "doc", "action": "UPDATE", "entityId": "2", "data": {"title": "x"}, "expect": {"version": 9}},
    ]});
    let (status, answer) = gateway
        .call("POST", "/v1/write", "alice", Some(batch))
        .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["mutation"], "m4");
    assert_eq!(answer["current"]["version"], 1);
    assert_eq!(
        count(&cluster, "SELECT count(*) FROM doc WHERE title = 'changed'").await,
        0
    );

    // A forged owner: RLS refuses, 403, nothing changed.
    let (status, answer) = gateway
        .call(
            "POST",
            "/v1/write",
            "alice",
            Some(json!({"mutations": [create("m5", 5, "bob")]})),
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(count(&cluster, "SELECT count(*) FROM doc").await, 2);

    // One bad mutation among good ones: 400 before anything runs.
    for bad in [
        json!({"id": "m6", "entityCode": "doc", "action": "UPDATE", "entityId": "1", "data": {"nope": 1}}),
        json!({"id": "m6", "entityCode": "nothing", "action": "CREATE", "data": {"id": 9}}),
        json!({"id": "m6", "entityCode": "doc", "action": "UPDATE", "entityId": "1", "data": {"version": "not a number"}}),
        json!({"id": "m6", "entityCode": "doc", "action": "MERGE", "entityId": "1"}),
    ] {
        let batch = json!({"mutations": [create("m7", 7, "alice"), bad]});
        let (status, answer) = gateway
            .call("POST", "/v1/write", "alice", Some(batch))
            .await;
        assert_eq!(status, 400, "{answer}");
    }
    assert_eq!(count(&cluster, "SELECT count(*) FROM doc").await, 2);
    // The ids of failed batches were not used up.
    let (status, answer) = gateway
        .call(
            "POST",
            "/v1/write",
            "alice",
            Some(json!({"mutations": [create("m7", 7, "alice")]})),
        )
        .await;
    assert_eq!(
        (status, answer["results"][0]["status"].as_str()),
        (200, Some("applied"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_poll_returns_when_a_change_commits() {
    let (cluster, gateway) = setup().await;
    let since = cluster.current_cursor().await;
    let path = format!("/v1/changes?since={since}&wait=30&entityCode=doc");
    let gateway = std::sync::Arc::new(gateway);
    let poll = {
        let gateway = gateway.clone();
        tokio::spawn(async move { gateway.call("GET", &path, "alice", None).await })
    };
    // Let the request reach its wait (the write below may also land first: both are fine).
    cluster
        .execute("INSERT INTO doc VALUES (1, 'alice', 'a')")
        .await;
    let (status, answer) = tokio::time::timeout(PATIENCE, poll).await.unwrap().unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(ids(&answer["changes"]), ["1"]);
    assert_eq!(answer["changes"][0]["data"]["title"], "a");

    cluster
        .connect()
        .await
        .query_one("SELECT sync.prune('0 seconds')", &[])
        .await
        .unwrap();
    let (status, answer) = gateway
        .call("GET", &format!("/v1/changes?since={since}"), "alice", None)
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (410, Some("cursor_expired"))
    );
    let (status, _) = gateway.call("GET", "/v1/changes", "alice", None).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_are_gzipped_on_request_and_refused_without_a_token() {
    let (cluster, gateway) = setup().await;
    cluster
        .execute(
            "INSERT INTO doc SELECT g, 'alice', repeat('x', 100) FROM generate_series(1, 100) g",
        )
        .await;
    let auth = format!("Bearer {}", token("alice", &[]));
    let r = gateway
        .request(
            "GET",
            "/v1/snapshot/doc?ids=1,2",
            &[("Authorization", &auth), ("Accept-Encoding", "gzip")],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-encoding"),
        Some("gzip"),
        "{:?}",
        r.headers
    );
    assert_eq!(&r.body[..2], &[0x1f, 0x8b]);
    assert_eq!(
        gateway
            .request("GET", "/v1/snapshot/doc", &[], None)
            .await
            .unwrap()
            .status,
        401
    );
    let r = gateway
        .request(
            "GET",
            "/v1/snapshot/nothing",
            &[("Authorization", &auth)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_status_report_the_gateway() {
    let (cluster, gateway) = setup().await;
    let mut alice = subscribed(&gateway, "alice", "delta").await;
    cluster
        .execute("INSERT INTO doc VALUES (1, 'alice', 'a'); INSERT INTO marker VALUES (1);")
        .await;
    alice.changes_until(1).await;
    let (status, text) = gateway.admin_get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {text}"));
        line.split(' ').nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(value("sync_connections"), 1.0);
    assert_eq!(value("sync_subscriptions"), 2.0);
    assert!(value("sync_messages_sent_total") >= 3.0);
    assert!(value("sync_rls_checks_total") >= 1.0);
    assert!(value("sync_changes_read_total") >= 2.0);
    assert_eq!(value("sync_wal_slot_retained_bytes"), 0.0);
    let (status, body) = gateway.admin_get("/v1/status").await.unwrap();
    assert_eq!(status, 200);
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["ready"], true);
    // Not on the clients' listener.
    assert_eq!(gateway.get("/metrics").await.unwrap().0, 404);
    assert_eq!(gateway.get("/v1/status").await.unwrap().0, 404);
    assert_eq!(status["database"]["wakeup"], "worker");
}

/// Row-level security switched on while clients are subscribed applies to the very next
/// change: ENABLE ROW LEVEL SECURITY bumps the schema version, and the gateway re-reads
/// the table before routing a change made under a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_level_security_switched_on_applies_at_once() {
    let cluster = Cluster::start().await;
    cluster
        .execute(
            "CREATE TABLE note (id int PRIMARY KEY, owner text NOT NULL);
             CREATE TABLE marker (id int PRIMARY KEY);
             SELECT sync.track('note'); SELECT sync.track('marker');",
        )
        .await;
    let gateway = Gateway::start(&cluster, &[]).await;
    let mut bob = gateway.connect("bob").await;
    bob.subscribe(json!({"entityCode": "marker"})).await;
    bob.subscribe(json!({"entityCode": "note"})).await;
    cluster
        .execute("INSERT INTO note VALUES (1, 'alice'); INSERT INTO marker VALUES (1);")
        .await;
    assert_eq!(
        actions(&bob.changes_until(1).await),
        [("1".to_owned(), "CREATE".to_owned())]
    );
    cluster
        .execute(
            "ALTER TABLE note ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON note USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
             INSERT INTO note VALUES (2, 'alice'), (3, 'bob'); INSERT INTO marker VALUES (2);",
        )
        .await;
    assert_eq!(
        actions(&bob.changes_until(2).await),
        [("3".to_owned(), "CREATE".to_owned())]
    );
}

/// What alice may learn of bob's rows, path by path (SPEC 2.2): nothing. Her subscriptions
/// (whole table, a filter on a value, bob's id named, INVALIDATE) and `/v1/changes` see no id,
/// value or message of a version she may not see; a row leaving her sight arrives as DELETE,
/// one entering as CREATE with that change's data; a CREATE of a hidden id is refused as a
/// policy refusal is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_learns_nothing_of_rows_it_cannot_see() {
    let (cluster, gateway) = setup().await;
    cluster
        .execute(
            "CREATE TABLE pay (id int PRIMARY KEY, owner text NOT NULL, salary int NOT NULL);
             ALTER TABLE pay ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON pay
                 USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub')
                 WITH CHECK (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
             GRANT SELECT, INSERT, UPDATE, DELETE ON pay TO app_user;
             SELECT sync.track('pay');",
        )
        .await;
    let start = cluster.current_cursor().await;
    let payloads = [
        json!({"entityCode": "pay", "mode": "delta"}),
        json!({"entityCode": "pay", "mode": "delta",
               "filter": [{"column": "salary", "op": "gt", "value": 100000}]}),
        json!({"entityCode": "pay", "mode": "delta", "entityIds": ["2", "3"]}),
        json!({"entityCode": "pay", "mode": "invalidate"}),
    ];
    let mut alice = Vec::new();
    for payload in &payloads {
        let mut session = gateway.connect("alice").await;
        session.subscribe(json!({"entityCode": "marker"})).await;
        session.subscribe(payload.clone()).await;
        alice.push(session);
    }
    cluster
        .execute(
            "INSERT INTO pay VALUES (1, 'alice', 200000), (2, 'bob', 150000), (3, 'bob', 50);
             UPDATE pay SET salary = 160000 WHERE id = 2;
             UPDATE pay SET salary = 60 WHERE id = 3;
             DELETE FROM pay WHERE id = 2;
             INSERT INTO marker VALUES (1);",
        )
        .await;
    for (session, payload) in alice.iter_mut().zip(&payloads) {
        let seen = session.changes_until(1).await;
        let text = serde_json::to_string(&seen).unwrap();
        let expected: &[(&str, &str)] = match payload.get("entityIds") {
            Some(_) => &[],
            None => &[("1", "CREATE")],
        };
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(i, a)| (i.to_string(), a.to_string()))
            .collect();
        assert_eq!(actions(&seen), expected, "{payload}: {text}");
        assert!(
            !text.contains("bob") && !text.contains("150000"),
            "{payload}: {text}"
        );
    }
    // Rows moving: 1 leaves her sight, 3 enters it.
    cluster
        .execute(
            "UPDATE pay SET owner = 'bob' WHERE id = 1;
             UPDATE pay SET owner = 'alice', salary = 300000 WHERE id = 3;
             INSERT INTO marker VALUES (2);",
        )
        .await;
    let expected = [
        vec![("1", "DELETE"), ("3", "CREATE")],
        vec![("1", "DELETE"), ("3", "CREATE")],
        vec![("3", "CREATE")],
        vec![("1", "DELETE"), ("3", "CREATE")],
    ];
    for ((session, payload), expected) in alice.iter_mut().zip(&payloads).zip(expected) {
        let seen = session.changes_until(2).await;
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(i, a)| (i.to_string(), a.to_string()))
            .collect();
        assert_eq!(actions(&seen), expected, "{payload}: {seen:?}");
        let text = serde_json::to_string(&seen).unwrap();
        assert!(!text.contains("bob"), "{payload}: {text}");
        if payload["mode"] == "delta" {
            // The data of that change, not of the row as it is now.
            assert!(text.contains("300000"), "{payload}: {text}");
        }
    }

    // The long-poll sees the same: 1 created and left, 3 entered; nothing of 2.
    let (status, answer) = gateway
        .call(
            "GET",
            &format!("/v1/changes?since={start}&entityCode=pay"),
            "alice",
            None,
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let got: Vec<(String, String)> = answer["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["entityId"].as_str().unwrap().to_owned(),
                c["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [("1", "CREATE"), ("1", "DELETE"), ("3", "CREATE")];
    assert_eq!(
        got,
        want.map(|(i, a)| (i.to_owned(), a.to_owned())),
        "{answer}"
    );
    assert!(!answer.to_string().contains("bob"), "{answer}");

    // Writes: creating bob's hidden id answers exactly as a policy refusal does.
    let create = |id: i32, owner: &str| {
        json!({"mutations": [{"id": format!("c{id}{owner}"), "entityCode": "pay", "action": "CREATE",
                              "entityId": id.to_string(), "data": {"owner": owner, "salary": 1}}]})
    };
    let (hidden_status, mut hidden) = gateway
        .call("POST", "/v1/write", "alice", Some(create(1, "alice")))
        .await;
    let (policy_status, mut policy) = gateway
        .call("POST", "/v1/write", "alice", Some(create(7, "bob")))
        .await;
    assert_eq!(
        (hidden_status, policy_status),
        (403, 403),
        "{hidden} {policy}"
    );
    hidden["mutation"] = Value::Null;
    policy["mutation"] = Value::Null;
    assert_eq!(hidden, policy);
    // A visible row's id answers 409 with the row.
    let (status, answer) = gateway
        .call("POST", "/v1/write", "alice", Some(create(3, "alice")))
        .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["current"]["salary"], 300000);
}

/// A table whose policy takes a minute for the row it holds, and a cursor from before it.
async fn slow_table(cluster: &Cluster) -> String {
    cluster
        .execute(
            "CREATE TABLE slow (id int PRIMARY KEY, body text);
             ALTER TABLE slow ENABLE ROW LEVEL SECURITY;
             CREATE FUNCTION sleepy(body text) RETURNS boolean LANGUAGE sql
                 AS 'SELECT pg_sleep(CASE WHEN body = ''slow'' THEN 60 ELSE 0 END) IS NOT NULL';
             CREATE POLICY sleepy ON slow USING (sleepy(body));
             SELECT sync.track('slow');",
        )
        .await;
    let since = cluster.current_cursor().await;
    cluster.execute("INSERT INTO slow VALUES (1, 'slow')").await;
    since
}

/// A policy slow for some rows holds no client connection past `--policy-timeout`: a replay
/// that must judge them (on the clients' pool) ends with an ERROR at once instead of holding
/// its connection for as long as the policy runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_policy_on_a_replay_ends_at_the_policy_timeout() {
    let cluster = Cluster::start().await;
    let since = slow_table(&cluster).await;
    let gateway = Gateway::start(&cluster, &["--policy-timeout", "500ms"]).await;
    let mut session = gateway.connect("alice").await;
    session
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "slow", "since": since}}))
        .await;
    // SUBSCRIBED, then the replay's end: an ERROR well within PATIENCE, not a minute later.
    session.expect("SUBSCRIBED").await;
    let error = session.expect("ERROR").await;
    assert_eq!(error["code"], "forbidden", "{error}");
}

/// `/readyz` answers anyone and takes no client connection: with the only one held by a
/// replay judging that slow row, it still answers 200 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_takes_no_client_connection() {
    let cluster = Cluster::start().await;
    let since = slow_table(&cluster).await;
    let gateway = Gateway::start(
        &cluster,
        &[
            "--client-pool-size",
            "1",
            "--pool-wait",
            "1s",
            "--policy-timeout",
            "60s",
        ],
    )
    .await;
    let mut session = gateway.connect("alice").await;
    session
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "slow", "since": since}}))
        .await;
    session.expect("SUBSCRIBED").await;
    // The replay's judgement runs (on the one client connection) once sync.visible sleeps.
    let sleeping = "SELECT EXISTS (SELECT FROM pg_stat_activity
                     WHERE usename = 'sync_gateway' AND query LIKE '%sync.visible%')";
    cluster
        .wait_until(sleeping, &[], "the replay never judged")
        .await;
    for _ in 0..20 {
        assert_eq!(gateway.get("/readyz").await.unwrap().0, 200);
    }
}

/// A policy loosened after a change was written: the change is judged as the policy was
/// then, not as it is when it is read. bob's row 1 becomes secret (the policy hides secret
/// rows), then the policy is dropped for one that shows everything. Read a change at a time
/// from before, bob must not be shown the secret version: he gets the row leaving his sight
/// (or nothing) and, where the policy changed, the refetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_loosened_later_shows_no_version_written_under_the_old_one() {
    let cluster = Cluster::start().await;
    cluster
        .execute(
            "CREATE TABLE note (id int PRIMARY KEY, secret boolean NOT NULL, title text);
             ALTER TABLE note ENABLE ROW LEVEL SECURITY;
             CREATE POLICY open ON note USING (NOT secret);
             CREATE TABLE marker (id int PRIMARY KEY);
             INSERT INTO note VALUES (1, false, 'plain');
             SELECT sync.track('note'); SELECT sync.track('marker');",
        )
        .await;
    let gateway = Gateway::start(&cluster, &[]).await;
    let cursor = cluster.current_cursor().await;
    cluster
        .execute("UPDATE note SET secret = true, title = 'hidden' WHERE id = 1")
        .await;
    let mut bob = gateway.connect("bob").await;
    bob.subscribe(json!({"entityCode": "marker"})).await;
    cluster
        .execute(
            "DROP POLICY open ON note; CREATE POLICY everything ON note USING (true);
             INSERT INTO marker VALUES (1);",
        )
        .await;
    // The gateway has read past the policy change.
    bob.changes_until(1).await;

    let (status, body) = gateway
        .call(
            "GET",
            &format!("/v1/changes?since={cursor}&entityCode=note&limit=1"),
            "bob",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.to_string().contains("hidden"), "{body}");

    let mut replay = gateway.connect("bob").await;
    replay
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "note", "mode": "delta", "since": cursor}}))
        .await;
    loop {
        let message = replay.next().await.expect("open");
        assert!(!message.to_string().contains("hidden"), "{message}");
        if message["type"] == "RESYNC" {
            break;
        }
    }
}
