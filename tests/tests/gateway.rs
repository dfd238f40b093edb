//! The gateway end to end: a real cluster, real `sync-gateway` processes and real WebSocket
//! clients.

use pg_sync_tests::gateway::{actions, now, sign, token, Gateway, Session, PATIENCE, SECRET};
use pg_sync_tests::{future_cursor, Cluster};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const SCHEMA: &str = "
    CREATE TABLE project (id text PRIMARY KEY, name text, owner text);
    CREATE TABLE task (id int PRIMARY KEY, project_id int, title text, status text, secret text);
    CREATE TABLE marker (id int PRIMARY KEY);
    SELECT sync.track('project');
    SELECT sync.track('task', columns => ARRAY['project_id', 'title', 'status']);
    SELECT sync.track('marker');";

async fn setup(extra: &[&str]) -> (Cluster, Gateway) {
    let cluster = Cluster::start().await;
    cluster.execute(SCHEMA).await;
    let gateway = Gateway::start(&cluster, extra).await;
    (cluster, gateway)
}

/// A session subscribed to the marker entity, so `changes_until(n)` can tell when
/// everything committed before a marker has arrived.
async fn client(gateway: &Gateway, user: &str) -> Session {
    let mut session = gateway.connect(user).await;
    session.subscribe(json!({"entityCode": "marker"})).await;
    session
}

