//! The whole-pipeline oracle: random work against a real PostgreSQL with row-level security
//! and several users, through a real gateway, and at each quiescent point, for every user and
//! every client of it, the check that what the client's copy holds equals what PostgreSQL
//! lets that user SELECT (as the role, with the user's claims) — or that the client knows it
//! may read nothing, or that the entity is not tracked.
//!
//! The work: inserts, updates (moving rows across users' sight and across a filter), key
//! changes, a delete and re-insert of one key in one transaction, transactions over two
//! entities, out-of-order commits, memberships of projects given and taken (a policy reads
//! them: tasks enter and leave sight without changing), TRUNCATE, GRANT and REVOKE, a policy
//! created and dropped, a role granted a policy's role and revoked from it, a role's INHERIT
//! switched (no event trigger sees those two), untrack, track again, and another table
//! tracked under the same code, the gateway killed and restarted, clients dropping their
//! socket and resuming from their cursors. The clients: per user, protocol clients in DELTA mode,
//! INVALIDATE mode (refetching what was invalidated) and with a filter, and a `/v1/changes`
//! reader; each hydrates from a snapshot, follows from its cursors, and refetches on RESYNC.
//! And per user the TypeScript client in Chromium (a browser context each: its own IndexedDB
//! and socket), checked at the same points: the work pauses until its copy equals what the
//! user may SELECT, or fails the run once it has stayed different for a while. A tab moves
//! with its user's clients at their reconnections: its client closed and made again,
//! resuming from its IndexedDB on the same gateway, hydrating anew on the other.
//!
//! It runs twice: with one gateway on the primary, and with a gateway that reads from a hot
//! standby beside one on the primary, each client moving between them at its reconnections.
//!
//! A failure prints the seed (`PG_SYNC_SEED` repeats it) and the steps, shrunk to fewer steps
//! that still fail. `PG_SYNC_ORACLE_STEPS` sets the length (make soak runs it long).

use pg_sync_tests::gateway::{token, Gateway, Session, PATIENCE};
use pg_sync_tests::{error_text, Cluster, Rng, GATEWAY_ROLE};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

