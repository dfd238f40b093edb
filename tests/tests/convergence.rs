//! The promise: a client's cache converges to the database whatever happens. A seeded random
//! workload on a trigger-captured and a WAL-captured table, and a table with row-level
//! security whose rows move between the three users' sight, runs while faults fire (a gateway
//! killed with -9 and its clients moving to another, PostgreSQL restarted in immediate mode,
//! a client's TCP connection cut without a close frame, a WAL ingest failing after storing
//! and another not moving the slot); clients build caches from a snapshot and `since`, by
//! DELTA and by INVALIDATE-then-refetch. At the end every cache equals the table as its user
//! may see it, no client saw a change of a row twice or out of order, and no client was ever
//! sent a version of a row it may not see. The seed is printed; `PG_SYNC_SEED`
//! repeats a run. `PG_SYNC_SOAK=1` runs a much longer workload (`make soak`).

use futures_util::{SinkExt, StreamExt};
use pg_sync_tests::gateway::{token, Gateway, PATIENCE};
use pg_sync_tests::{Cluster, Rng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const ENTITIES: [&str; 3] = ["acct", "evt", "doc"];
/// Rows of `doc` at the start; each user owns a third, and may see only what it owns.
const DOCS: u64 = 300;
/// The users, one per client.
const USERS: u64 = 3;

/// The id of the row written last to `entity` that `user` must see, to know it caught up.
fn marker(entity: &str, user: u64) -> String {
    match entity {
        "doc" => (2_000_000_000 + user).to_string(),
        _ => "2000000000".to_owned(),
    }
}

/// What one client believes, and what it checks as it goes.
#[derive(Default)]
struct Cache {
    rows: HashMap<String, BTreeMap<String, Value>>,
    /// Per entity: the cursor of the last message applied.
    cursors: HashMap<String, String>,
    /// Per entity and id: the last version applied, to catch a change seen twice or late.
    versions: HashMap<(String, String), i64>,
    /// Ids an INVALIDATE named, to refetch.
    dirty: BTreeSet<(String, String)>,
    violations: Vec<String>,
    /// Per entity and id: what was applied, to explain a failure.
    history: HashMap<(String, String), Vec<String>>,
    /// Connections, control messages and message sizes, to explain a failure.
    events: Vec<String>,
    /// Entities whose replay reached the live stream at least once.
    synced: BTreeSet<String>,
}

impl Cache {
    /// Replaces what is known of `entity` by a snapshot.
    fn load(&mut self, entity: &str, cursor: String, rows: Vec<Value>) {
        self.events
            .push(format!("snapshot {entity} {} rows {cursor}", rows.len()));
        self.rows.remove(entity);
        self.versions.retain(|(e, _), _| e != entity);
        self.dirty.retain(|(e, _)| e != entity);
        for row in rows {
            let id = row["id"].to_string();
            self.apply_row(entity, &id, Some(row), false);
        }
        self.cursors.insert(entity.to_owned(), cursor);
    }

    fn apply_row(&mut self, entity: &str, id: &str, row: Option<Value>, checked: bool) {
        let key = (entity.to_owned(), id.to_owned());
        let how = if checked { "change" } else { "snapshot" };
        let what = row.as_ref().map_or("deleted".to_owned(), |r| {
            format!("version {}", r["version"])
        });
        self.history
            .entry(key.clone())
            .or_default()
            .push(format!("{how}: {what}"));
        match row {
            Some(row) => {
                let version = row["version"].as_i64().unwrap_or(0);
                if checked {
                    if let Some(last) = self.versions.get(&key) {
                        if version <= *last {
                            self.violations
                                .push(format!("{entity}/{id}: version {version} after {last}"));
                        }
                    }
                }
                self.versions.insert(key, version);
                self.rows
                    .entry(entity.to_owned())
                    .or_default()
                    .insert(id.to_owned(), row);
            }
            None => {
                self.versions.remove(&key);
                if let Some(rows) = self.rows.get_mut(entity) {
                    rows.remove(id);
                }
            }
        }
    }
}

/// A snapshot of `entity` (optionally some ids): the cursor and the rows; None on failure.
async fn snapshot(
    gateway: &Gateway,
    user: &str,
    entity: &str,
    ids: Option<&[String]>,
) -> Option<(String, Vec<Value>)> {
    let path = match ids {
        Some(ids) => format!("{entity}?ids={}", ids.join(",")),
        None => entity.to_owned(),
    };
    gateway.snapshot(user, &path).await.ok()
}

/// One client: hydrates, subscribes, applies, and moves to another gateway when its
/// connection dies, resuming from its cursors. Runs until `done`, then drains what is left.
async fn client(
    user: String,
    delta: bool,
    gateways: Arc<Mutex<Vec<Arc<Gateway>>>>,
    cache: Arc<Mutex<Cache>>,
    done: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
) {
    let pick = |attempt: usize| {
        let g = gateways.lock().unwrap();
        g[attempt % g.len()].clone()
    };
    let mut attempt = 0;
    let mut hydrated = false;
    'connection: loop {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let gateway = pick(attempt);
        attempt += 1;
        if !hydrated {
            for entity in ENTITIES {
                let Some((cursor, rows)) = snapshot(&gateway, &user, entity, None).await else {
                    continue 'connection;
                };
                cache.lock().unwrap().load(entity, cursor, rows);
            }
            hydrated = true;
        }
        let url = gateway.ws_url(&format!("?token={}", token(&user, &[])));
        let Ok((mut socket, _)) = tokio_tungstenite::connect_async(url).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mode = if delta { "delta" } else { "invalidate" };
        {
            let mut c = cache.lock().unwrap();
            let event = format!("connect {} {:?}", gateway.port, c.cursors);
            c.events.push(event);
        }
        for entity in ENTITIES {
            let since = cache.lock().unwrap().cursors[entity].clone();
            let message = json!({"type": "SUBSCRIBE", "payload": {"entityCode": entity, "mode": mode, "since": since}});
            if socket
                .send(Message::text(message.to_string()))
                .await
                .is_err()
            {
                continue 'connection;
            }
        }
        loop {
            if cut.swap(false, Ordering::SeqCst) {
                drop(socket); // the TCP connection ends without a close frame
                continue 'connection;
            }
            let frame = match tokio::time::timeout(Duration::from_millis(500), socket.next()).await
            {
                Err(_) if done.load(Ordering::SeqCst) => return,
                Err(_) => continue,
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(_))) => continue,
                Ok(_) => continue 'connection,
            };
            let message: Value = serde_json::from_str(&frame).unwrap();
            let entity = message["payload"]["entityCode"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            {
                let n = message["payload"]["changes"].as_array().map_or(0, Vec::len);
                let event = format!(
                    "{} {entity} {n} {}",
                    message["type"], message["payload"]["cursor"]
                );
                cache.lock().unwrap().events.push(event);
            }
            match message["type"].as_str().unwrap() {
                "DELTA" | "INVALIDATE" => {
                    let mut c = cache.lock().unwrap();
                    for change in message["payload"]["changes"].as_array().unwrap() {
                        let id = change["entityId"].as_str().unwrap().to_owned();
                        if message["type"] == "INVALIDATE" {
                            c.dirty.insert((entity.clone(), id));
                            continue;
                        }
                        let row = (change["action"] != "DELETE").then(|| change["data"].clone());
                        if let Some(owner) = row.as_ref().and_then(|r| r.get("owner")) {
                            if owner.as_str() != Some(user.as_str()) {
                                c.violations
                                    .push(format!("{entity}/{id}: sent {user} a row of {owner}"));
                            }
                        }
                        if change["action"] == "DELETE"
                            && !c.rows.get(&entity).is_some_and(|r| r.contains_key(&id))
                        {
                            c.violations.push(format!(
                                "{entity}/{id}: sent {user} a DELETE of a row it did not have"
                            ));
                        }
                        c.apply_row(&entity, &id, row, true);
                    }
                    c.cursors.insert(
                        entity,
                        message["payload"]["cursor"].as_str().unwrap().to_owned(),
                    );
                }
                "RESYNC" => {
                    // Refetch the entity and continue from the snapshot.
                    let Some((cursor, rows)) = snapshot(&gateway, &user, &entity, None).await
                    else {
                        continue 'connection;
                    };
                    cache.lock().unwrap().load(&entity, cursor.clone(), rows);
                    let message = json!({"type": "SUBSCRIBE", "payload": {"entityCode": entity, "mode": mode, "since": cursor}});
                    if socket
                        .send(Message::text(message.to_string()))
                        .await
                        .is_err()
                    {
                        continue 'connection;
                    }
                }
                "SYNCED" => {
                    cache.lock().unwrap().synced.insert(entity);
                }
                "ERROR" => continue 'connection, // e.g. a replay cut by a restart: start over
                _ => {}
            }
        }
    }
}

