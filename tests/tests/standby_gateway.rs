//! Gateways that read from a PostgreSQL hot standby (`--read-url`, SPEC 2.7), against a real
//! primary and a real streaming standby: clients of the standby's gateway get each change
//! once while writers commit out of order and replay pauses; a client moving between the
//! primary's gateway and the standby's misses nothing and gets nothing twice; a cursor the
//! standby has not replayed is waited for, then the client is sent away (RECONNECT, 503),
//! never told "nothing new"; snapshots come from the standby (a WAL-captured entity's from
//! the primary); and the gateway reads on when the standby is promoted.

use pg_sync_tests::gateway::{token, Gateway, Session, PATIENCE};
use pg_sync_tests::{future_cursor, workload, Cluster, GATEWAY_ROLE};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A primary with the workload's schema, and a streaming standby of it.
async fn workload_standby() -> (Cluster, Cluster) {
    let primary = Cluster::start().await;
    primary.execute(workload::SCHEMA).await;
    let standby = primary.standby().await;
    (primary, standby)
}

/// A gateway on `primary` that reads from `standby`.
async fn standby_gateway(primary: &Cluster, standby: &Cluster, extra: &[&str]) -> Gateway {
    let read_url = standby.url_as(GATEWAY_ROLE, "postgres");
    let mut args = vec!["--read-url", &read_url, "--poll-interval-ms", "200"];
    args.extend(extra);
    Gateway::start(primary, &args).await
}

/// What one client of the `workload` tables received, and from where it goes on.
struct Follower {
    name: &'static str,
    session: Session,
    /// Per entity: the cursor of the last message.
    cursors: HashMap<String, String>,
    /// The ids of the item inserts, in the order received.
    items: Vec<i32>,
    /// Per counter: the versions received, in order.
    versions: BTreeMap<String, Vec<i64>>,
}

const ENTITIES: [&str; 2] = ["item", "counter"];

impl Follower {
    async fn start(name: &'static str, gateway: &Gateway, since: &str) -> Follower {
        let mut follower = Follower {
            name,
            session: gateway.connect("u").await,
            cursors: ENTITIES
                .iter()
                .map(|e| (e.to_string(), since.to_owned()))
                .collect(),
            items: Vec::new(),
            versions: BTreeMap::new(),
        };
        assert!(follower.subscribe().await, "{name} subscribes");
        follower
    }

    /// Subscribes to both entities from their cursors; false when the gateway sent the
    /// client away (RECONNECT) instead.
    async fn subscribe(&mut self) -> bool {
        for entity in ENTITIES {
            let since = &self.cursors[entity];
            let payload = json!({"entityCode": entity, "mode": "delta", "since": since});
            self.session
                .send(json!({"type": "SUBSCRIBE", "payload": payload}))
                .await;
            loop {
                let message = self.session.next_or_close().await;
                let Ok(message) = message else {
                    return false;
                };
                match message["type"].as_str() {
                    Some("SUBSCRIBED") if message["payload"]["entityCode"] == entity => break,
                    Some("RECONNECT") => {
                        assert_eq!(message["payload"]["reason"], "behind", "{message}");
                        return false;
                    }
                    Some("ERROR") => panic!("{}: {message}", self.name),
                    _ => self.apply(&message),
                }
            }
        }
        true
    }

    fn apply(&mut self, message: &Value) {
        match message["type"].as_str() {
            Some("DELTA") => {}
            Some("SYNCED" | "SUBSCRIBED" | "PONG") => return,
            _ => panic!("{}: unexpected {message}", self.name),
        }
        let payload = &message["payload"];
        let entity = payload["entityCode"].as_str().unwrap().to_owned();
        for change in payload["changes"].as_array().unwrap() {
            let id = change["entityId"].as_str().unwrap();
            match (entity.as_str(), change["action"].as_str().unwrap()) {
                ("item", "CREATE") => self.items.push(id.parse().unwrap()),
                ("counter", _) => self
                    .versions
                    .entry(id.to_owned())
                    .or_default()
                    .push(change["data"]["version"].as_i64().unwrap()),
                other => panic!("{}: unexpected change {other:?}", self.name),
            }
        }
        self.cursors
            .insert(entity, payload["cursor"].as_str().unwrap().to_owned());
    }

