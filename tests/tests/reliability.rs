//! Bounds and trouble: a bulk UPDATE to whole-table subscribers, a client that never reads,
//! many idle connections, the database gone for 30 s, the replication slot dropped. Each test
//! names the guarantee it checks; `PG_SYNC_SOAK=1` makes the idle-connection test the long
//! variant (10,000 connections for a minute, `make soak`).

use futures_util::StreamExt;
use pg_sync_tests::gateway::{token, Gateway, Session, PATIENCE};
use pg_sync_tests::{future_cursor, Cluster};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;
use tokio_tungstenite::tungstenite;

fn soak() -> bool {
    std::env::var("PG_SYNC_SOAK").is_ok()
}

/// The changes of a DELTA or INVALIDATE message (none for other messages).
fn changes(message: &Value) -> Vec<Value> {
    match message["type"].as_str() {
        Some("DELTA" | "INVALIDATE") => message["payload"]["changes"].as_array().unwrap().clone(),
        _ => Vec::new(),
    }
}

/// Polls `path` until it answers `status` (or fails after PATIENCE).
async fn wait_for_status(gateway: &Gateway, path: &str, status: u16, patience: Duration) {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if gateway.get(path).await.is_ok_and(|(s, _)| s == status) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100k_row_update_reaches_every_whole_table_subscriber() {
    const ROWS: usize = 100_000;
    let cluster = Cluster::start().await;
    cluster
        .execute(&format!(
            "CREATE TABLE item (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO item SELECT g, 0 FROM generate_series(1, {ROWS}) g;
             SELECT sync.track('item');"
        ))
        .await;
    let gateway = Gateway::start(&cluster, &[]).await;
    let mut readers = Vec::new();
    for (user, mode) in [("a", "delta"), ("b", "delta"), ("c", "invalidate")] {
        let mut session = gateway.connect(user).await;
        session
            .subscribe(json!({"entityCode": "item", "mode": mode}))
            .await;
        readers.push(tokio::spawn(async move {
            let (mut seen, mut twice, mut messages) = (HashSet::new(), 0, 0);
            while seen.len() < ROWS {
                let message = match session.next_or_close().await {
                    Ok(m) if m["type"] == "RESYNC" => return Err(format!("{user}: {m}")),
                    Ok(m) => m,
                    Err(code) => return Err(format!("{user}: closed with {code:?}")),
                };
                messages += 1;
                for change in changes(&message) {
                    assert_eq!(change["action"], "UPDATE", "{user}: {change}");
                    if mode == "delta" {
                        assert_eq!(change["data"]["v"], 1, "{user}: {change}");
                    }
                    if !seen.insert(change["entityId"].as_str().unwrap().to_owned()) {
                        twice += 1;
                    }
                }
            }
            Ok((user, twice, messages))
        }));
    }
    cluster.execute("UPDATE item SET v = 1").await;
    for reader in readers {
        // A client that reads keeps up: every change, once, in batched messages.
        let (user, twice, messages) = reader.await.unwrap().unwrap();
        assert_eq!(twice, 0, "{user} saw changes twice");
        assert!(
            messages * 100 <= ROWS,
            "{user}: {messages} messages for {ROWS} changes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_never_reads_is_cut_off_and_memory_stays_bounded() {
    const CHANGES: usize = 50_000;
    let cluster = Cluster::start().await;
    cluster
        .execute(
            "CREATE TABLE doc (id int PRIMARY KEY, body text);
             SELECT sync.track('doc');",
        )
        .await;
    let gateway = Gateway::start(&cluster, &[]).await;
    let mut stalled = gateway.connect("stalled").await;
    stalled
        .subscribe(json!({"entityCode": "doc", "mode": "delta"}))
        .await;
    let mut watcher = gateway.connect("watcher").await;
    watcher
        .subscribe(json!({"entityCode": "doc", "entityIds": [CHANGES.to_string()]}))
        .await;
    let before = gateway.rss_kib();
    // 50k changes of 1 KiB, about 55 MiB of DELTA frames, committed 1,000 at a time.
    cluster
        .execute(&format!(
            "DO $$ BEGIN FOR b IN 0..{} LOOP
                 INSERT INTO doc SELECT g, repeat('x', 1024)
                   FROM generate_series(b * 1000 + 1, b * 1000 + 1000) g;
                 COMMIT;
             END LOOP; END $$;",
            CHANGES / 1000 - 1
        ))
        .await;
    // The last row reached the watcher: the gateway has routed every change.
    let last = watcher.expect("INVALIDATE").await;
    assert_eq!(last["changes"][0]["entityId"], CHANGES.to_string());
    let grown = gateway.rss_kib().saturating_sub(before);
    eprintln!(
        "the gateway grew by {grown} KiB while {CHANGES} changes passed a client that never reads"
    );
    assert!(
        grown < 32 * 1024,
        "the gateway grew by {grown} KiB for a client that never reads"
    );
    // The stalled client finds, after what was already on its way, RESYNC or the close. The
    // close frame comes only when the socket had room for it: when the kernel's buffers were
    // full, the gateway ends the connection without one.
    let ending = loop {
        match stalled.next_or_close().await {
            Ok(m) if m["type"] == "RESYNC" => break format!("RESYNC {}", m["payload"]["reason"]),
            Ok(_) => continue,
            Err(code) => break format!("closed {code:?}"),
        }
    };
    match ending.as_str() {
        "closed Some(4008)" => {}
        // Ended without a frame: the gateway dropped it (the watcher is all it still holds),
        // not a failure of the gateway.
        "closed None" => assert_eq!(gateway.metric("sync_connections").await, 1),
        resync => assert!(resync.starts_with("RESYNC"), "{ending}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_hold_flat_memory() {
    let (count, hold) = if soak() { (10_000, 60) } else { (2_000, 10) };
    let cluster = Cluster::start().await;
    cluster
        .execute("CREATE TABLE room (id int PRIMARY KEY); SELECT sync.track('room');")
        .await;
    let gateway = Gateway::start(&cluster, &["--ping-interval-secs", "2"]).await;
    let subscribe = json!({"type": "SUBSCRIBE", "payload": {"entityCode": "room"}}).to_string();
    let mut readers = Vec::new();
    for i in 0..count {
        // One user each (a user may hold 100 connections at most).
        let url = gateway.ws_url(&format!("?token={}", token(&format!("idle-{i}"), &[])));
        let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        futures_util::SinkExt::send(&mut socket, subscribe.as_str().into())
            .await
            .unwrap();
        // Reading answers the server's pings; the connection ends only if the server closes it.
        readers.push(tokio::spawn(async move {
            while let Some(Ok(_)) = socket.next().await {}
        }));
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while gateway.metric("sync_subscriptions").await < count as i64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriptions never reached {count}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled = gateway.rss_kib();
    let mut peak = settled;
    for _ in 0..hold {
        tokio::time::sleep(Duration::from_secs(1)).await; // the duration under test, not a wait
        peak = peak.max(gateway.rss_kib());
    }
    eprintln!(
        "{count} idle connections: {settled} KiB after connecting, peak {peak} KiB over {hold} s"
    );
    assert!(
        peak <= settled + settled / 20 + 2048,
        "memory grew from {settled} to {peak} KiB"
    );
    assert_eq!(
        gateway.metric("sync_connections").await,
        count as i64,
        "idle connections were closed"
    );
    assert!(
        readers.iter().all(|r| !r.is_finished()),
        "a connection ended"
    );
}

/// Notes the ids a message changed and the cursor it ends at.
fn note(message: &Value, received: &mut Vec<String>, cursor: &mut String) {
    received.extend(
        changes(message)
            .iter()
            .map(|c| c["entityId"].as_str().unwrap().to_owned()),
    );
    if let Some(at) = message["payload"]["cursor"].as_str() {
        *cursor = at.to_owned();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_seconds_without_the_database_lose_nothing() {
    let cluster = Cluster::start().await;
    cluster
        .execute("CREATE TABLE note (id int PRIMARY KEY); SELECT sync.track('note');")
        .await;
    let gateway = Gateway::start(&cluster, &[]).await;
    let mut session = gateway.connect("alice").await;
    session
        .subscribe(json!({"entityCode": "note", "mode": "delta"}))
        .await;
    cluster
        .execute("INSERT INTO note SELECT generate_series(1, 3)")
        .await;
    let mut received = Vec::new();
    let mut cursor = String::new();
    while received.len() < 3 {
        let message = session.next().await.unwrap();
        note(&message, &mut received, &mut cursor);
    }

    cluster.stop_immediate();
    wait_for_status(&gateway, "/readyz", 503, PATIENCE).await;
    assert_eq!(gateway.get("/healthz").await.unwrap().0, 200);
    tokio::time::sleep(Duration::from_secs(30)).await; // the outage under test
    assert_eq!(gateway.get("/readyz").await.unwrap().0, 503);
    cluster.start_again();
    wait_for_status(&gateway, "/readyz", 200, PATIENCE * 2).await;

    cluster
        .execute("INSERT INTO note SELECT generate_series(4, 6)")
        .await;
    // The connection stayed open, or was closed with a close frame and resumes from its cursor.
    while received.len() < 6 {
        let message = match session.next_or_close().await {
            Ok(message) => message,
            Err(Some(code)) => {
                eprintln!("closed with {code} during the outage; resuming");
                session = gateway.connect("alice").await;
                session
                    .subscribe(json!({"entityCode": "note", "mode": "delta", "since": cursor}))
                    .await;
                continue;
            }
            Err(None) => panic!("the connection was dropped without a close frame"),
        };
        note(&message, &mut received, &mut cursor);
    }
    assert_eq!(received, ["1", "2", "3", "4", "5", "6"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_slot_brings_resync_and_status_says_why() {
    let cluster = Cluster::start().await;
    cluster.execute("SELECT sync.create_wal_slot()").await;
    cluster
        .execute(
            "CREATE TABLE ev (id int PRIMARY KEY, body text);
             SELECT sync.track('ev', capture => 'wal');",
        )
        .await;
    let gateway = Gateway::start(&cluster, &["--wal-ingest-interval-ms", "50"]).await;
    let mut session = gateway.connect("alice").await;
    session
        .subscribe(json!({"entityCode": "ev", "mode": "delta"}))
        .await;
    cluster.wait_for_slot().await;
    let admin = cluster.connect().await;
    cluster.execute("INSERT INTO ev VALUES (1, 'kept')").await;
    assert_eq!(session.expect("DELTA").await["changes"][0]["entityId"], "1");

    // Someone drops the slot (retrying while the gateway's ingest holds it).
    while let Err(e) = admin
        .batch_execute("SELECT pg_drop_replication_slot('pg_sync')")
        .await
    {
        assert!(e.to_string().contains("is active"), "{e}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster
        .execute("INSERT INTO ev VALUES (2, 'lost with the slot')")
        .await;
    // (Row 2 arrives as a DELTA too when the new slot was made before it was written.)
    let resync = loop {
        let message = session.next().await.expect("connection open");
        match message["type"].as_str() {
            Some("RESYNC") => break message["payload"].clone(),
            Some("DELTA") => assert_eq!(message["payload"]["changes"][0]["entityId"], "2"),
            _ => panic!("unexpected {message}"),
        }
    };
    assert_eq!(resync["entityCode"], "ev");
    let (status, body) = gateway.admin_get("/v1/status").await.unwrap();
    assert_eq!(status, 200);
    let status: Value = serde_json::from_str(&body).unwrap();
    assert!(
        status["database"]["wal_slot"]["lost_at"].is_string(),
        "{status}"
    );

    // The refetch heals: a snapshot has both rows, and its cursor continues with new changes.
    let (cursor, rows) = gateway.snapshot("alice", "ev").await.unwrap();
    assert_eq!(rows.len(), 2);
    let mut resumed: Session = gateway.connect("alice").await;
    resumed
        .subscribe(json!({"entityCode": "ev", "mode": "delta", "since": cursor}))
        .await;
    cluster.execute("INSERT INTO ev VALUES (3, 'after')").await;
    let next = loop {
        let message = resumed.next().await.unwrap();
        if let Some(change) = changes(&message).first() {
            break change.clone();
        }
    };
    assert_eq!(next["entityId"], "3");
}

/// Nothing one client does can stall another (SPEC 2.4): one user runs every abuse at once —
/// long-polls by the dozen, cursors from the future, snapshots it never reads, a socket that
/// never reads, filters as costly as it may make them — while a well-behaved client on the
/// same gateway receives every change, in order, and the gateway's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_users_abuse_does_not_stall_another_user() {
    let cluster = Cluster::start().await;
    cluster
        .execute(
            "CREATE TABLE ev (id int PRIMARY KEY, body text);
             CREATE TABLE big (id int PRIMARY KEY, pad text);
             INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g;
             SELECT sync.track('ev'); SELECT sync.track('big');",
        )
        .await;
    let gateway = Gateway::start(
        &cluster,
        &[
            "--snapshot-idle-timeout",
            "2s",
            "--send-queue-bytes",
            "1048576",
            "--send-timeout",
            "2s",
        ],
    )
    .await;
    let start_rss = gateway.rss_kib();
    let now = cluster.current_cursor().await;
    let mallory = format!("Bearer {}", token("mallory", &[]));

    // The well-behaved client, live before the abuse starts.
    let mut alice = gateway.connect("alice").await;
    alice
        .subscribe(json!({"entityCode": "ev", "mode": "delta"}))
        .await;

    // Long-polls by the dozen: a few wait (holding no connection), the rest are refused.
    let mut polls = Vec::new();
    for _ in 0..40 {
        let url = gateway.port;
        let (auth, since) = (mallory.clone(), now.clone());
        polls.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", url)).await.unwrap();
            let request = format!(
                "GET /v1/changes?since={since}&entityCode=big&wait=60 HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n"
            );
            tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes()).await.unwrap();
            stream // held open
        }));
    }
    // Snapshots never read: capped, and their transactions end at the idle timeout.
    let mut snapshots = Vec::new();
    for _ in 0..10 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", gateway.port))
            .await
            .unwrap();
        let request =
            format!("GET /v1/snapshot/big HTTP/1.1\r\nHost: x\r\nAuthorization: {mallory}\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
            .await
            .unwrap();
        snapshots.push(stream);
    }
    // Cursors from the future: refused at once, not waited on (or, with this user's
    // queries all taken by the above, refused as busy).
    let mut ahead = gateway.connect("mallory").await;
    for i in 0..20 {
        let since = future_cursor(&now, 100_000);
        ahead
            .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "ev", "since": since, "ref": i.to_string()}}))
            .await;
    }
    for _ in 0..20 {
        let error = ahead.expect("ERROR").await;
        assert!(
            ["bad_request", "internal"].contains(&error["code"].as_str().unwrap()),
            "{error}"
        );
    }
    // A socket that never reads, subscribed to everything. While mallory's snapshots hold all
    // of the user's queries (until their idle timeout), a SUBSCRIBE is refused as busy:
    // mallory asks again, as a client does.
    let mut deaf = gateway.connect("mallory").await;
    for entity in ["ev", "big"] {
        loop {
            deaf.send(
                json!({"type": "SUBSCRIBE", "payload": {"entityCode": entity, "mode": "delta"}}),
            )
            .await;
            let answer = deaf.next().await.expect("mallory's connection open");
            match answer["type"].as_str() {
                Some("SUBSCRIBED") => break,
                Some("ERROR") if answer["payload"]["code"] == "internal" => {
                    tokio::time::sleep(Duration::from_millis(200)).await // a client's back-off
                }
                _ => panic!("expected SUBSCRIBED, got {answer}"),
            }
        }
    }
    // Filters as costly as one user may make them, and then some.
    let values: Vec<i64> = (0..300).collect();
    let filter: Vec<Value> = (0..32)
        .map(|_| json!({"column": "id", "op": "in", "value": values}))
        .collect();
    let mut refused = 0;
    let mut bombs = Vec::new();
    for _ in 0..4 {
        let mut bomb = gateway.connect("mallory").await;
        for _ in 0..4 {
            bomb.send(
                json!({"type": "SUBSCRIBE", "payload": {"entityCode": "ev", "filter": filter}}),
            )
            .await;
            let answer = bomb.next().await.unwrap();
            if answer["payload"]["code"] == "too_many_subscriptions" {
                refused += 1;
            }
        }
        bombs.push(bomb);
    }
    assert!(refused > 0, "a user's filters are capped");

    // Meanwhile: changes flow, to ev (alice's) and to big (the deaf socket's).
    let writer = cluster.connect().await;
    for id in 1..=500 {
        writer
            .execute("INSERT INTO ev VALUES ($1, 'e')", &[&id])
            .await
            .unwrap();
        if id % 50 == 0 {
            writer
                .batch_execute(&format!(
                    "UPDATE big SET pad = repeat('y', 100) WHERE id <= {}",
                    id * 20
                ))
                .await
                .unwrap();
        }
    }
    let mut received = Vec::new();
    while received.len() < 500 {
        let message = alice.next().await.expect("alice's connection stays open");
        received.extend(
            changes(&message)
                .iter()
                .map(|c| c["entityId"].as_str().unwrap().parse::<i32>().unwrap()),
        );
    }
    assert_eq!(
        received,
        (1..=500).collect::<Vec<_>>(),
        "every change, once, in order"
    );

    // The snapshots nobody reads hold no transaction open for long.
    let none_open = "SELECT NOT EXISTS (SELECT FROM pg_stat_activity
                      WHERE usename IN ('sync_gateway', 'sync_authenticator')
                        AND xact_start < now() - interval '4 seconds')";
    cluster
        .wait_until(none_open, &[], "a snapshot kept its transaction open")
        .await;
    let grown = gateway.rss_kib().saturating_sub(start_rss);
    eprintln!("the gateway grew {grown} KiB under abuse");
    assert!(grown < 96 * 1024, "memory grew by {grown} KiB");
    drop((polls, snapshots, deaf, bombs));
}

/// A cluster with `table` (id, body text) tracked, and `rows` rows of `width` characters
/// written after the cursor returned: a log for replays and pages to read.
async fn with_a_log(table: &str, rows: usize, width: usize) -> (Cluster, String) {
    let cluster = Cluster::start().await;
    cluster
        .execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, body text); SELECT sync.track('{table}');"
        ))
        .await;
    let before = cluster.current_cursor().await;
    cluster
        .execute(&format!(
            "INSERT INTO {table} SELECT g, repeat('o', {width}) FROM generate_series(1, {rows}) g"
        ))
        .await;
    (cluster, before)
}