/// A connection of the workload. A row lock held by the open long transaction would block
/// a statement on that row until the workload itself commits it: such a statement gives up.
async fn workload(cluster: &Cluster) -> tokio_postgres::Client {
    let client = cluster.connect().await;
    client
        .batch_execute("SET lock_timeout = '100ms'")
        .await
        .unwrap();
    client
}

/// The tables as `user`'s client should see them: `doc` as row-level security shows it to
/// that user, read by PostgreSQL itself.
async fn tables(cluster: &Cluster, user: &str) -> HashMap<String, BTreeMap<String, Value>> {
    let client = cluster.connect().await;
    client
        .batch_execute(&format!(
            "SET ROLE app_user; SELECT set_config('request.jwt.claims', '{{\"sub\": \"{user}\"}}', false)"
        ))
        .await
        .unwrap();
    let mut all = HashMap::new();
    for entity in ENTITIES {
        let rows = client
            .query(
                &format!("SELECT id::text, to_jsonb(t) FROM {entity} t"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Value>(1)))
            .collect();
        all.insert(entity.to_owned(), rows);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caches_converge_under_faults() {
    let seed = pg_sync_tests::seed();
    let soak = std::env::var("PG_SYNC_SOAK").is_ok();
    let steps = if soak { 3000 } else { 300 };
    let bulk_rows = 20_000;

    let cluster = Cluster::start().await;
    cluster.execute("SELECT sync.create_wal_slot()").await;
    cluster
        .execute(&format!(
            "CREATE TABLE acct (id int PRIMARY KEY, version int NOT NULL DEFAULT 1, body text);
             CREATE TABLE evt (id int PRIMARY KEY, version int NOT NULL DEFAULT 1, body text);
             INSERT INTO acct SELECT g, 1, 'a' FROM generate_series(1, {bulk_rows}) g;
             INSERT INTO evt SELECT g, 1, 'e' FROM generate_series(1, 200) g;
             CREATE TABLE doc (id int PRIMARY KEY, version int NOT NULL DEFAULT 1, body text, owner text NOT NULL);
             INSERT INTO doc SELECT g, 1, 'd', 'user' || (g % {USERS}) FROM generate_series(1, {DOCS}) g;
             ALTER TABLE doc ENABLE ROW LEVEL SECURITY;
             CREATE POLICY own ON doc USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
             SELECT sync.track('acct');
             SELECT sync.track('evt', capture => 'wal');
             SELECT sync.track('doc');"
        ))
        .await;
    let flags = [
        "--heartbeat-secs",
        "1",
        "--wal-ingest-interval-ms",
        "50",
        "--send-queue-bytes",
        "67108864",
    ];
    let first = Arc::new(Gateway::start(&cluster, &flags).await);
    let second = Arc::new(Gateway::start(&cluster, &flags).await);
    let gateways = Arc::new(Mutex::new(vec![first.clone(), second.clone()]));
    let done = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..USERS {
        let cache = Arc::new(Mutex::new(Cache::default()));
        let cut = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(client(
            format!("user{i}"),
            i != 2,
            gateways.clone(),
            cache.clone(),
            done.clone(),
            cut.clone(),
        ));
        clients.push((cache, cut, task));
    }

    // The workload starts once every client is live on every entity, so that they live
    // through it (and its faults) rather than take it all in from their first snapshot.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !clients
        .iter()
        .all(|(cache, _, _)| cache.lock().unwrap().synced.len() == ENTITIES.len())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients never went live"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut rng = Rng(seed);
    let mut db = workload(&cluster).await;
    let mut next_id = 1_000_000;
    let mut long_tx: Option<tokio_postgres::Client> = None;
    let mut first_gateway = Some(first);
    for step in 0..steps {
        // Faults at fixed points of the workload.
        if step == steps / 5 {
            if let Some(doomed) = first_gateway.take() {
                gateways
                    .lock()
                    .unwrap()
                    .retain(|g| !Arc::ptr_eq(g, &doomed));
                doomed.kill_shared();
            }
        }
        if step == steps / 3 {
            clients[0].1.store(true, Ordering::SeqCst);
        }
        if step == steps / 2 {
            long_tx = None;
            cluster.restart_immediate();
            db = workload(&cluster).await;
        }
        if step == 2 * steps / 3 {
            let ingest = cluster.connect().await;
            let _ = ingest
                .batch_execute(
                    "SET sync.test_ingest_fault = 'fail_after_store'; SELECT sync.ingest_wal()",
                )
                .await;
            let _ = ingest
                .batch_execute(
                    "SET sync.test_ingest_fault = 'skip_advance'; SELECT sync.ingest_wal()",
                )
                .await;
        }
        let table = ENTITIES[rng.below(3) as usize];
        let max = match table {
            "acct" => bulk_rows,
            "doc" => DOCS,
            _ => 200,
        };
        let id = rng.below(max) as i32 + 1;
        let owner = format!("user{}", rng.below(USERS));
        let sql = match rng.below(10) {
            0 if table == "doc" => {
                next_id += 1;
                format!("INSERT INTO doc (id, body, owner) VALUES ({next_id}, 'new', '{owner}')")
            }
            0 => {
                next_id += 1;
                format!("INSERT INTO {table} (id, body) VALUES ({next_id}, 'new')")
            }
            // A row leaves one user's sight and enters another's.
            4 | 5 if table == "doc" => {
                format!("UPDATE doc SET version = version + 1, owner = '{owner}' WHERE id = {id}")
            }
            1 => format!("DELETE FROM {table} WHERE id = {id}"),
            2 => format!(
                "BEGIN; UPDATE {table} SET version = version + 1 WHERE id = {id};
                 UPDATE {table} SET version = version + 1, body = 'multi' WHERE id = {};
                 INSERT INTO {table} (id{}) VALUES ({}{}) ON CONFLICT (id) DO UPDATE SET version = {table}.version + 1; COMMIT;",
                (id % max as i32) + 1,
                if table == "doc" { ", owner" } else { "" },
                id + 2,
                if table == "doc" { format!(", '{owner}'") } else { String::new() },
            ),
            3 if long_tx.is_none() => {
                let long = workload(&cluster).await;
                let _ = long.batch_execute(&format!("BEGIN; UPDATE {table} SET version = version + 1, body = 'long' WHERE id = {id}")).await;
                long_tx = Some(long);
                continue;
            }
            _ => format!("UPDATE {table} SET version = version + 1 WHERE id = {id}"),
        };
        // Errors (a row deleted meanwhile, the restart) are part of the workload.
        if db.batch_execute(&sql).await.is_err() {
            // A multi-statement transaction stops at its error: end it, or every later
            // statement fails in the aborted transaction.
            let _ = db.batch_execute("ROLLBACK").await;
        }
        if step % 97 == 96 {
            if let Some(long) = long_tx.take() {
                let _ = long.batch_execute("COMMIT").await;
            }
        }
        if step == steps / 4 {
            if let Some(long) = long_tx.take() {
                let _ = long.batch_execute("COMMIT").await; // it would hold a row of the bulk
            }
            db.batch_execute("UPDATE acct SET version = version + 1")
                .await
                .expect("the bulk UPDATE");
        }
    }
    if let Some(long) = long_tx.take() {
        let _ = long.batch_execute("COMMIT").await;
    }

    // Quiescence: the WAL drained, then every client past a final write to each table.
    let end = cluster.connect().await;
    end.batch_execute(
        "INSERT INTO acct (id, body) VALUES (2000000000, 'end');
         INSERT INTO evt (id, body) VALUES (2000000000, 'end');",
    )
    .await
    .unwrap();
    for user in 0..USERS {
        let id = marker("doc", user);
        end.batch_execute(&format!(
            "INSERT INTO doc (id, body, owner) VALUES ({id}, 'end', 'user{user}')"
        ))
        .await
        .unwrap();
    }
    let deadline = tokio::time::Instant::now() + PATIENCE * 8;
    for (user, (cache, _, _)) in clients.iter().enumerate() {
        loop {
            let seen = {
                let c = cache.lock().unwrap();
                ENTITIES.iter().all(|e| {
                    let id = marker(e, user as u64);
                    c.rows.get(*e).is_some_and(|r| r.contains_key(&id))
                        || c.dirty.contains(&(e.to_string(), id))
                })
            };
            if seen {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a client never caught up; seed {seed}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    done.store(true, Ordering::SeqCst);
    let survivor = gateways.lock().unwrap()[0].clone();
    for (i, (cache, _, task)) in clients.into_iter().enumerate() {
        task.await.unwrap();
        let truth = tables(&cluster, &format!("user{i}")).await;
        let mut c = Arc::try_unwrap(cache).ok().unwrap().into_inner().unwrap();
        // INVALIDATE clients refetch what they were told changed.
        let dirty: Vec<(String, String)> = std::mem::take(&mut c.dirty).into_iter().collect();
        for entity in ENTITIES {
            let ids: Vec<String> = dirty
                .iter()
                .filter(|(e, _)| e == entity)
                .map(|(_, id)| id.clone())
                .collect();
            for chunk in ids.chunks(500) {
                let (_, rows) = snapshot(&survivor, &format!("user{i}"), entity, Some(chunk))
                    .await
                    .unwrap();
                let present: HashMap<String, Value> =
                    rows.into_iter().map(|r| (r["id"].to_string(), r)).collect();
                for id in chunk {
                    let row = present.get(id).cloned();
                    c.apply_row(entity, id, row, false);
                }
            }
        }
        assert!(
            c.violations.is_empty(),
            "client {i}: {:?}; seed {seed}",
            &c.violations[..c.violations.len().min(5)]
        );
        for entity in ENTITIES {
            let mine = c.rows.remove(entity).unwrap_or_default();
            let theirs = &truth[entity];
            let missing: Vec<&String> = theirs
                .keys()
                .filter(|k| mine.get(*k) != theirs.get(*k))
                .take(5)
                .collect();
            let extra: Vec<&String> = mine
                .keys()
                .filter(|k| !theirs.contains_key(*k))
                .take(5)
                .collect();
            if !(missing.is_empty() && extra.is_empty()) {
                for e in &c.events {
                    eprintln!("client {i}: {e}");
                }
            }
            for id in missing.iter().chain(&extra) {
                eprintln!(
                    "client {i} {entity}/{id}: {:?}",
                    c.history.get(&(entity.to_string(), id.to_string()))
                );
                let log = cluster.connect().await.query(
                    "SELECT format('%s %s tx %s %s', id, op, txid, data->'version') FROM sync.change_history
                      WHERE entity_code = $1 AND entity_id = $2 ORDER BY id", &[&entity, id]).await.unwrap();
                for row in log {
                    eprintln!("  log: {}", row.get::<_, String>(0));
                }
            }
            assert!(
                missing.is_empty() && extra.is_empty(),
                "client {i} {entity}: wrong {missing:?}, extra {extra:?}; seed {seed}"
            );
        }
    }
}