async fn mark(cluster: &Cluster, n: i32) {
    cluster
        .execute(&format!("INSERT INTO marker VALUES ({n})"))
        .await;
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Polls a count in the database until it equals `expected` (or fails after PATIENCE).
async fn wait_for_count(cluster: &Cluster, sql: &str, expected: i64) {
    let client = cluster.connect().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let count: i64 = client.query_one(sql, &[]).await.unwrap().get(0);
        if count == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sql}: {count}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_are_mirrored_in_the_database() {
    let (cluster, gateway) = setup(&[]).await;
    let mut session = gateway.connect("alice").await;
    let ids: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
    let answer = session
        .subscribe(json!({"entityCode": "project", "entityIds": ids, "ref": "r1"}))
        .await;
    assert_eq!(answer["count"], 50);
    assert_eq!(answer["ref"], "r1");
    assert!(answer["cursor"].as_str().is_some_and(|c| !c.is_empty()));
    wait_for_count(
        &cluster,
        "SELECT count(*) FROM sync.subscription WHERE user_id = 'alice'",
        50,
    )
    .await;
    wait_for_count(&cluster, "SELECT count(*) FROM sync.gateway", 1).await;
    session.send(json!({"type": "UNSUBSCRIBE_ALL"})).await;
    wait_for_count(&cluster, "SELECT count(*) FROM sync.subscription", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_arrives_as_invalidate() {
    let (cluster, gateway) = setup(&[]).await;
    let mut session = gateway.connect("alice").await;
    session
        .subscribe(json!({"entityCode": "project", "entityIds": ["p1"]}))
        .await;
    cluster
        .execute("INSERT INTO project VALUES ('p1', 'Launch', 'alice')")
        .await;
    let payload = session.expect("INVALIDATE").await;
    assert_eq!(payload["entityCode"], "project");
    assert_eq!(
        payload["changes"],
        json!([{"entityId": "p1", "action": "CREATE"}])
    );
    assert!(payload["cursor"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(payload["timestamp"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    cluster
        .execute(
            "UPDATE project SET name = 'Go' WHERE id = 'p1'; DELETE FROM project WHERE id = 'p1'",
        )
        .await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let payload = session.expect("INVALIDATE").await;
        seen.extend(actions(&[
            json!({"type": "INVALIDATE", "payload": payload}),
        ]));
    }
    assert_eq!(seen, pairs(&[("p1", "UPDATE"), ("p1", "DELETE")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_subscribers_each_get_exactly_their_changes() {
    let (cluster, gateway) = setup(&[]).await;
    let mut alice = client(&gateway, "alice").await;
    let mut bob = client(&gateway, "bob").await;
    let mut carol = client(&gateway, "carol").await;
    alice
        .subscribe(json!({"entityCode": "project", "entityIds": ["p1", "p2"]}))
        .await;
    bob.subscribe(json!({"entityCode": "project", "entityIds": ["p2", "p3"]}))
        .await;
    carol.subscribe(json!({"entityCode": "project"})).await;
    cluster
        .execute(
            "INSERT INTO project VALUES ('p1', 'a'), ('p2', 'b'), ('p3', 'c'), ('p4', 'd');
             UPDATE project SET name = 'B' WHERE id = 'p2';",
        )
        .await;
    mark(&cluster, 1).await;
    assert_eq!(
        actions(&alice.changes_until(1).await),
        pairs(&[("p1", "CREATE"), ("p2", "CREATE"), ("p2", "UPDATE")])
    );
    assert_eq!(
        actions(&bob.changes_until(1).await),
        pairs(&[("p2", "CREATE"), ("p3", "CREATE"), ("p2", "UPDATE")])
    );
    assert_eq!(
        actions(&carol.changes_until(1).await),
        pairs(&[
            ("p1", "CREATE"),
            ("p2", "CREATE"),
            ("p3", "CREATE"),
            ("p4", "CREATE"),
            ("p2", "UPDATE")
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_carries_published_data_and_changed_columns() {
    let (cluster, gateway) = setup(&[]).await;
    let mut full = gateway.connect("alice").await;
    full.subscribe(json!({"entityCode": "task", "mode": "delta"}))
        .await;
    let mut narrow = gateway.connect("bob").await;
    narrow
        .subscribe(json!({"entityCode": "task", "mode": "delta", "columns": ["title"]}))
        .await;
    cluster
        .execute(
            "INSERT INTO task VALUES (1, 7, 'Write', 'open', 'hidden');
             UPDATE task SET title = 'Rewrite', secret = 'still hidden' WHERE id = 1;",
        )
        .await;
    let mut changes = Vec::new();
    while changes.len() < 2 {
        changes.extend(
            full.expect("DELTA").await["changes"]
                .as_array()
                .unwrap()
                .clone(),
        );
    }
    assert_eq!(
        changes[0],
        json!({"entityId": "1", "action": "CREATE", "schemaVersion": 1,
               "data": {"id": 1, "project_id": 7, "title": "Write", "status": "open"}})
    );
    assert_eq!(
        changes[1],
        json!({"entityId": "1", "action": "UPDATE", "schemaVersion": 1, "changed": ["title"],
               "data": {"id": 1, "project_id": 7, "title": "Rewrite", "status": "open"}})
    );
    let first = narrow.expect("DELTA").await;
    assert_eq!(first["changes"][0]["data"], json!({"title": "Write"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filtered_subscribers_see_rows_enter_and_leave() {
    let (cluster, gateway) = setup(&[]).await;
    let mut session = client(&gateway, "alice").await;
    session
        .subscribe(json!({"entityCode": "task", "mode": "delta",
                          "filter": [{"column": "project_id", "op": "eq", "value": "7"},
                                     {"column": "status", "op": "in", "value": ["open", "blocked"]}]}))
        .await;
    cluster
        .execute(
            "INSERT INTO task VALUES (1, 7, 'in', 'open'), (2, 8, 'out', 'open'), (3, 7, 'done', 'done');
             UPDATE task SET project_id = 7 WHERE id = 2;   -- enters
             UPDATE task SET project_id = 8 WHERE id = 1;   -- leaves
             UPDATE task SET title = 'still in' WHERE id = 2;
             UPDATE task SET title = 'never in' WHERE id = 3;
             DELETE FROM task WHERE id = 2;",
        )
        .await;
    mark(&cluster, 1).await;
    let got = actions(&session.changes_until(1).await);
    assert_eq!(
        got,
        pairs(&[
            ("1", "CREATE"),
            ("2", "CREATE"),
            ("1", "DELETE"),
            ("2", "UPDATE"),
            ("2", "DELETE")
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_on_unknown_or_unpublished_columns_are_bad_requests() {
    let (cluster, gateway) = setup(&[]).await;
    cluster
        .execute("CREATE TABLE untracked (id int PRIMARY KEY)")
        .await;
    let mut session = gateway.connect("alice").await;
    for (payload, code) in [
        (
            json!({"entityCode": "task", "filter": [{"column": "secret", "op": "eq", "value": "x"}]}),
            "bad_request",
        ),
        (
            json!({"entityCode": "task", "filter": [{"column": "nope", "op": "is_null"}]}),
            "bad_request",
        ),
        (
            json!({"entityCode": "task", "columns": ["secret"]}),
            "bad_request",
        ),
        (json!({"entityCode": "untracked"}), "unknown_entity"),
        (json!({"entityCode": "nothing"}), "unknown_entity"),
    ] {
        let mut payload = payload;
        payload["ref"] = json!("r");
        session
            .send(json!({"type": "SUBSCRIBE", "payload": payload}))
            .await;
        let error = session.expect("ERROR").await;
        assert_eq!(error["code"], code, "{payload}: {error}");
        assert_eq!(error["ref"], "r");
    }
}

/// Resumes the project subscription on `gateway` from `cursor`: every change message that
/// follows, replayed (up to SYNCED) and then live, until a marker written after SYNCED.
async fn resume(
    cluster: &Cluster,
    gateway: &Gateway,
    cursor: &str,
    marker: i32,
) -> (Session, Vec<Value>) {
    let mut session = client(gateway, "alice").await;
    let answer = session
        .subscribe(
            json!({"entityCode": "project", "mode": "delta", "since": cursor, "ref": "again"}),
        )
        .await;
    assert_eq!(answer["cursor"], cursor);
    let mut messages = Vec::new();
    loop {
        let message = session.next().await.unwrap();
        if message["type"] == "SYNCED" {
            assert_eq!(message["payload"]["ref"], "again");
            break;
        }
        if message["payload"]["entityCode"] == "project" {
            messages.push(message);
        }
    }
    // Changes the live stream had not reached at SUBSCRIBE follow SYNCED, before the marker.
    mark(cluster, marker).await;
    messages.extend(session.changes_until(marker).await);
    (session, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_resumes_from_its_cursor_on_this_and_another_gateway() {
    let (cluster, gateway) = setup(&[]).await;
    let other = Gateway::start(&cluster, &[]).await;
    let mut session = gateway.connect("alice").await;
    session
        .subscribe(json!({"entityCode": "project", "mode": "delta"}))
        .await;
    cluster
        .execute("INSERT INTO project VALUES ('p1', 'a'), ('p2', 'b')")
        .await;
    let last = session.expect("DELTA").await;
    assert_eq!(last["changes"].as_array().unwrap().len(), 2);
    let cursor = last["cursor"].as_str().unwrap().to_owned();
    session.drop_connection();

    cluster
        .execute(
            "INSERT INTO project VALUES ('p3', 'c');
             UPDATE project SET name = 'A' WHERE id = 'p1';
             DELETE FROM project WHERE id = 'p2';",
        )
        .await;
    let missed = pairs(&[("p3", "CREATE"), ("p1", "UPDATE"), ("p2", "DELETE")]);
    let (mut here, replayed) = resume(&cluster, &gateway, &cursor, 1).await;
    assert_eq!(actions(&replayed), missed);
    let (mut there, replayed) = resume(&cluster, &other, &cursor, 2).await;
    assert_eq!(actions(&replayed), missed);
    // Then live, with nothing of the replay again.
    cluster
        .execute("INSERT INTO project VALUES ('live', 'x')")
        .await;
    mark(&cluster, 3).await;
    for session in [&mut here, &mut there] {
        let live = session.changes_until(3).await;
        let live: Vec<Value> = live
            .into_iter()
            .filter(|m| m["payload"]["entityCode"] == "project")
            .collect();
        assert_eq!(actions(&live), pairs(&[("live", "CREATE")]));
    }
}

/// A change written while a replay runs is delivered once, after SYNCED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_during_a_replay_arrive_once_after_it() {
    let (cluster, gateway) = setup(&[]).await;
    let cursor = cluster.current_cursor().await;
    cluster
        .execute("INSERT INTO project SELECT 'p' || g, 'x' FROM generate_series(1, 3000) g")
        .await;
    let mut session = gateway.connect("alice").await;
    session
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "project", "since": cursor}}))
        .await;
    cluster
        .execute("INSERT INTO project VALUES ('during', 'x')")
        .await;
    mark(&cluster, 1).await;
    let mut seen = Vec::new();
    let mut synced = false;
    while seen.len() < 3001 {
        let message = session.next().await.unwrap();
        match message["type"].as_str().unwrap() {
            "SYNCED" => synced = true,
            "SUBSCRIBED" => {}
            _ => {
                let got = actions(&[message]);
                // Live after SYNCED, or (when it committed before the subscription reached the
                // router) the replay's last change: never in the middle of the replay.
                if let Some(at) = got.iter().position(|(id, _)| id == "during") {
                    assert!(
                        synced || seen.len() + at == 3000,
                        "'during' before the replay ended"
                    );
                }
                seen.extend(got);
            }
        }
    }
    let mut ids: Vec<&str> = seen.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3001, "no duplicates, nothing missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_that_commits_late_reaches_the_socket() {
    let (cluster, gateway) = setup(&[]).await;
    let mut session = client(&gateway, "alice").await;
    session.subscribe(json!({"entityCode": "project"})).await;
    let early = cluster.connect().await;
    early
        .batch_execute("BEGIN; INSERT INTO project VALUES ('early', 'x')")
        .await
        .unwrap();
    cluster
        .execute("INSERT INTO project VALUES ('late', 'x')")
        .await;
    mark(&cluster, 1).await;
    assert_eq!(
        actions(&session.changes_until(1).await),
        pairs(&[("late", "CREATE")])
    );
    early.batch_execute("COMMIT").await.unwrap();
    mark(&cluster, 2).await;
    assert_eq!(
        actions(&session.changes_until(2).await),
        pairs(&[("early", "CREATE")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_tokens_are_refused_with_401_before_the_upgrade() {
    let (_cluster, gateway) = setup(&[]).await;
    let later = now() + 600;
    let b64 = |s: &str| {
        use std::fmt::Write;
        // base64url without padding
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in s.as_bytes().chunks(3) {
            let n = chunk.iter().fold(0u32, |n, &b| n << 8 | b as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.write_char(A[(n >> (18 - 6 * i) & 63) as usize] as char)
                    .unwrap();
            }
        }
        out
    };
    let hs384 = {
        use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
        encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "a", "exp": later}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    for (why, bad) in [
        (
            "wrong secret",
            sign(&json!({"sub": "a", "exp": later}), "other"),
        ),
        (
            "expired",
            sign(&json!({"sub": "a", "exp": now() - 10}), SECRET),
        ),
        ("no exp", sign(&json!({"sub": "a"}), SECRET)),
        ("no sub", sign(&json!({"exp": later}), SECRET)),
        (
            "not yet valid",
            sign(
                &json!({"sub": "a", "exp": later, "nbf": later - 60}),
                SECRET,
            ),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&format!(r#"{{"sub":"a","exp":{later}}}"#))
            ),
        ),
        ("another algorithm", hs384),
        ("garbage", "garbage".to_owned()),
    ] {
        assert_eq!(
            gateway.connect_with(&bad, "").await.err(),
            Some(401),
            "{why}"
        );
    }
    // No token at all, and a good one in the query string.
    assert_eq!(gateway.connect_with("", "").await.err(), Some(401));
    let good = token("alice", &[]);
    let mut session = gateway
        .connect_with("", &format!("?token={good}"))
        .await
        .expect("query token works");
    session.send(json!({"type": "PING"})).await;
    session.expect("PONG").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_audience_is_required_when_configured() {
    let (_cluster, gateway) = setup(&["--jwt-audience", "sync"]).await;
    assert_eq!(
        gateway.connect_with(&token("a", &[]), "").await.err(),
        Some(401)
    );
    assert_eq!(
        gateway
            .connect_with(&token("a", &[("aud", json!("other"))]), "")
            .await
            .err(),
        Some(401)
    );
    assert!(gateway
        .connect_with(&token("a", &[("aud", json!("sync"))]), "")
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_frames_get_errors_and_leave_other_clients_alone() {
    let (cluster, gateway) = setup(&[]).await;
    let mut bystander = client(&gateway, "bob").await;
    bystander.subscribe(json!({"entityCode": "project"})).await;
    let mut session = gateway.connect("alice").await;
    for (frame, code) in [
        ("not json".to_owned(), "bad_request"),
        ("[1, 2]".to_owned(), "bad_request"),
        (r#"{"type":"NOPE"}"#.to_owned(), "bad_request"),
        (
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":5,"ref":"r7"}}"#.to_owned(),
            "bad_request",
        ),
        (
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"project","mode":"loud"}}"#.to_owned(),
            "bad_request",
        ),
        (
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"project","entityIds":"p1"}}"#
                .to_owned(),
            "bad_request",
        ),
        (
            format!(
                r#"{{"type":"PING","payload":{{"pad":"{}"}}}}"#,
                "x".repeat(70_000)
            ),
            "message_too_large",
        ),
    ] {
        session.send_text(&frame).await;
        let error = session.expect("ERROR").await;
        assert_eq!(error["code"], code, "{}", &frame[..frame.len().min(80)]);
        if frame.contains("r7") {
            assert_eq!(error["ref"], "r7");
        }
    }
    session.send_raw(Message::binary(vec![1, 2, 3])).await;
    assert_eq!(session.expect("ERROR").await["code"], "bad_request");
    // The connection is still served.
    session.send(json!({"type": "PING"})).await;
    session.expect("PONG").await;

    // Abuse closes that connection alone, with 1008.
    for _ in 0..25 {
        session.send_text("junk").await;
    }
    let close = loop {
        match session.next_or_close().await {
            Ok(message) => assert_eq!(message["type"], "ERROR"),
            Err(code) => break code,
        }
    };
    assert_eq!(close, Some(1008));
    cluster
        .execute("INSERT INTO project VALUES ('p1', 'x')")
        .await;
    mark(&cluster, 1).await;
    assert_eq!(
        actions(&bystander.changes_until(1).await),
        pairs(&[("p1", "CREATE")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_does_not_read_is_closed_and_others_go_on() {
    let (cluster, gateway) = setup(&["--send-queue-bytes", "65536"]).await;
    let mut slow = gateway.connect("slow").await;
    slow.subscribe(json!({"entityCode": "project", "mode": "delta"}))
        .await;
    slow.subscribe(json!({"entityCode": "task", "mode": "delta"}))
        .await;
    let mut healthy = client(&gateway, "healthy").await;
    healthy
        .subscribe(json!({"entityCode": "project", "entityIds": ["last"]}))
        .await;
    // Alternating entities: one message per change, megabytes in all.
    cluster
        .execute(
            "INSERT INTO project SELECT 'p' || g, repeat('x', 500) FROM generate_series(1, 20000) g;
             INSERT INTO task SELECT g, g, repeat('y', 500), 'open' FROM generate_series(1, 20000) g;",
        )
        .await;
    cluster
        .execute(
            "DO $$ BEGIN FOR i IN 1..4000 LOOP
                 UPDATE project SET name = 'z' || i WHERE id = 'p' || i;
                 UPDATE task SET title = 'z' || i WHERE id = i;
             END LOOP; END $$;",
        )
        .await;
    cluster
        .execute("INSERT INTO project VALUES ('last', 'x')")
        .await;
    mark(&cluster, 1).await;
    assert_eq!(
        actions(&healthy.changes_until(1).await),
        pairs(&[("last", "CREATE")])
    );
    // The slow client finds, after what was already on its way, the close.
    let close = loop {
        match slow.next_or_close().await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(close, Some(4008));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_gateway_is_killed_clients_resume_on_another_and_its_rows_go() {
    let (cluster, doomed) = setup(&["--heartbeat-secs", "1"]).await;
    let survivor = Gateway::start(&cluster, &["--heartbeat-secs", "1"]).await;
    let mut session = doomed.connect("alice").await;
    session
        .subscribe(json!({"entityCode": "project", "mode": "delta"}))
        .await;
    cluster
        .execute("INSERT INTO project VALUES ('p1', 'a')")
        .await;
    let cursor = session.expect("DELTA").await["cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_count(&cluster, "SELECT count(*) FROM sync.subscription", 1).await;
    doomed.kill().await;
    session.drop_connection();
    cluster
        .execute(
            "INSERT INTO project VALUES ('p2', 'b'); UPDATE project SET name = 'A' WHERE id = 'p1'",
        )
        .await;
    let (_resumed, replayed) = resume(&cluster, &survivor, &cursor, 1).await;
    assert_eq!(
        actions(&replayed),
        pairs(&[("p2", "CREATE"), ("p1", "UPDATE")])
    );
    // The dead gateway's subscription row is removed once its heartbeat is stale; the
    // survivor's own two (marker and project) stay.
    wait_for_count(&cluster, "SELECT count(*) FROM sync.subscription", 2).await;
    wait_for_count(&cluster, "SELECT count(*) FROM sync.gateway", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_token_closes_the_connection_unless_refreshed() {
    let (_cluster, gateway) = setup(&[]).await;
    let short = sign(&json!({"sub": "alice", "exp": now() + 2}), SECRET);
    let mut refreshed = gateway.connect_with(&short, "").await.unwrap();
    refreshed
        .send(json!({"type": "AUTH", "payload": {"token": token("alice", &[])}}))
        .await;
    let mut expiring = gateway.connect_with(&short, "").await.unwrap();
    let error = expiring.expect("ERROR").await;
    assert_eq!(error["code"], "token_expired");
    assert_eq!(expiring.next_or_close().await.err(), Some(Some(4001)));
    // The refreshed one outlived the first token.
    refreshed.send(json!({"type": "PING"})).await;
    refreshed.expect("PONG").await;
    // A token of someone else is not a refresh.
    refreshed
        .send(json!({"type": "AUTH", "payload": {"token": token("mallory", &[])}}))
        .await;
    assert_eq!(refreshed.expect("ERROR").await["code"], "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_writes_are_not_echoed() {
    let (cluster, gateway) = setup(&[]).await;
    let mut session = gateway
        .connect_with(&token("alice", &[]), "?clientId=tab-1")
        .await
        .unwrap();
    session.subscribe(json!({"entityCode": "marker"})).await;
    session.subscribe(json!({"entityCode": "project"})).await;
    cluster
        .execute(
            "BEGIN; SET LOCAL sync.client_id = 'tab-1'; INSERT INTO project VALUES ('mine', 'x'); COMMIT;
             INSERT INTO project VALUES ('theirs', 'x');",
        )
        .await;
    mark(&cluster, 1).await;
    assert_eq!(
        actions(&session.changes_until(1).await),
        pairs(&[("theirs", "CREATE")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncate_and_expired_cursors_bring_resync() {
    let (cluster, gateway) = setup(&[]).await;
    let old = cluster.current_cursor().await;
    let mut session = gateway.connect("alice").await;
    session.subscribe(json!({"entityCode": "project"})).await;
    cluster
        .execute("INSERT INTO project VALUES ('p1', 'x')")
        .await;
    session.expect("INVALIDATE").await;
    cluster.execute("TRUNCATE project").await;
    assert_eq!(
        session.expect("RESYNC").await,
        json!({"entityCode": "project", "reason": "truncate"})
    );
    // A change the same read finds before a TRUNCATE of its entity is not sent: the
    // subscriber refetches at the TRUNCATE anyway.
    cluster
        .execute("INSERT INTO project VALUES ('p2', 'x'); TRUNCATE project;")
        .await;
    assert_eq!(
        session.expect("RESYNC").await,
        json!({"entityCode": "project", "reason": "truncate"})
    );

    cluster.execute("SELECT sync.prune('0 seconds')").await;
    session
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "task", "since": old}}))
        .await;
    assert_eq!(
        session.expect("RESYNC").await,
        json!({"entityCode": "task", "reason": "cursor_expired"})
    );
    session.send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "task", "since": "nonsense", "ref": "x"}})).await;
    let error = session.expect("ERROR").await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("bad_request"), Some("x"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_per_connection_are_limited() {
    let (_cluster, gateway) = setup(&["--max-subscriptions", "3"]).await;
    let mut session = gateway.connect("alice").await;
    session
        .subscribe(json!({"entityCode": "project", "entityIds": ["a", "b"]}))
        .await;
    session.send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "project", "entityIds": ["c", "d"]}})).await;
    assert_eq!(
        session.expect("ERROR").await["code"],
        "too_many_subscriptions"
    );
    session.subscribe(json!({"entityCode": "task"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_peer_is_reaped_within_the_ping_window() {
    let (cluster, gateway) = setup(&["--ping-interval-secs", "1"]).await;
    let mut session = gateway.connect("alice").await;
    session.subscribe(json!({"entityCode": "project"})).await;
    wait_for_count(&cluster, "SELECT count(*) FROM sync.subscription", 1).await;
    // Stop reading: pings go unanswered, as from a peer whose network vanished.
    let _frozen = session;
    wait_for_count(&cluster, "SELECT count(*) FROM sync.subscription", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_tells_clients_when_to_reconnect_closes_with_1001_and_removes_subscriptions() {
    let (cluster, gateway) = setup(&["--reconnect-window", "3s"]).await;
    let mut session = gateway.connect("alice").await;
    session.subscribe(json!({"entityCode": "project"})).await;
    wait_for_count(&cluster, "SELECT count(*) FROM sync.subscription", 1).await;
    let (health, _) = gateway.get("/healthz").await.unwrap();
    assert_eq!(health, 200);
    let stopping = tokio::spawn(gateway.stop());
    let reconnect = session.expect("RECONNECT").await;
    assert_eq!(reconnect["reason"], "shutdown");
    assert!(reconnect["afterMs"].as_u64().unwrap() < 3000, "{reconnect}");
    assert_eq!(session.next_or_close().await.err(), Some(Some(1001)));
    assert!(
        stopping.await.unwrap(),
        "the gateway exits cleanly after SIGTERM"
    );
    wait_for_count(&cluster, "SELECT count(*) FROM sync.subscription", 0).await;
    wait_for_count(&cluster, "SELECT count(*) FROM sync.gateway", 0).await;
}

/// A `since` the database has not reached is refused with bad_request, on the socket and on
/// `/v1/changes`; it is not waited on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cursor_ahead_of_the_database_is_refused() {
    let (cluster, gateway) = setup(&[]).await;
    let now = cluster.current_cursor().await;
    let ahead = future_cursor(&now, 1000);
    let mut session = client(&gateway, "alice").await;
    session
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "project", "since": ahead, "ref": "f"}}))
        .await;
    let error = session.expect("ERROR").await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("bad_request"), Some("f"))
    );
    let (status, answer) = gateway
        .call(
            "GET",
            &format!("/v1/changes?since={ahead}&wait=30"),
            "alice",
            None,
        )
        .await;
    assert_eq!(status, 400, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_by_ids_finds_ids_that_hold_commas() {
    let (cluster, gateway) = setup(&[]).await;
    cluster
        .execute(
            "CREATE TABLE pair (a text, b text, PRIMARY KEY (a, b));
             INSERT INTO pair VALUES ('x', 'y'), ('x,y', 'z'), ('q', 'r');
             CREATE TABLE tag (name text PRIMARY KEY);
             INSERT INTO tag VALUES ('a,b'), ('a'), ('b');
             SELECT sync.track('pair'); SELECT sync.track('tag');",
        )
        .await;
    // As the client sends them: each id percent-encoded, the list joined by literal commas.
    let query = |ids: &[&str]| {
        let encoded: Vec<String> = ids
            .iter()
            .map(|id| {
                percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            })
            .collect();
        format!("?ids={}", encoded.join(","))
    };
    let (_, rows) = gateway
        .snapshot("alice", &format!("tag{}", query(&["a,b"])))
        .await
        .unwrap();
    assert_eq!(rows, [json!({"name": "a,b"})]);
    let (_, mut rows) = gateway
        .snapshot(
            "alice",
            &format!("pair{}", query(&[r#"["x,y","z"]"#, r#"["q","r"]"#])),
        )
        .await
        .unwrap();
    rows.sort_by_key(|r| r["a"].as_str().unwrap().to_owned());
    assert_eq!(
        rows,
        [json!({"a": "q", "b": "r"}), json!({"a": "x,y", "b": "z"})]
    );
}

/// A column added to an allow-listed table is not published, also not in the seconds before
/// the gateway reads its catalog again: snapshots (and conflict answers) name the published
/// columns rather than leave out the others as last read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_column_added_to_an_allow_listed_table_stays_unpublished() {
    let (cluster, gateway) = setup(&[]).await;
    cluster
        .execute("INSERT INTO task VALUES (1, 7, 'one', 'open', 's3cret')")
        .await;
    let (_, rows) = gateway.snapshot("alice", "task").await.unwrap();
    assert_eq!(
        rows,
        [json!({"id": 1, "project_id": 7, "title": "one", "status": "open"})]
    );
    cluster
        .execute("ALTER TABLE task ADD COLUMN ssn text DEFAULT 'leaked'")
        .await;
    let (_, rows) = gateway.snapshot("alice", "task").await.unwrap();
    assert_eq!(
        rows,
        [json!({"id": 1, "project_id": 7, "title": "one", "status": "open"})]
    );
}

/// How many connections a rate of `per_second` (and as many at once) admits in `elapsed`.
fn admissible(per_second: usize, elapsed: Duration) -> usize {
    per_second + (per_second as f64 * elapsed.as_secs_f64()).ceil() as usize
}

/// A storm of new connections (a gateway restarted, a network back) is admitted at
/// `--max-admissions-per-second`: beyond it, 503 with `Retry-After`; coming back after it,
/// everyone gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_connections_beyond_the_admission_rate_are_told_when_to_come_back() {
    let (_cluster, gateway) = setup(&["--max-admissions-per-second", "5"]).await;
    let token = token("alice", &[]);
    let mut admitted = Vec::new();
    let mut retry_after = Vec::new();
    let started = Instant::now();
    for _ in 0..20 {
        match gateway.try_connect(&token, "").await {
            Ok(session) => admitted.push(session),
            Err((status, retry)) => {
                assert_eq!(status, 503);
                retry_after.push(retry.expect("Retry-After").parse::<u64>().unwrap());
            }
        }
    }
    assert!(admitted.len() >= 5, "a second's worth at once");
    // A second's worth at once, then 5 a second for as long as the 20 attempts took.
    let elapsed = started.elapsed();
    assert!(
        admitted.len() <= admissible(5, elapsed),
        "{} admitted of 20 in {elapsed:?}",
        admitted.len()
    );
    assert!(
        retry_after.iter().all(|s| (1..=2).contains(s)),
        "{retry_after:?}"
    );
    // Coming back as told (or after a second, if none was refused), each gets in.
    let retry = retry_after.first().copied().unwrap_or(1);
    while admitted.len() < 20 {
        match gateway.connect_with(&token, "").await {
            Ok(session) => admitted.push(session),
            Err(_) => tokio::time::sleep(Duration::from_secs(retry)).await,
        }
    }
}

/// One user opening connections as fast as they can spends their own admissions, not
/// everyone's: another user connects at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_flooding_new_connections_leaves_others_their_admission() {
    let (_cluster, gateway) = setup(&[
        "--max-admissions-per-second",
        "5",
        "--max-admissions-per-user-per-second",
        "2",
    ])
    .await;
    let mallory = token("mallory", &[]);
    let mut held = Vec::new();
    let started = Instant::now();
    for _ in 0..20 {
        match gateway.try_connect(&mallory, "").await {
            Ok(session) => held.push(session),
            Err((status, _)) => assert_eq!(status, 503),
        }
    }
    let elapsed = started.elapsed();
    assert!(
        held.len() <= admissible(2, elapsed),
        "{} of mallory's 20 admitted in {elapsed:?}",
        held.len()
    );
    for user in ["bob", "carol"] {
        assert!(
            gateway.try_connect(&token(user, &[]), "").await.is_ok(),
            "{user} gets in while mallory floods"
        );
    }
}

/// Snapshot rows are written by the gateway from the columns' values: each must be the same
/// JSON as PostgreSQL's `to_jsonb` of the row (of its published columns), for every kind of
/// column, NULLs, texts that need escaping, a `json` value typed over several lines, a user's
/// cast to `json` that returns several lines, a float's `-0`, and names that need quoting; by
/// COPY (the whole table) and by ids alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_row_is_the_json_postgresql_makes_of_it() {
    let (cluster, gateway) = setup(&[]).await;
    cluster
        .execute(
            r#"CREATE TYPE mood AS ENUM ('calm', 'loud');
             -- The type's owner gives it a cast to json over several lines.
             CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE sql IMMUTABLE
                 AS $$ SELECT E'[1,\n{"id": 99, "forged": true}\n]'::json $$;
             CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood);
             CREATE TYPE point2 AS (x int, y float8);
             CREATE DOMAIN positive AS int CHECK (VALUE > 0);
             CREATE TABLE every_kind (
                 id int PRIMARY KEY, small int2, big int8, yes bool, body text, short varchar(9),
                 amount numeric, ratio float8, day date, at timestamptz, seen interval, uid uuid,
                 raw bytea, doc json, docb jsonb, tags text[], nums int[], place point2,
                 feeling mood, n positive, span int4range, "Weird ""name""" text, letter char(3));
             INSERT INTO every_kind (id) VALUES (1);
             INSERT INTO every_kind VALUES
                 (2, -32768, 9223372036854775807, true, E'quote " back \\ tab \t nl \n ctl \x01 é ✓', 'short',
                  123456789012345678901234567890.000100, 'NaN', '2026-12-02', '2026-12-02 18:00:00.123456+01',
                  '1 day 02:03:04', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\xdeadbeef',
                  E'{"b": 1,\n "a": [1, 2.50, "x"],\n "a": null}', '{"z": {"y": [true, null]}}',
                  ARRAY['a', NULL, 'c"d'], ARRAY[1, NULL, 3], ROW(1, 'Infinity'), 'loud', 7, '[1,5)', 'w', 'ab'),
                 (3, 0, -1, false, '', '', -0.5, '-Infinity', 'infinity', '-infinity', '-1 mon', NULL,
                  '', '"text"', 'null', '{}', '{}', ROW(NULL, NULL), 'calm', 1, 'empty', '', '');
             INSERT INTO every_kind (id, ratio) VALUES (4, '-0');
             CREATE TABLE narrow (id int PRIMARY KEY, shown text, stamp timestamptz, hidden text);
             INSERT INTO narrow VALUES (1, 'a', now(), 'no'), (2, NULL, NULL, 'no');
             SELECT sync.track('every_kind');
             SELECT sync.track('narrow', columns => ARRAY['shown', 'stamp']);"#,
        )
        .await;
    let db = cluster.connect().await;
    for (entity, columns) in [("every_kind", "t.*"), ("narrow", "t.id, t.shown, t.stamp")] {
        let expected: Vec<Value> = db
            .query(
                &format!(
                    "SELECT to_jsonb(r) FROM (SELECT {columns} FROM {entity} t ORDER BY id) r"
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let (_, mut whole) = gateway.snapshot("alice", entity).await.unwrap();
        whole.sort_by_key(|row| row["id"].as_i64());
        assert_eq!(whole, expected, "{entity}, by COPY");
        let (_, mut named) = gateway
            .snapshot("alice", &format!("{entity}?ids=1,2,3,4"))
            .await
            .unwrap();
        named.sort_by_key(|row| row["id"].as_i64());
        assert_eq!(named, expected, "{entity}, by ids");
        // `?ids=` names no id: refused, where it was one empty id the int key could not cast.
        let none = gateway.snapshot("alice", &format!("{entity}?ids=")).await;
        assert_eq!(none.unwrap_err(), 400, "{entity}, by no ids");
    }
}