    /// Applies what arrives for `wait`.
    async fn read_for(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Some(message) = self
            .session
            .next_within(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            match message {
                Ok(message) => self.apply(&message),
                Err(code) => panic!("{}: closed ({code:?})", self.name),
            }
        }
    }

    /// Goes on at `gateway` from its cursors (at the other one when this one sends it away).
    async fn move_to(&mut self, gateway: &Gateway, other: &Gateway) {
        for to in [gateway, other].into_iter().cycle().take(20) {
            self.session = to.connect("u").await;
            if self.subscribe().await {
                return;
            }
        }
        panic!("{}: no gateway took the client", self.name);
    }

    /// Applies messages until both entities' `DONE` rows arrived. Each subscription is
    /// delivered in log order, so each entity's earlier changes have arrived too; the
    /// entities are not ordered against each other (one may still be replaying its gap while
    /// the other is live).
    async fn until_done(&mut self) {
        let done = DONE.to_string();
        while !(self.items.contains(&DONE) && self.versions.contains_key(&done)) {
            let message = self.session.next().await.expect("connection open");
            self.apply(&message);
        }
    }

    /// Each committed insert once, each counter's versions 1, 2, 3… in order up to its value.
    async fn check(&self, committed: &HashSet<i32>, primary: &Cluster, seed: u64) {
        let mut seen = HashSet::new();
        for id in &self.items {
            assert!(
                seen.insert(*id),
                "{}: item {id} twice, seed {seed}",
                self.name
            );
        }
        seen.remove(&DONE);
        let missing: Vec<_> = committed.difference(&seen).collect();
        let extra: Vec<_> = seen.difference(committed).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{}: items missing {missing:?}, never committed {extra:?}, seed {seed}",
            self.name
        );
        let rows = primary
            .connect()
            .await
            .query("SELECT id::text, version FROM counter", &[])
            .await
            .unwrap();
        for row in rows {
            let (id, version): (String, i32) = (row.get(0), row.get(1));
            let expected: Vec<i64> = (1..=i64::from(version)).collect();
            let got = self.versions.get(&id).cloned().unwrap_or_default();
            assert_eq!(got, expected, "{}: counter {id}, seed {seed}", self.name);
        }
    }
}

/// The id of the item and the counter inserted last, once the writers are done.
const DONE: i32 = 9_999_999;