/// Waits until `/metrics` says `name` is `value`.
async fn metric_is(gateway: &Gateway, name: &str, value: i64) {
    tokio::time::timeout(PATIENCE, async {
        while gateway.metric(name).await != value {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name} never became {value}"));
}

/// Replays over `--max-replays` wait their turn, boundedly. mallory's replay of a long log,
/// which she does not read, holds the only place. bob's replay waits, then is refused with
/// ERROR `internal` once `--replay-wait` has passed; carol's ends while it waits and gives
/// its place in the queue back (one waiting at most); dave's waits in it, and runs once
/// mallory goes, all 64 MB of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_over_the_cap_wait_their_turn_and_no_longer() {
    let (cluster, old) = with_a_log("ev", 16_000, 4000).await;
    let recent = cluster.current_cursor().await;
    let args = [
        "--max-replays",
        "1",
        "--max-replays-waiting",
        "1",
        "--replay-wait",
        "4s",
        "--send-timeout",
        "60s",
    ];
    let gateway = Gateway::start(&cluster, &args).await;
    let replay = |since: &str| json!({"type": "SUBSCRIBE", "payload": {"entityCode": "ev", "mode": "delta", "since": since}});

    // mallory subscribes from the start and reads nothing: once the socket's buffers and her
    // queue (4 MiB) are full, her replay waits for room in her queue, holding the place. 64 MB
    // of replay is more than they hold (here a receiving socket may grow to 32 MiB: with 30
    // MB, her whole replay went into the buffers now and then, and her place was free).
    let mut mallory = gateway.connect("mallory").await;
    mallory.send(replay(&old)).await;
    // Her replay runs (it holds the place) before anyone else asks.
    loop {
        let message = mallory.next_or_close().await;
        match message {
            Ok(m) if m["type"] == "DELTA" => break,
            Ok(_) => {}
            Err(code) => panic!("mallory's connection closed: {code:?}"),
        }
    }
    let mut bob = gateway.connect("bob").await;
    bob.send(replay(&recent)).await;
    metric_is(&gateway, "sync_replays_waiting", 1).await;
    let refused = replay_end(&mut bob)
        .await
        .expect_err("bob's replay waits, then is refused");
    assert_eq!(refused["code"], "internal", "{refused}");
    assert_eq!(refused["entityCode"], "ev", "{refused}");
    metric_is(&gateway, "sync_replays_waiting", 0).await;

    // carol's replay waits, and she unsubscribes: not refused (her AWAIT is answered first),
    // and her place in the queue (one, --max-replays-waiting) is free for dave's.
    let mut carol = gateway.connect("carol").await;
    carol.send(replay(&recent)).await;
    metric_is(&gateway, "sync_replays_waiting", 1).await;
    carol
        .send(json!({"type": "UNSUBSCRIBE", "payload": {"entityCode": "ev"}}))
        .await;
    carol
        .send(json!({"type": "AWAIT", "payload": {"cursor": recent, "ref": "after"}}))
        .await;
    loop {
        let message = carol.next().await.expect("carol's connection open");
        assert_ne!(
            message["type"], "ERROR",
            "carol's wait ended in a refusal: {message}"
        );
        if message["type"] == "REACHED" {
            break;
        }
    }
    // dave replays the whole log, reading as he goes: never cut off as too slow (parts of
    // the replay handed on before the router had queued the earlier ones overfilled a
    // reading client's queue with rows of 4 KB).
    let mut dave = gateway.connect("dave").await;
    dave.send(replay(&old)).await;
    metric_is(&gateway, "sync_replays_waiting", 1).await;
    mallory.drop_connection();
    replay_end(&mut dave)
        .await
        .expect("dave's replay runs once mallory is gone");
}

/// How a replay ends: Ok at its SYNCED, Err with the payload of an ERROR.
async fn replay_end(session: &mut Session) -> Result<(), Value> {
    loop {
        let message = tokio::time::timeout(PATIENCE, session.next())
            .await
            .expect("an answer in time")
            .expect("the connection stays open");
        match message["type"].as_str() {
            Some("SYNCED") => return Ok(()),
            Some("ERROR") => return Err(message["payload"].clone()),
            _ => {}
        }
    }
}

/// Subscribing and unsubscribing in a loop (with ids, and with replays from the start of the
/// log) costs only the churner: another user's changes arrive, all of them, the gateway's
/// heartbeat stays fresh (another gateway would otherwise take it for dead and remove its
/// subscriptions), and its memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churning_subscriptions_and_replays_costs_only_the_churner() {
    const CYCLES: usize = 1000;
    // A log for the replays to read.
    let (cluster, old) = with_a_log("ev", 20_000, 200).await;
    let gateway = Gateway::start(&cluster, &["--heartbeat-secs", "1"]).await;
    // Another gateway, which removes the subscriptions of a gateway silent for 6 s.
    let _reaper = Gateway::start(&cluster, &["--heartbeat-secs", "1"]).await;
    let start_rss = gateway.rss_kib();
    let mut bob = gateway.connect("bob").await;
    bob.subscribe(json!({"entityCode": "ev", "mode": "delta"}))
        .await;

    let ids: Vec<String> = (0..500).map(|i| i.to_string()).collect();
    let frames: Vec<String> = [
        json!({"type": "SUBSCRIBE", "payload": {"entityCode": "ev", "entityIds": ids}}),
        json!({"type": "SUBSCRIBE", "payload": {"entityCode": "ev", "since": old, "mode": "delta"}}),
        json!({"type": "UNSUBSCRIBE", "payload": {"entityCode": "ev"}}),
    ]
    .map(|f| f.to_string())
    .into();
    let mut churners = Vec::new();
    for _ in 0..4 {
        let mut sink = gateway.connect("mallory").await.discarding();
        let frames = frames.clone();
        churners.push(tokio::spawn(async move {
            for _ in 0..CYCLES {
                for frame in &frames {
                    use futures_util::SinkExt;
                    let message = tokio_tungstenite::tungstenite::Message::text(frame.as_str());
                    if sink.send(message).await.is_err() {
                        return;
                    }
                }
            }
        }));
    }

    let writer = cluster.connect().await;
    for id in 100_001..=100_200 {
        writer
            .execute("INSERT INTO ev VALUES ($1, 'new')", &[&id])
            .await
            .unwrap();
    }
    let mut received = Vec::new();
    while received.len() < 200 {
        let message = bob.next().await.expect("bob's connection stays open");
        received.extend(
            changes(&message)
                .iter()
                .map(|c| c["entityId"].as_str().unwrap().parse::<i32>().unwrap()),
        );
    }
    assert_eq!(received, (100_001..=100_200).collect::<Vec<_>>());
    for churner in churners {
        churner.await.unwrap();
    }
    // Past the reaper's 6 s while the churn's writes drain, bob's subscription is still
    // mirrored: the heartbeat kept beating.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let bobs = "SELECT count(*) FROM sync.subscription WHERE user_id = 'bob'";
    let client = cluster.connect().await;
    while tokio::time::Instant::now() < deadline {
        let held: i64 = client.query_one(bobs, &[]).await.unwrap().get(0);
        assert_eq!(
            held, 1,
            "bob's subscription was removed: the heartbeat went stale"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let grown = gateway.rss_kib().saturating_sub(start_rss);
    eprintln!("the gateway grew {grown} KiB under subscription churn");
    assert!(grown < 96 * 1024, "memory grew by {grown} KiB");
}

/// An answer of `/v1/changes` that its client does not take keeps its place under the
/// long-poll caps until it is taken: unread answers (up to 10,000 changes each) cannot pile
/// up in the gateway's memory past the caps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unread_changes_answer_holds_its_place_until_taken() {
    // About 32 MB of JSON: more than the loopback sockets hold.
    let (cluster, since) = with_a_log("big", 2000, 16_000).await;
    let gateway = Gateway::start(&cluster, &["--max-long-polls-per-user", "1"]).await;
    let auth = format!("Bearer {}", token("mallory", &[]));
    let mut unread = tokio::net::TcpStream::connect(("127.0.0.1", gateway.port))
        .await
        .unwrap();
    let request = format!(
        "GET /v1/changes?since={since}&limit=2000 HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut unread, request.as_bytes())
        .await
        .unwrap();
    // Its answer has begun (the handler is done with it); the rest is left unread.
    let mut begun = [0u8; 1024];
    tokio::io::AsyncReadExt::read_exact(&mut unread, &mut begun)
        .await
        .unwrap();
    assert!(begun.starts_with(b"HTTP/1.1 200"));
    // A small request of the same user is refused while the big answer is not taken.
    let now = cluster.current_cursor().await;
    let small = format!("/v1/changes?since={now}&limit=1");
    let headers = [("Authorization", auth.as_str())];
    let refused = gateway
        .request("GET", &small, &headers, None)
        .await
        .unwrap();
    assert_eq!(refused.status, 503);
    // Taken, it gives the place back.
    let mut sink = Vec::new();
    let reading = tokio::spawn(async move {
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut unread, &mut sink).await;
    });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while gateway
        .request("GET", &small, &headers, None)
        .await
        .unwrap()
        .status
        != 200
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reading.abort();
}

/// What one client of a storm did: the ids it received, in order, and how often it was told
/// to come back later (its upgrade refused, its replay refused).
#[derive(Default)]
struct StormClient {
    received: Vec<i64>,
    cursor: Option<String>,
    refused: usize,
    retried: usize,
}

/// Follows `room` from where it stands, as a client should: through the gateway's RECONNECT
/// (after `afterMs`), a refused upgrade (after `Retry-After`), a refused replay (subscribing
/// again a moment later) and a closed socket (backing off), until it has ids 1 to `total`. Counts itself in `at_first` once
/// it has the first `first` of them.
async fn storm_client(
    url: String,
    sub: String,
    total: usize,
    first: usize,
    at_first: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> StormClient {
    use tungstenite::client::IntoClientRequest;
    let mut me = StormClient::default();
    let (mut pause, mut failed) = (Duration::ZERO, Duration::ZERO);
    while me.received.len() < total {
        tokio::time::sleep(pause).await;
        pause = Duration::from_millis(100);
        let mut request = url.as_str().into_client_request().unwrap();
        let bearer = format!("Bearer {}", token(&sub, &[]));
        request
            .headers_mut()
            .insert("Authorization", bearer.parse().unwrap());
        let mut socket = match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => socket,
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 503, "{sub}: upgrade refused");
                let retry = response.headers()["retry-after"].to_str().unwrap();
                pause = Duration::from_secs(retry.parse().unwrap());
                me.refused += 1;
                continue;
            }
            Err(_) => {
                // No gateway listens yet: back off, doubling up to 2 s.
                pause = (failed * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
                failed = pause;
                continue;
            }
        };
        failed = Duration::ZERO;
        let subscribe = |cursor: &Option<String>| {
            let mut payload = json!({"entityCode": "room", "mode": "delta"});
            if let Some(cursor) = cursor {
                payload["since"] = json!(cursor);
            }
            json!({"type": "SUBSCRIBE", "payload": payload}).to_string()
        };
        let text = subscribe(&me.cursor);
        if futures_util::SinkExt::send(&mut socket, text.as_str().into())
            .await
            .is_err()
        {
            continue;
        }
        while me.received.len() < total {
            let Some(Ok(tungstenite::Message::Text(text))) = socket.next().await else {
                break; // closed: come back
            };
            let message: Value = serde_json::from_str(&text).unwrap();
            let payload = &message["payload"];
            match message["type"].as_str().unwrap() {
                "SUBSCRIBED" if me.cursor.is_none() => {
                    me.cursor = Some(payload["cursor"].as_str().unwrap().to_owned());
                }
                "SUBSCRIBED" | "SYNCED" => {}
                "DELTA" => {
                    let had = me.received.len();
                    me.received.extend(
                        changes(&message)
                            .iter()
                            .map(|c| c["entityId"].as_str().unwrap().parse::<i64>().unwrap()),
                    );
                    me.cursor = Some(payload["cursor"].as_str().unwrap().to_owned());
                    if had < first && me.received.len() >= first {
                        at_first.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                "RECONNECT" => {
                    pause = Duration::from_millis(payload["afterMs"].as_u64().unwrap());
                    break;
                }
                // Too many replays at once: subscribe again from the cursor, a moment later.
                "ERROR" if payload["code"] == "internal" => {
                    me.retried += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let again = subscribe(&me.cursor);
                    if futures_util::SinkExt::send(&mut socket, again.as_str().into())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                _ => panic!("{sub}: unexpected {message}"),
            }
        }
    }
    me
}

/// Waits until `counted()` reaches `want`; fails at `deadline` saying how far it got.
async fn reaches(
    what: &str,
    want: usize,
    deadline: tokio::time::Instant,
    counted: impl AsyncFn() -> i64,
) {
    loop {
        let now = counted().await;
        if now >= want as i64 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {now} of {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A reconnect storm: every client of a gateway that restarts comes back, over the window
/// the gateway spreads them on and under its admission rate, and resumes from its cursor;
/// each ends with every change once and in order, and the replays of the same range share
/// their reads of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarts_reconnect_storm_loses_nothing_and_shares_its_reads() {
    let count = if soak() { 10_000 } else { 1_000 };
    let cluster = Cluster::start().await;
    cluster
        .execute("CREATE TABLE room (id int PRIMARY KEY); SELECT sync.track('room');")
        .await;
    // Admissions at a fifth of the clients a second: arriving within two seconds, some may
    // be told to come back (as many as this machine connects faster than that).
    let rate = (count / 5).to_string();
    let args = [
        "--reconnect-window",
        "2s",
        "--max-admissions-per-second",
        &rate,
    ];
    let gateway = Gateway::start(&cluster, &args).await;
    let at_first = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..count)
        .map(|i| {
            tokio::spawn(storm_client(
                gateway.ws_url(""),
                format!("storm-{i}"),
                30,
                10,
                at_first.clone(),
            ))
        })
        .collect();
    let started = tokio::time::Instant::now();
    let deadline = || started + PATIENCE * 6;
    let subscribed = async |gateway: &Gateway| gateway.metric("sync_subscriptions").await;
    reaches("subscriptions", count, deadline(), async || {
        subscribed(&gateway).await
    })
    .await;
    cluster
        .execute("INSERT INTO room SELECT generate_series(1, 10)")
        .await;
    let have_first = async || at_first.load(std::sync::atomic::Ordering::SeqCst) as i64;
    reaches("clients with 1 to 10", count, deadline(), have_first).await;

    // Changes made while no gateway runs come with the replays.
    let gateway = gateway
        .restart(cluster.execute("INSERT INTO room SELECT generate_series(11, 20)"))
        .await;
    let storm = tokio::time::Instant::now();
    // The most replays seen waiting for their turn at once.
    let queued = std::sync::atomic::AtomicI64::new(0);
    reaches("subscriptions again", count, deadline(), async || {
        let waiting = gateway.metric("sync_replays_waiting").await;
        queued.fetch_max(waiting, std::sync::atomic::Ordering::SeqCst);
        subscribed(&gateway).await
    })
    .await;
    let queued = queued.into_inner();
    let back_in = storm.elapsed();
    cluster
        .execute("INSERT INTO room SELECT generate_series(21, 30)")
        .await;
    let (mut refused, mut retried) = (0, 0);
    for client in clients {
        let client = tokio::time::timeout_at(deadline(), client)
            .await
            .expect("every client has every change in time")
            .unwrap();
        assert_eq!(client.received, (1..=30).collect::<Vec<i64>>());
        refused += client.refused;
        retried += client.retried;
    }
    let reads = gateway.metric("sync_replay_pages_read_total").await;
    eprintln!(
        "{count} clients came back in {back_in:?} with {reads} reads of the log; \
         {refused} upgrades and {retried} replays were told to come back later; \
         up to {queued} replays seen waiting their turn"
    );
    assert!(
        reads * 10 <= count as i64,
        "{reads} reads of the log for {count} replays of one range"
    );
}