const SCHEMA: &str = "
    CREATE TABLE project (id int PRIMARY KEY, org text NOT NULL, name text, version int NOT NULL DEFAULT 1);
    CREATE TABLE task (id int PRIMARY KEY, project_id int, org text, owner text,
                       status text NOT NULL DEFAULT 'open', version int NOT NULL DEFAULT 1);
    CREATE TABLE marker (id int PRIMARY KEY);
    -- Members of a project see its tasks: rows enter and leave sight without changing.
    CREATE TABLE member (project_id int, user_id text, PRIMARY KEY (project_id, user_id));
    -- Another table that takes the code `project` over now and then (untrack, track as).
    CREATE TABLE archive (id int PRIMARY KEY, org text NOT NULL, name text, version int NOT NULL DEFAULT 1);
    INSERT INTO archive VALUES (1, 'a', 'old one'), (2, 'b', 'old two'), (7, 'a', 'old seven');
    ALTER TABLE task ENABLE ROW LEVEL SECURITY;
    CREATE POLICY by_org ON task USING (org = current_setting('request.jwt.claims', true)::jsonb ->> 'org'
                                         OR owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
    CREATE ROLE auditors NOLOGIN;
    CREATE POLICY audit ON task TO auditors USING (status = 'done');
    SELECT sync.track('project'); SELECT sync.track('task'); SELECT sync.track('marker');";
const BY_MEMBERSHIP: &str = "
    CREATE POLICY by_membership ON task USING (EXISTS (
        SELECT 1 FROM member m WHERE m.project_id = task.project_id
           AND m.user_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'))";

/// The users: their `sub` and their `org` claim (dave's is an object, whose `->>` text
/// PostgreSQL prints as jsonb does; rows may hold that text).
const USERS: [(&str, &str); 4] = [
    ("alice", "\"a\""),
    ("bob", "\"b\""),
    ("carol", "\"a\""),
    ("dave", "{\"x\": 1}"),
];
const ENTITIES: [&str; 2] = ["project", "task"];
const TASKS: u64 = 16;
const PROJECTS: u64 = 4;

/// One step of the work.
#[derive(Clone)]
enum Step {
    /// Statements by the superuser, in one implicit transaction.
    Sql(String),
    /// A change of who may read what that no event trigger sees: the gateway notices it at
    /// its next poll, and the step waits for that.
    Unseen(String),
    /// `first` (a transaction left open), then `second` committed, then `first` committed.
    OutOfOrder(String, String),
    KillGateway,
    /// A client drops its socket and resumes from its cursors.
    Reconnect(usize),
    /// Wait until every client has caught up, then check every copy.
    Check,
}

/// SQL on one line.
fn line(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Sql(sql) => write!(f, "SQL {}", line(sql)),
            Step::Unseen(sql) => write!(f, "SQL (no event trigger) {}", line(sql)),
            Step::OutOfOrder(a, b) => write!(f, "OUT OF ORDER {} / {}", line(a), line(b)),
            Step::KillGateway => write!(f, "KILL the gateway"),
            Step::Reconnect(c) => write!(f, "RECONNECT client {c}"),
            Step::Check => write!(f, "CHECK"),
        }
    }
}

fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

/// A random write's SQL.
fn write(rng: &mut Rng) -> String {
    let id = 1 + rng.below(TASKS);
    let org = pick(rng, &["a", "b", "c", "{\"x\": 1}"]);
    let owner = pick(rng, &["alice", "bob", "carol", "dave"]);
    let status = pick(rng, &["open", "done", "blocked"]);
    let project = 1 + rng.below(PROJECTS);
    match rng.below(11) {
        0..=2 => format!(
            "INSERT INTO task VALUES ({id}, {project}, '{org}', '{owner}', '{status}')
             ON CONFLICT (id) DO UPDATE SET org = excluded.org, owner = excluded.owner,
                 status = excluded.status, version = task.version + 1"
        ),
        3 => format!(
            "UPDATE task SET {} = '{}', version = version + 1 WHERE id = {id}",
            pick(rng, &["org", "owner", "status"]),
            pick(rng, &["a", "b", "alice", "bob", "open", "done"])
        ),
        4 => {
            let to = 1 + rng.below(TASKS);
            format!(
                "UPDATE task SET id = {to}, version = version + 1
                  WHERE id = {id} AND NOT EXISTS (SELECT FROM task WHERE id = {to})"
            )
        }
        5 => format!("DELETE FROM task WHERE id = {id}"),
        6 => format!(
            "BEGIN; DELETE FROM task WHERE id = {id};
             INSERT INTO task VALUES ({id}, {project}, '{org}', '{owner}', '{status}', 1); COMMIT"
        ),
        7 => format!(
            "BEGIN; INSERT INTO project VALUES ({project}, '{org}', 'p{id}')
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, org = excluded.org,
                     version = project.version + 1;
             UPDATE task SET project_id = {project}, version = version + 1 WHERE id = {id}; COMMIT"
        ),
        8 => format!("DELETE FROM project WHERE id = {project}"),
        9 => format!("INSERT INTO member VALUES ({project}, '{owner}') ON CONFLICT DO NOTHING"),
        _ => format!("DELETE FROM member WHERE project_id = {project} AND user_id = '{owner}'"),
    }
}

/// The steps of a run of `length` steps, a check every few steps and at the end.
fn steps(rng: &mut Rng, length: usize, clients: usize) -> Vec<Step> {
    let mut out = Vec::new();
    let (mut auditing, mut inheriting) = (false, true);
    for i in 0..length {
        let step = match rng.below(100) {
            0..=64 => Step::Sql(write(rng)),
            65..=69 => {
                let (a, b) = (1 + rng.below(TASKS / 2), TASKS / 2 + 1 + rng.below(TASKS / 2));
                Step::OutOfOrder(
                    format!("UPDATE task SET status = 'blocked', version = version + 1 WHERE id = {a}"),
                    format!("UPDATE task SET org = 'a', version = version + 1 WHERE id = {b}"),
                )
            }
            70..=71 => Step::Sql(pick(rng, &["TRUNCATE task", "TRUNCATE project"]).to_owned()),
            72..=75 => Step::Sql(
                pick(
                    rng,
                    &[
                        "REVOKE SELECT ON project FROM app_user",
                        "GRANT SELECT ON project TO app_user",
                        "CREATE POLICY extra ON task USING (status = 'blocked')",
                        "DROP POLICY IF EXISTS extra ON task",
                        // Without it, `/v1/changes` readers of task share pages within an
                        // audience; with it (compiled too, reading member), each reads their
                        // own.
                        "DROP POLICY IF EXISTS by_membership ON task",
                        BY_MEMBERSHIP,
                    ],
                )
                .to_owned(),
            ),
            76..=77 => {
                auditing = !auditing;
                Step::Unseen(
                    if auditing {
                        "GRANT auditors TO app_user"
                    } else {
                        "REVOKE auditors FROM app_user"
                    }
                    .to_owned(),
                )
            }
            // A role attribute: without INHERIT, app_user is no longer subject to the
            // policies of the roles it is a member of.
            78 => {
                inheriting = !inheriting;
                Step::Unseen(
                    if inheriting {
                        "ALTER ROLE app_user INHERIT"
                    } else {
                        "ALTER ROLE app_user NOINHERIT"
                    }
                    .to_owned(),
                )
            }
            79..=80 => Step::Sql(
                pick(
                    rng,
                    &[
                        "SELECT sync.untrack('project')",
                        "SELECT sync.untrack(relid) FROM sync.tracked WHERE entity_code = 'project';
                         SELECT sync.track('project')",
                        "SELECT sync.untrack(relid) FROM sync.tracked WHERE entity_code = 'project';
                         SELECT sync.track('archive', 'project')",
                    ],
                )
                .to_owned(),
            ),
            81..=82 => Step::KillGateway,
            83..=87 => Step::Reconnect(rng.below(clients as u64) as usize),
            _ => Step::Sql(write(rng)),
        };
        // A policy that exists already, a grant given twice: made idempotent.
        let step = match step {
            Step::Sql(sql) if sql.starts_with("CREATE POLICY extra") => {
                Step::Sql(format!("DROP POLICY IF EXISTS extra ON task; {sql}"))
            }
            Step::Sql(sql) if sql == BY_MEMBERSHIP => Step::Sql(format!(
                "DROP POLICY IF EXISTS by_membership ON task; {sql}"
            )),
            step => step,
        };
        out.push(step);
        if i % 12 == 11 {
            out.push(Step::Check);
        }
    }
    out.push(Step::Check);
    out
}

/// What a client holds of one entity.
#[derive(Clone, Debug, PartialEq)]
enum Copy {
    Rows(BTreeMap<i64, Value>),
    /// The gateway said the user may not read it.
    Forbidden,
    /// The gateway does not know it (untracked).
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Delta,
    Invalidate,
    /// DELTA of the tasks that are `open` only.
    Filtered,
    /// `/v1/changes`, per entity.
    Changes,
}

/// One client of one user.
struct Client {
    user: usize,
    kind: Kind,
    session: Option<Session>,
    copies: HashMap<String, Copy>,
    cursors: HashMap<String, String>,
    /// Entities refetched (RESYNC) whose new subscription is not answered yet: messages of
    /// the old one are dropped until SUBSCRIBED.
    awaiting: BTreeSet<String>,
    /// Entities replaying (subscribed with `since`), until SYNCED.
    replaying: BTreeSet<String>,
    /// The `ref` of each entity's newest SUBSCRIBE (`entity#n`): answers to an earlier one,
    /// which a RESYNC replaced before it was answered, are not this one's.
    refs: HashMap<String, String>,
    subscriptions: usize,
    /// INVALIDATE: ids to refetch.
    dirty: BTreeMap<String, BTreeSet<i64>>,
    /// Which of the gateways it uses: the next one at each reconnection.
    home: usize,
}

fn user_token(user: usize) -> String {
    let (sub, org) = USERS[user];
    token(sub, &[("org", serde_json::from_str(org).unwrap())])
}

fn filter(kind: Kind, entity: &str) -> Option<Value> {
    (kind == Kind::Filtered && entity == "task")
        .then(|| json!([{"column": "status", "op": "eq", "value": "open"}]))
}

fn in_filter(kind: Kind, entity: &str, row: &Value) -> bool {
    filter(kind, entity).is_none() || row["status"] == "open"
}

impl Client {
    fn new(user: usize, kind: Kind) -> Client {
        Client {
            user,
            kind,
            session: None,
            copies: HashMap::new(),
            cursors: HashMap::new(),
            awaiting: BTreeSet::new(),
            replaying: BTreeSet::new(),
            refs: HashMap::new(),
            subscriptions: 0,
            dirty: BTreeMap::new(),
            home: user + kind as usize,
        }
    }

    fn name(&self) -> String {
        format!("{} {:?}", USERS[self.user].0, self.kind)
    }

    /// Connects (again, after the gateway or the socket went away) and subscribes to what it
    /// follows, from its cursors.
    async fn connect(&mut self, gateway: &Gateway) -> Result<(), String> {
        self.session = None;
        self.awaiting.clear();
        self.replaying.clear();
        self.refs.remove("await");
        if self.kind == Kind::Changes {
            return Ok(());
        }
        let mut session = None;
        for _ in 0..50 {
            match gateway.connect_with(&user_token(self.user), "").await {
                Ok(s) => {
                    session = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        self.session = Some(session.ok_or("the gateway did not take the connection")?);
        for entity in ["marker"].into_iter().chain(ENTITIES) {
            if let (Some(Copy::Rows(_)), Some(cursor)) =
                (self.copies.get(entity), self.cursors.get(entity).cloned())
            {
                self.subscribe(entity, Some(cursor)).await;
            }
        }
        Ok(())
    }

    async fn subscribe(&mut self, entity: &str, since: Option<String>) {
        let mode = if self.kind == Kind::Invalidate {
            "invalidate"
        } else {
            "delta"
        };
        self.subscriptions += 1;
        self.refs.remove("await");
        let reference = format!("{entity}#{}", self.subscriptions);
        let mut payload = json!({"entityCode": entity, "mode": mode, "ref": reference});
        self.refs.insert(entity.to_owned(), reference);
        if let Some(filter) = filter(self.kind, entity) {
            payload["filter"] = filter;
        }
        if let Some(since) = since {
            payload["since"] = json!(since);
            self.replaying.insert(entity.to_owned());
        }
        self.awaiting.insert(entity.to_owned());
        if let Some(session) = &mut self.session {
            if !session
                .try_send(json!({"type": "SUBSCRIBE", "payload": payload}))
                .await
            {
                // Gone (the gateway restarted): the next read connects again.
                self.session = None;
            }
        }
    }

    /// A snapshot of `entity` (or of `ids` of it): the cursor and rows, or the copy it means.
    async fn snapshot(
        &self,
        gateway: &Gateway,
        entity: &str,
        ids: Option<&BTreeSet<i64>>,
    ) -> Result<(String, Vec<Value>), Copy> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let auth = format!("Bearer {}", user_token(self.user));
        let path = match ids {
            Some(ids) => {
                let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
                format!("/v1/snapshot/{entity}?ids={}", ids.join(","))
            }
            None => format!("/v1/snapshot/{entity}"),
        };
        loop {
            let response = gateway
                .request("GET", &path, &[("Authorization", &auth)], None)
                .await
                .map_err(|_| Copy::Unknown);
            match response {
                Ok(r) if r.status == 200 && r.complete => {
                    let text = String::from_utf8(r.body).unwrap();
                    let mut lines = text
                        .lines()
                        .map(|l| serde_json::from_str::<Value>(l).unwrap());
                    let cursor = lines.next().unwrap()["cursor"].as_str().unwrap().to_owned();
                    return Ok((cursor, lines.collect()));
                }
                Ok(r) if r.status == 403 => return Err(Copy::Forbidden),
                Ok(r) if String::from_utf8_lossy(&r.body).contains("\"unknown_entity\"") => {
                    return Err(Copy::Unknown)
                }
                // The gateway restarting, or busy: again.
                other => {
                    let status =
                        other.map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()));
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{}: no snapshot of {entity} for {PATIENCE:?}: {status:?}",
                        self.name()
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
            }
        }
    }

    /// Replaces the copy of `entity` by a snapshot and follows it from there.
    async fn hydrate(&mut self, gateway: &Gateway, entity: &str) {
        self.dirty.remove(entity);
        match self.snapshot(gateway, entity, None).await {
            Ok((cursor, rows)) => {
                let rows = rows
                    .into_iter()
                    .filter(|r| in_filter(self.kind, entity, r))
                    .map(|r| (r["id"].as_i64().unwrap(), r))
                    .collect();
                self.copies.insert(entity.to_owned(), Copy::Rows(rows));
                self.cursors.insert(entity.to_owned(), cursor.clone());
                if self.kind != Kind::Changes {
                    self.subscribe(entity, Some(cursor)).await;
                }
            }
            Err(copy) => {
                self.copies.insert(entity.to_owned(), copy);
                self.cursors.remove(entity);
            }
        }
    }

    fn apply(&mut self, entity: &str, change: &Value) {
        let Some(Copy::Rows(rows)) = self.copies.get_mut(entity) else {
            return;
        };
        let id: i64 = change["entityId"].as_str().unwrap().parse().unwrap();
        match (self.kind, change["action"].as_str().unwrap()) {
            (Kind::Invalidate, _) => {
                self.dirty.entry(entity.to_owned()).or_default().insert(id);
            }
            (_, "DELETE") => {
                rows.remove(&id);
            }
            _ => {
                rows.insert(id, change["data"].clone());
            }
        }
    }

    /// Reads what the gateway sent until the marker row `marker` and every replay arrived,
    /// then until REACHED of the marker's cursor: a replay's live changes come after its
    /// SYNCED, and may follow the marker (another subscription, live meanwhile).
    async fn catch_up(&mut self, gateway: &Gateway, marker: i64) -> Result<(), String> {
        if self.kind == Kind::Changes {
            return self.poll_changes(gateway).await;
        }
        let (mut seen_marker, mut reached) = (false, false);
        // The marker came while nothing replayed (and nothing was subscribed since, counted
        // here): every change before it came before it (a connection's live messages keep the
        // log's order), so none may follow it.
        let mut in_order: Option<usize> = None;
        let mut awaits = 0;
        // The AWAIT in force (`refs["await"]`), sent after the last SUBSCRIBE (which drops it).
        self.refs.remove("await");
        loop {
            let caught_up = seen_marker && self.replaying.is_empty() && self.awaiting.is_empty();
            let await_sent = self.refs.contains_key("await");
            if caught_up && await_sent && reached {
                break;
            }
            let Some(session) = &mut self.session else {
                self.connect(gateway).await?;
                continue;
            };
            if caught_up && !await_sent {
                awaits += 1;
                let reference = format!("await#{marker}.{awaits}");
                let cursor = self.cursors["marker"].clone();
                self.refs.insert("await".to_owned(), reference.clone());
                reached = false;
                if !session
                    .try_send(
                        json!({"type": "AWAIT", "payload": {"cursor": cursor, "ref": reference}}),
                    )
                    .await
                {
                    self.session = None;
                }
                continue;
            }
            let quiet = PATIENCE / 2;
            let message = match tokio::time::timeout(quiet, session.next_or_close()).await {
                Ok(Ok(message)) => message,
                Ok(Err(_)) => {
                    // The gateway went away (or asked to reconnect): resume from the cursors.
                    self.connect(gateway).await?;
                    continue;
                }
                Err(_) => {
                    return Err(format!(
                        "{}: nothing from the gateway for {quiet:?}, waiting for marker {marker} \
                         (seen: {seen_marker}), SUBSCRIBED of {:?}, SYNCED of {:?}",
                        self.name(),
                        self.awaiting,
                        self.replaying
                    ))
                }
            };
            let payload = &message["payload"];
            // An answer to a SUBSCRIBE names its entity by `ref`.
            let reference = payload["ref"].as_str();
            let entity = payload["entityCode"]
                .as_str()
                .or(reference.and_then(|r| r.rsplit_once('#')).map(|(e, _)| e))
                .unwrap_or_default()
                .to_owned();
            if reference.is_some_and(|r| self.refs.get(&entity).map(String::as_str) != Some(r)) {
                continue; // the answer to a SUBSCRIBE replaced since
            }
            match message["type"].as_str().unwrap_or_default() {
                "SUBSCRIBED" => {
                    self.awaiting.remove(&entity);
                }
                "SYNCED" => {
                    self.replaying.remove(&entity);
                }
                "DELTA" | "INVALIDATE" if !self.awaiting.contains(&entity) => {
                    let changes = payload["changes"].as_array().unwrap();
                    if in_order == Some(self.subscriptions)
                        && entity != "marker"
                        && !changes.is_empty()
                    {
                        return Err(format!(
                            "{}: a change of {entity} after marker {marker}, though nothing replayed: {message}",
                            self.name()
                        ));
                    }
                    for change in changes {
                        if entity == "marker" {
                            if change["entityId"].as_str() == Some(&marker.to_string()) {
                                seen_marker = true;
                                in_order = (self.replaying.is_empty() && self.awaiting.is_empty())
                                    .then_some(self.subscriptions);
                            }
                        } else {
                            self.apply(&entity, change);
                        }
                    }
                    self.cursors
                        .insert(entity, payload["cursor"].as_str().unwrap().to_owned());
                }
                "REACHED" => reached = true,
                "DELTA" | "INVALIDATE" | "PONG" => {}
                "RESYNC" => {
                    self.replaying.remove(&entity);
                    self.hydrate(gateway, &entity).await;
                    // A marker refetched may hold the row awaited: it will not come as a change.
                    if let Some(Copy::Rows(rows)) = self.copies.get("marker") {
                        seen_marker |= entity == "marker" && rows.contains_key(&marker);
                    }
                }
                "ERROR" if payload["code"] == "unknown_entity" => {
                    self.copies.insert(entity.clone(), Copy::Unknown);
                    self.awaiting.remove(&entity);
                    self.replaying.remove(&entity);
                }
                "ERROR" if payload["code"] == "forbidden" => {
                    self.copies.insert(entity.clone(), Copy::Forbidden);
                    self.awaiting.remove(&entity);
                    self.replaying.remove(&entity);
                }
                // A subscription or replay that could not run now (the user's queries are
                // capped): again, from the cursor, as a client does.
                "ERROR" if payload["code"] == "internal" && !entity.is_empty() => {
                    self.awaiting.remove(&entity);
                    self.replaying.remove(&entity);
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    let cursor = self.cursors.get(&entity).cloned();
                    self.subscribe(&entity, cursor).await;
                }
                "RECONNECT" => {
                    self.connect(gateway).await?;
                }
                _ => return Err(format!("{}: unexpected {message}", self.name())),
            }
        }
        Ok(())
    }

    /// A `/v1/changes` reader: each entity read from its cursor until nothing is new.
    async fn poll_changes(&mut self, gateway: &Gateway) -> Result<(), String> {
        let auth = format!("Bearer {}", user_token(self.user));
        let deadline = tokio::time::Instant::now() + PATIENCE * 4;
        for entity in ENTITIES {
            loop {
                if tokio::time::Instant::now() > deadline {
                    return Err(format!(
                        "{}: /v1/changes of {entity} did not end",
                        self.name()
                    ));
                }
                let Some(cursor) = self.cursors.get(entity).cloned() else {
                    break;
                };
                let path = format!("/v1/changes?since={cursor}&entityCode={entity}&limit=100");
                let response = match gateway
                    .request("GET", &path, &[("Authorization", &auth)], None)
                    .await
                {
                    Ok(r) if r.complete => r,
                    _ => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                match response.status {
                    200 => {}
                    403 => {
                        self.copies.insert(entity.to_owned(), Copy::Forbidden);
                        self.cursors.remove(entity);
                        break;
                    }
                    400 if body["error"] == "unknown_entity" => {
                        self.hydrate(gateway, entity).await;
                        continue;
                    }
                    410 => {
                        self.hydrate(gateway, entity).await;
                        continue;
                    }
                    503 => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                    status => {
                        return Err(format!(
                            "{}: /v1/changes answered {status} {body}",
                            self.name()
                        ))
                    }
                }
                let changes = body["changes"].as_array().cloned().unwrap_or_default();
                let mut refetch = false;
                for change in &changes {
                    match change["action"].as_str() {
                        Some("TRUNCATE") | Some("RESYNC") => refetch = true,
                        _ => self.apply(entity, change),
                    }
                }
                self.cursors.insert(
                    entity.to_owned(),
                    body["cursor"].as_str().unwrap().to_owned(),
                );
                if refetch {
                    self.hydrate(gateway, entity).await;
                }
                if changes.is_empty() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// At a check: what it may read again is fetched, what was invalidated refetched.
    async fn settle(&mut self, gateway: &Gateway) {
        for entity in ENTITIES {
            if !matches!(self.copies.get(entity), Some(Copy::Rows(_))) {
                self.hydrate(gateway, entity).await;
            }
        }
        for (entity, ids) in std::mem::take(&mut self.dirty) {
            let fetched = match self.snapshot(gateway, &entity, Some(&ids)).await {
                Ok((_, rows)) => rows,
                Err(_) => continue,
            };
            let Some(Copy::Rows(rows)) = self.copies.get_mut(&entity) else {
                continue;
            };
            for id in &ids {
                rows.remove(id);
            }
            for row in fetched {
                rows.insert(row["id"].as_i64().unwrap(), row);
            }
        }
    }
}

/// What PostgreSQL lets `user` SELECT of `entity`, or that it refuses (or it is not tracked).
async fn truth(cluster: &Cluster, user: usize, entity: &str) -> Copy {
    let admin = cluster.connect().await;
    let table: Option<String> = admin
        .query_opt(
            "SELECT relid::regclass::text FROM sync.tracked WHERE entity_code = $1",
            &[&entity],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    let Some(table) = table else {
        return Copy::Unknown;
    };
    let (sub, org) = USERS[user];
    let org: Value = serde_json::from_str(org).unwrap();
    let claims = json!({"sub": sub, "org": org}).to_string();
    admin
        .batch_execute(&format!(
            "BEGIN; SET LOCAL ROLE app_user; SELECT set_config('request.jwt.claims', $${claims}$$, true)"
        ))
        .await
        .unwrap();
    let rows = admin
        .query(&format!("SELECT to_jsonb(t.*) FROM {table} t"), &[])
        .await;
    admin.batch_execute("ROLLBACK").await.unwrap();
    match rows {
        Ok(rows) => Copy::Rows(
            rows.iter()
                .map(|r| {
                    let row: Value = r.get(0);
                    (row["id"].as_i64().unwrap(), row)
                })
                .collect(),
        ),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            Copy::Forbidden
        }
        Err(e) => panic!("{}", error_text(&e)),
    }
}

/// Waits until `gateway`'s live stream has passed the log's current position.
async fn settled(cluster: &Cluster, gateway: &Gateway) -> Result<(), String> {
    let cursor: String = cluster
        .connect()
        .await
        .query_one("SELECT sync.current_cursor()", &[])
        .await
        .map_err(|e| error_text(&e))?
        .get(0);
    gateway.passed(&cursor).await
}

/// The TypeScript client in Chromium, a tab of its own per user (its own IndexedDB and socket),
/// following the entities from the first gateway (`clients/typescript/test/browser/oracle.mjs`,
/// driven one JSON line at a time). Build the client first (`make client`).
struct Browser {
    node: tokio::process::Child,
    commands: tokio::process::ChildStdin,
    answers: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

/// Where the client's build is, for the gateway to serve (`--static-dir`).
fn client_build() -> String {
    let demo = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../clients/typescript/dist/demo"
    );
    assert!(
        std::path::Path::new(demo).join("client.js").exists(),
        "build the client first: make client"
    );
    demo.to_owned()
}

impl Browser {
    async fn start(gateway: &Gateway) -> Result<Browser, String> {
        let mut node = tokio::process::Command::new("node")
            .arg("test/browser/oracle.mjs")
            .current_dir(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../clients/typescript"
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("node: {e}"))?;
        let commands = node.stdin.take().unwrap();
        let answers = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            node.stdout.take().unwrap(),
        ));
        let mut browser = Browser {
            node,
            commands,
            answers,
        };
        let users: Vec<Value> = (0..USERS.len())
            .map(|u| json!({"name": USERS[u].0, "token": user_token(u)}))
            .collect();
        let entities: Vec<&str> = ["marker"].into_iter().chain(ENTITIES).collect();
        browser
            .ask(
                json!({"open": {"gateway": format!("http://127.0.0.1:{}", gateway.port),
                                  "users": users, "entities": entities}}),
            )
            .await?;
        Ok(browser)
    }

    async fn ask(&mut self, command: Value) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let line = format!("{command}\n");
        let sent = self.commands.write_all(line.as_bytes()).await;
        let answer = match sent {
            Ok(()) => self.answers.next_line().await.ok().flatten(),
            Err(_) => None,
        };
        let answer: Value = answer
            .and_then(|a| serde_json::from_str(&a).ok())
            .ok_or("the browser's program ended (its output is above)")?;
        match answer.get("error") {
            Some(error) => Err(format!(
                "TypeScript client: {}",
                error.as_str().unwrap_or_default()
            )),
            None => Ok(()),
        }
    }

    /// Closes `user`'s client in its tab and makes it again on `gateway`.
    async fn reconnect(&mut self, user: &str, gateway: &Gateway) -> Result<(), String> {
        let url = format!("http://127.0.0.1:{}", gateway.port);
        self.ask(json!({"reconnect": {"user": user, "gateway": url}}))
            .await
    }

    /// Waits until every user's tab holds what `truth` says each may SELECT, by user name and
    /// entity (rows, or "forbidden" / "unknown").
    async fn check(&mut self, truth: Value) -> Result<(), String> {
        let timeout_ms = PATIENCE.as_millis() as u64;
        self.ask(json!({"check": {"truth": truth, "timeoutMs": timeout_ms}}))
            .await
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.node.start_kill();
    }
}

/// Where the clients' gateways read.
#[derive(Clone, Copy, Debug)]
enum Topology {
    /// One gateway on the primary.
    Primary,
    /// A gateway reading from a streaming hot standby (`--read-url`) and one on the primary;
    /// each client moves to the other at each reconnection.
    Standby,
}

/// Runs `steps` on a fresh cluster and gateways; the first difference found, if any.
/// Where a run failed: the step (0 also for the start), and how.
struct Failure {
    step: usize,
    what: String,
}

/// Runs the steps; a failure says at which.
async fn run(steps: &[Step], topology: Topology) -> Result<(), Failure> {
    let mut step = 0;
    play(steps, topology, &mut step)
        .await
        .map_err(|what| Failure { step, what })
}

/// Plays the steps, `at` following the one under way.
async fn play(steps: &[Step], topology: Topology, at: &mut usize) -> Result<(), String> {
    let cluster = Cluster::start().await;
    cluster.execute(SCHEMA).await;
    cluster.execute(BY_MEMBERSHIP).await;
    let poll = ["--poll-interval-ms", "200"];
    let build = client_build();
    // The first gateway also serves the TypeScript client's build, to the browser's tabs.
    let first = [&poll[..], &["--static-dir", build.as_str()]].concat();
    let (mut gateways, _standby) = match topology {
        Topology::Primary => (vec![Gateway::start(&cluster, &first).await], None),
        Topology::Standby => {
            let standby = cluster.standby().await;
            let read_url = standby.url_as(GATEWAY_ROLE, "postgres");
            let args = [&first[..], &["--read-url", read_url.as_str()]].concat();
            let on_standby = Gateway::start(&cluster, &args).await;
            // The browser's tabs, served by the first, move to it too.
            let origin = format!("http://127.0.0.1:{}", on_standby.port);
            let on_primary = Gateway::start(
                &cluster,
                &[&poll[..], &["--cors-origins", &origin]].concat(),
            )
            .await;
            (vec![on_standby, on_primary], Some(standby))
        }
    };
    let kinds = [Kind::Delta, Kind::Invalidate, Kind::Filtered, Kind::Changes];
    let mut clients: Vec<Client> = (0..USERS.len())
        .flat_map(|u| kinds.iter().map(move |k| Client::new(u, *k)))
        .collect();
    for client in &mut clients {
        let gateway = &gateways[client.home % gateways.len()];
        client.connect(gateway).await?;
        // The marker too, from a snapshot's cursor: after a reconnection the client resumes
        // it from there, not from the live position (which may be past a marker row).
        for entity in ["marker"].into_iter().chain(ENTITIES) {
            client.hydrate(gateway, entity).await;
        }
    }
    let mut browser = Browser::start(&gateways[0]).await?;
    let mut marker = 0;
    let log = std::env::var("PG_SYNC_ORACLE_LOG").is_ok();
    for (n, step) in steps.iter().enumerate() {
        *at = n;
        if log {
            eprintln!("step {n}: {step:?}");
        }
        match step {
            Step::Sql(sql) => {
                let admin = cluster.connect().await;
                if let Err(e) = admin.batch_execute(sql).await {
                    let _ = admin.batch_execute("ROLLBACK").await;
                    // A write that breaks a constraint of the moment changes nothing.
                    if !matches!(e.code().map(|c| c.code()), Some("23505") | Some("23503")) {
                        return Err(format!("step {n} {sql}: {}", error_text(&e)));
                    }
                }
            }
            Step::Unseen(sql) => {
                // Each gateway's epoch, once it has met every access change written so far
                // (a standby's gateway replays them late: its epoch moving for an earlier
                // change must not pass for noticing this one).
                let mut before = Vec::new();
                for gateway in &gateways {
                    settled(&cluster, gateway).await?;
                    before.push(gateway.metric("sync_access_epoch").await);
                }
                cluster.execute(sql).await;
                // Every gateway notices at its own poll: a client of one that has not yet
                // would be checked before its RESYNC. A grant of what the role has already
                // changes nothing to notice.
                for (gateway, before) in gateways.iter().zip(before) {
                    let noticed = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        gateway.access_epoch_after(before),
                    )
                    .await;
                    let _ = noticed;
                }
            }
            Step::OutOfOrder(first, second) => {
                let a = cluster.connect().await;
                let b = cluster.connect().await;
                a.batch_execute(&format!("BEGIN; {first}")).await.unwrap();
                b.batch_execute(second).await.unwrap();
                a.batch_execute("COMMIT").await.unwrap();
            }
            Step::KillGateway => {
                let killed = gateways.remove(0);
                gateways.insert(0, killed.replace().await);
            }
            Step::Reconnect(c) => {
                let count = clients.len();
                let client = &mut clients[*c % count];
                client.home += 1;
                let gateway = &gateways[client.home % gateways.len()];
                client.connect(gateway).await?;
                // The user's tab moves with it.
                browser.reconnect(USERS[client.user].0, gateway).await?;
            }
            Step::Check => {
                marker += 1;
                cluster
                    .execute(&format!("INSERT INTO marker VALUES ({marker})"))
                    .await;
                for client in &mut clients {
                    let gateway = &gateways[client.home % gateways.len()];
                    client.catch_up(gateway, marker).await?;
                    client.settle(gateway).await;
                }
                let mut truths = HashMap::new();
                for user in 0..USERS.len() {
                    for entity in ["marker"].into_iter().chain(ENTITIES) {
                        truths.insert((user, entity), truth(&cluster, user, entity).await);
                    }
                }
                for client in &clients {
                    for entity in ENTITIES {
                        let expected = match truths[&(client.user, entity)].clone() {
                            Copy::Rows(rows) => Copy::Rows(
                                rows.into_iter()
                                    .filter(|(_, r)| in_filter(client.kind, entity, r))
                                    .collect(),
                            ),
                            other => other,
                        };
                        let held = client.copies.get(entity).cloned().unwrap_or(Copy::Unknown);
                        if held != expected {
                            return Err(format!(
                                "at check {marker} (step {n}), {} holds of {entity}\n  {held:?}\nwhere PostgreSQL lets it SELECT\n  {expected:?}",
                                client.name()
                            ));
                        }
                    }
                }
                let truth: serde_json::Map<String, Value> = (0..USERS.len())
                    .map(|user| {
                        let entities = ["marker"].into_iter().chain(ENTITIES).map(|entity| {
                            let copy = match &truths[&(user, entity)] {
                                Copy::Rows(rows) => json!(rows.values().collect::<Vec<_>>()),
                                Copy::Forbidden => json!("forbidden"),
                                Copy::Unknown => json!("unknown"),
                            };
                            (entity.to_owned(), copy)
                        });
                        (USERS[user].0.to_owned(), Value::Object(entities.collect()))
                    })
                    .collect();
                browser
                    .check(Value::Object(truth))
                    .await
                    .map_err(|e| format!("at check {marker} (step {n}), {e}"))?;
            }
        }
    }
    Ok(())
}

/// Steps that still fail, fewer: those after the failing one go, then chunks of the others
/// as long as the run fails (the failing step stays: it is where a difference shows; when
/// a shorter run fails earlier, the steps after that one go too).
async fn shrink(
    mut steps: Vec<Step>,
    failed: usize,
    topology: Topology,
    budget: std::time::Duration,
) -> Vec<Step> {
    steps.truncate(failed + 1);
    let deadline = tokio::time::Instant::now() + budget;
    let mut chunk = steps.len() / 2;
    while chunk > 0 && tokio::time::Instant::now() < deadline {
        let mut start = 0;
        while start + 1 < steps.len() && tokio::time::Instant::now() < deadline {
            let end = (start + chunk).min(steps.len() - 1);
            let candidate: Vec<Step> = steps[..start]
                .iter()
                .chain(&steps[end..])
                .cloned()
                .collect();
            match run(&candidate, topology).await {
                Err(failure) => {
                    steps = candidate;
                    steps.truncate(failure.step + 1);
                }
                Ok(()) => start = end,
            }
        }
        chunk /= 2;
    }
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_copy_equals_what_postgresql_lets_its_user_select() {
    oracle(Topology::Primary, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_copy_through_a_standby_equals_what_postgresql_lets_its_user_select() {
    oracle(Topology::Standby, 40).await;
}

/// Runs `length` random steps (or `PG_SYNC_ORACLE_STEPS`) and shrinks a failure.
async fn oracle(topology: Topology, length: usize) {
    let seed = pg_sync_tests::seed();
    let length: usize = std::env::var("PG_SYNC_ORACLE_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(length);
    let clients = USERS.len() * 4;
    let steps = steps(&mut Rng(seed), length, clients);
    if let Err(failure) = run(&steps, topology).await {
        let failed = failure.step + 1;
        eprintln!(
            "seed {seed}: {}\nshrinking the {failed} steps up to it…",
            failure.what
        );
        let shrunk = shrink(
            steps,
            failure.step,
            topology,
            std::time::Duration::from_secs(300),
        )
        .await;
        let failure = run(&shrunk, topology).await.err().unwrap_or(failure).what;
        panic!(
            "{topology:?}, seed {seed} (PG_SYNC_SEED={seed} repeats it): {failure}\nshrunk to {} steps:\n{}",
            shrunk.len(),
            shrunk
                .iter()
                .map(|s| format!("  {s:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