/// Pauses the standby's replay for `pause` every `every`, until cancelled (then resumes it).
fn pausing_replay(standby: &Cluster, every: Duration, pause: Duration) -> CancellationToken {
    let stop = CancellationToken::new();
    let done = stop.clone();
    let url = standby.url("postgres");
    tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        while !done.is_cancelled() {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = done.cancelled() => break,
            }
            client
                .batch_execute("SELECT pg_wal_replay_pause()")
                .await
                .unwrap();
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = done.cancelled() => {}
            }
            client
                .batch_execute("SELECT pg_wal_replay_resume()")
                .await
                .unwrap();
        }
    });
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_the_standbys_gateway_get_each_change_once_and_may_move_between_gateways() {
    let seed = pg_sync_tests::seed();
    let (primary, standby) = workload_standby().await;
    let on_standby = standby_gateway(&primary, &standby, &["--behind-patience", "2s"]).await;
    let on_primary = Gateway::start(&primary, &[]).await;
    // A cursor from before the work, through the standby (as a client's first snapshot).
    let (since, _) = on_standby.snapshot("u", "item").await.unwrap();
    let mut staying = Follower::start("staying", &on_standby, &since).await;
    let mut moving = Follower::start("moving", &on_primary, &since).await;

    let pauses = pausing_replay(
        &standby,
        Duration::from_millis(700),
        Duration::from_millis(900),
    );
    let writers = workload::start(&primary, seed, 0, 8, 40).await;
    let mut round = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        round += 1;
        // Moves every other round, to the standby's gateway and back.
        if round % 2 == 0 {
            let (to, other) = match round % 4 {
                0 => (&on_standby, &on_primary),
                _ => (&on_primary, &on_standby),
            };
            moving.move_to(to, other).await;
        }
        staying.read_for(Duration::from_millis(100)).await;
        moving.read_for(Duration::from_millis(100)).await;
    }
    pauses.cancel();
    let committed = workload::committed(writers).await;
    primary
        .execute(&format!(
            "INSERT INTO item (id) VALUES ({DONE}); INSERT INTO counter VALUES ({DONE}, 1)"
        ))
        .await;
    moving.move_to(&on_standby, &on_primary).await;
    staying.until_done().await;
    moving.until_done().await;
    staying.check(&committed, &primary, seed).await;
    moving.check(&committed, &primary, seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cursor_the_standby_has_not_replayed_is_waited_for_then_the_client_is_sent_away() {
    let (primary, standby) = workload_standby().await;
    let gateway = standby_gateway(&primary, &standby, &["--behind-patience", "1s"]).await;
    let (before, _) = gateway.snapshot("u", "item").await.unwrap();

    standby.execute("SELECT pg_wal_replay_pause()").await;
    primary.execute("INSERT INTO item (id) VALUES (1)").await;
    let ahead = primary.current_cursor().await;
    // A socket: told to come back, with the reason, and closed.
    let mut session = gateway.connect("u").await;
    session
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "item", "since": ahead}}))
        .await;
    let reconnect = session.next().await.unwrap();
    assert_eq!(reconnect["type"], "RECONNECT", "{reconnect}");
    assert_eq!(reconnect["payload"]["reason"], "behind");
    assert!(reconnect["payload"]["afterMs"].as_u64().unwrap() > 0);
    assert!(matches!(session.next_or_close().await, Err(Some(1001))));
    // A long-poll: 503 with Retry-After, not an empty page.
    let auth = format!("Bearer {}", token("u", &[]));
    let polled = gateway
        .request(
            "GET",
            &format!("/v1/changes?since={ahead}"),
            &[("Authorization", &auth)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(polled.status, 503);
    assert_eq!(
        polled.header("retry-after"),
        Some("1"),
        "{:?}",
        polled.headers
    );
    let body: Value = serde_json::from_slice(&polled.body).unwrap();
    assert_eq!(body["error"], "behind");
    // A cursor no database has reached is refused at once, as without a standby.
    let forged = future_cursor(&ahead, 1_000_000);
    let (status, _) = gateway
        .call("GET", &format!("/v1/changes?since={forged}"), "u", None)
        .await;
    assert_eq!(status, 400);
    let mut session = gateway.connect("u").await;
    session
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "item", "since": forged}}))
        .await;
    let refused = session.expect("ERROR").await;
    assert_eq!(refused["code"], "bad_request", "{refused}");

    // Replayed: the same cursors are served, the change once.
    standby.execute("SELECT pg_wal_replay_resume()").await;
    // Once the standby has replayed it and the gateway's stream has passed `ahead` (with no
    // new write to wake it, the gateway may read the standby again only at its next poll,
    // past the 1 s of patience: CI saw RECONNECT behind here).
    standby.caught_up_with(&primary).await;
    gateway.passed(&ahead).await.unwrap();
    let mut session = gateway.connect("u").await;
    session
        .subscribe(json!({"entityCode": "item", "mode": "delta", "since": ahead}))
        .await;
    session
        .subscribe(json!({"entityCode": "counter", "mode": "delta", "since": before}))
        .await;
    let (status, page) = gateway
        .call("GET", &format!("/v1/changes?since={before}"), "u", None)
        .await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<&str> = page["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["entityId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["1"]);
    primary.execute("INSERT INTO item (id) VALUES (2)").await;
    loop {
        let message = session.next().await.unwrap();
        if message["type"] == "DELTA" {
            assert_eq!(
                message["payload"]["changes"][0]["entityId"], "2",
                "{message}"
            );
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_come_from_the_standby_and_a_wal_captured_entitys_from_the_primary() {
    let primary = Cluster::start().await;
    primary
        .execute(
            "CREATE TABLE note (id int PRIMARY KEY, body text);
             INSERT INTO note VALUES (1, 'one');
             SELECT sync.track('note');
             CREATE TABLE event (id int PRIMARY KEY, body text);
             INSERT INTO event VALUES (1, 'one');",
        )
        .await;
    // In a transaction of its own: it creates the replication slot.
    primary
        .execute("SELECT sync.track('event', capture => 'wal')")
        .await;
    let standby = primary.standby().await;
    let gateway = standby_gateway(&primary, &standby, &[]).await;
    let mut session = gateway.connect("u").await;
    for entity in ["note", "event"] {
        // Written to the primary alone while the standby does not replay: a snapshot read
        // there lacks it, one read on the primary has it.
        standby.execute("SELECT pg_wal_replay_pause()").await;
        primary
            .execute(&format!("INSERT INTO {entity} VALUES (2, 'two')"))
            .await;
        let (cursor, rows) = gateway.snapshot("u", entity).await.unwrap();
        let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
        let expected: &[i64] = if entity == "note" { &[1] } else { &[1, 2] };
        assert_eq!(ids, expected, "{entity}");
        standby.execute("SELECT pg_wal_replay_resume()").await;
        // From the snapshot's cursor, exactly what it lacked follows.
        session
            .subscribe(json!({"entityCode": entity, "mode": "delta", "since": cursor}))
            .await;
        primary
            .execute(&format!("INSERT INTO {entity} VALUES (3, 'three')"))
            .await;
        let mut got = Vec::new();
        while !got.contains(&"3".to_owned()) {
            let message = session.next().await.unwrap();
            if message["type"] == "DELTA" {
                for change in message["payload"]["changes"].as_array().unwrap() {
                    got.push(change["entityId"].as_str().unwrap().to_owned());
                }
            }
        }
        let expected: &[&str] = if entity == "note" {
            &["2", "3"]
        } else {
            &["3"]
        };
        assert_eq!(got, expected, "{entity}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standbys_gateway_reads_on_when_the_standby_is_promoted() {
    let (primary, standby) = workload_standby().await;
    let gateway = standby_gateway(&primary, &standby, &[]).await;
    let (before, _) = gateway.snapshot("u", "item").await.unwrap();
    let mut session = gateway.connect("u").await;
    session
        .subscribe(json!({"entityCode": "item", "mode": "delta", "since": before}))
        .await;
    primary.execute("INSERT INTO item (id) VALUES (1)").await;
    standby.caught_up_with(&primary).await;
    primary.stop_immediate();
    standby.execute("SELECT pg_promote()").await;
    standby.execute("INSERT INTO item (id) VALUES (2)").await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while got.len() < 2 && tokio::time::Instant::now() < deadline {
        let message = session.next().await.unwrap();
        if message["type"] == "DELTA" {
            got.push(message["payload"]["changes"][0]["entityId"].clone());
        }
    }
    assert_eq!(got, [json!("1"), json!("2")]);
    // The cursor from before the promotion is good after it.
    let (status, page) = gateway
        .call("GET", &format!("/v1/changes?since={before}"), "u", None)
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["changes"].as_array().unwrap().len(), 2, "{page}");
}

/// A SUBSCRIBE checked while its entity was tracked, whose cursor the standby had not
/// replayed, is waited for; the entity is untracked in what replays meanwhile. The client
/// is told to refetch (RESYNC `entity_changed`), never served the untracked entity as live.
/// Fails when the subscription passes on to the router after the replacement was handed on
/// (the soak's oracle saw a browser tab show an untracked entity live).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_whose_entity_is_untracked_while_its_cursor_is_awaited_refetches() {
    let (primary, standby) = workload_standby().await;
    let gateway = standby_gateway(&primary, &standby, &["--behind-patience", "60s"]).await;
    standby.execute("SELECT pg_wal_replay_pause()").await;
    primary.execute("INSERT INTO item (id) VALUES (1)").await;
    let ahead = primary.current_cursor().await;
    primary.execute("SELECT sync.untrack('item')").await;
    let mut session = gateway.connect("u").await;
    session
        .send(json!({"type": "SUBSCRIBE", "payload": {"entityCode": "item", "since": ahead}}))
        .await;
    // Checked and waiting: the gateway asked the primary whether it has the cursor (an idle
    // backend shows the last statement it ran).
    let asked = "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE usename = $1
                     AND query = 'SELECT sync.cursor_reached(sync.current_cursor(), $1)')";
    primary
        .wait_until(asked, &[&GATEWAY_ROLE], "the gateway never asked")
        .await;
    standby.execute("SELECT pg_wal_replay_resume()").await;
    let answer = session.next().await.unwrap();
    assert_eq!(answer["type"], "RESYNC", "{answer}");
    assert_eq!(answer["payload"]["reason"], "entity_changed");
    // Refetching finds it gone (400 `unknown_entity`).
    assert_eq!(gateway.snapshot("u", "item").await.unwrap_err(), 400);
}
