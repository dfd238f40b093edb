//! What the gateway knows about tracked entities: their table, primary key and published
//! columns (for filters, `columns`, snapshots and writes), their tracking and whether
//! row-level security is on; and who may read each (`sync.access_digests`), whose every change
//! gives the catalog a new `epoch` (policy plans are cached per epoch, `access::plans`).
//!
//! Read again when a page of the log shows a newer access event than the catalog was read
//! with (`observe`: a GRANT, a policy, an ALTER TABLE, a track or untrack), at every poll of
//! the reader (`refresh_if_older`: what no event trigger sees, such as ALTER ROLE), and when a
//! client names an entity not seen yet. When the fingerprint moved, the gateway notes it
//! (`sync._note_access`): entities whose access changed get an ACCESS row in the log.
//!
//! Every identifier that reaches SQL built by the gateway comes from here, quoted here.

use crate::model::digest::short_digest;
use deadpool_postgres::Pool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio_postgres::IsolationLevel;

/// How often a name not in the catalog may make it read again.
const MISS_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct Entity {
    pub code: String,
    /// The table, schema-qualified and quoted: `"app"."task"`.
    pub table: String,
    /// The table's oid: how the gateway names it to pg_sync's functions (no name to resolve,
    /// so no schema privilege needed to find it).
    pub relid: u32,
    /// The primary key's columns, in key order, and their SQL types.
    pub key: Vec<String>,
    pub key_types: Vec<String>,
    /// The columns that reach the log: the allow-list and the primary key, or all.
    pub columns: HashSet<String>,
    /// Whether `columns` comes from an allow-list (else every column is published, also one
    /// added after this was read).
    pub allow_listed: bool,
    /// Row-level security is enabled on the table.
    pub rls: bool,
    /// `sync.tracked.schema_version`: bumped by every ALTER TABLE of it.
    pub schema_version: i32,
    /// `sync.tracked.tracking`: the entity's identity in the log; a change written under
    /// another tracking is another table's (or an earlier tracking's) and is never judged as
    /// this one's.
    pub tracking: i64,
    /// Who may read it, as a digest (`sync.access_digests` for this gateway's roles): part of
    /// its pages' audience (`access::sharing`).
    pub access: String,
}

impl Entity {
    /// A table `code` keyed by a bigint `id`, without row-level security, for tests.
    #[cfg(test)]
    pub fn of(code: &str, tracking: i64) -> Entity {
        Entity {
            code: code.to_owned(),
            table: quote(code),
            relid: 1,
            key: vec!["id".into()],
            key_types: vec!["bigint".into()],
            columns: HashSet::new(),
            allow_listed: false,
            rls: false,
            schema_version: 1,
            tracking,
            access: String::new(),
        }
    }

    /// SQL for what clients see of row `t` (snapshots, conflict answers): the published
    /// columns named one by one when there is an allow-list, so that a column added since
    /// the catalog was read stays in the database (a deny-list of the others would let it
    /// out until the next read).
    pub fn row_json_sql(&self) -> String {
        if !self.allow_listed {
            return "pg_catalog.to_jsonb(t.*)".to_owned();
        }
        let mut columns: Vec<&String> = self.columns.iter().collect();
        columns.sort();
        // jsonb_build_object takes at most 100 arguments: 50 columns each, concatenated.
        let parts: Vec<String> = columns
            .chunks(50)
            .map(|chunk| {
                let pairs: Vec<String> = chunk
                    .iter()
                    .map(|c| format!("'{}', t.{}", c.replace('\'', "''"), quote(c)))
                    .collect();
                format!("pg_catalog.jsonb_build_object({})", pairs.join(", "))
            })
            .collect();
        parts.join(" OPERATOR(pg_catalog.||) ")
    }

    /// A call raising SQLSTATE SY412 unless the table is still this entity (its tracking and
    /// schema version), with `$n` to `$n+2` its `identity()`: run after `lock_as` locked the
    /// table, before the query built from this entity reads or writes it.
    pub fn check_sql(n: usize) -> String {
        format!("sync._entity_is(${n}::oid, ${}, ${})", n + 1, n + 2)
    }

    /// The parameters of `check_sql`.
    pub fn identity(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 3] {
        [&self.relid, &self.tracking, &self.schema_version]
    }

    /// SQL for the log's `entity_id` of row `t`: the key's text, or for a composite key the
    /// JSON array of the columns' texts.
    pub fn id_sql(&self) -> String {
        match self.key.as_slice() {
            [one] => format!("t.{}::text", quote(one)),
            many => {
                let parts: Vec<String> = many
                    .iter()
                    .map(|k| format!("to_json(t.{}::text)::text", quote(k)))
                    .collect();
                format!("'[' || concat_ws(',', {}) || ']'", parts.join(", "))
            }
        }
    }

    /// SQL matching row `t` against parameter `$n`, a text[] of entity ids, usable by the
    /// primary key's index.
    pub fn key_in_sql(&self, n: usize) -> String {
        self.key_in_sql_literal(&format!("${n}::text[]"))
    }

    /// As `key_in_sql`, against a text[] expression.
    pub fn key_in_sql_literal(&self, ids: &str) -> String {
        match (self.key.as_slice(), self.key_types.as_slice()) {
            ([one], [ty]) => format!("t.{} = ANY (({ids})::{ty}[])", quote(one)),
            (many, types) => {
                let columns: Vec<String> = many.iter().map(|k| format!("t.{}", quote(k))).collect();
                let parts: Vec<String> = types
                    .iter()
                    .enumerate()
                    .map(|(i, ty)| format!("(u.id::jsonb ->> {i})::{ty}"))
                    .collect();
                format!(
                    "({}) IN (SELECT {} FROM unnest({ids}) AS u(id))",
                    columns.join(", "),
                    parts.join(", ")
                )
            }
        }
    }
}

/// A quoted SQL identifier.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The tracked entities as read at one access fingerprint.
pub struct View {
    pub entities: HashMap<String, Arc<Entity>>,
    /// The newest access event visible when this was read.
    pub serial: i64,
    pub fingerprint: String,
    /// Bumped whenever the fingerprint changes: what was decided at another epoch (a policy
    /// plan, a judgement) may be wrong now.
    pub epoch: u64,
    loaded_at: Instant,
    /// When the read of this view began (before its transaction's snapshot): it holds
    /// everything committed before then, so that a reload asked for at a moment is a read
    /// begun after it, not one already under way.
    read_began: Instant,
}

impl View {
    /// The view before the first read: no entities.
    fn empty() -> View {
        View {
            entities: HashMap::new(),
            serial: -1,
            fingerprint: String::new(),
            epoch: 0,
            loaded_at: Instant::now() - MISS_INTERVAL * 2,
            read_began: Instant::now() - MISS_INTERVAL * 2,
        }
    }

    /// A view at `epoch` of entities (code, tracking), for tests.
    #[cfg(test)]
    pub fn of(epoch: u64, entities: &[(&str, i64)]) -> View {
        let entities = entities
            .iter()
            .map(|(code, tracking)| (code.to_string(), Arc::new(Entity::of(code, *tracking))));
        View {
            entities: entities.collect(),
            epoch,
            ..View::empty()
        }
    }

    /// Whether the entity named `code` is the table tracked as `tracking`.
    pub fn tracks(&self, code: &str, tracking: i64) -> bool {
        self.entities
            .get(code)
            .is_some_and(|e| e.tracking == tracking)
    }

    /// The entities of `older` that this view no longer has as they were: untracked, or
    /// tracked again (another table, or the same one after an untrack). Their subscribers'
    /// copies hold another table's rows.
    pub fn replaced_since(&self, older: &View) -> Vec<String> {
        let mut codes: Vec<String> = older
            .entities
            .iter()
            .filter(|(code, was)| {
                self.entities
                    .get(*code)
                    .is_none_or(|now| now.tracking != was.tracking)
            })
            .map(|(code, _)| code.clone())
            .collect();
        codes.sort();
        codes
    }
}

pub struct Catalog {
    /// Where the catalog is read: where the log is.
    pool: Pool,
    /// Where access changes are noted: the primary.
    notes: Pool,
    /// The roles this gateway acts as: what they may read is part of its access fingerprint.
    roles: Vec<String>,
    view: RwLock<Arc<View>>,
    /// Held while re-reading, so that concurrent reasons to read share one read.
    reloading: tokio::sync::Mutex<()>,
}

const ENTITIES_SQL: &str = "
SELECT e.entity_code, e.rls, e.schema_name, e.table_name, e.schema_version, e.key_columns,
       e.key_types, e.published, e.columns IS NOT NULL, e.tracking, e.relid, d.digest
  FROM sync.entities() e
  LEFT JOIN sync.access_digests($1) d ON d.entity_code = e.entity_code";

const ACCESS_SQL: &str = "SELECT sync.access_serial()";

impl Catalog {
    pub fn new(pool: Pool, notes: Pool, roles: Vec<String>) -> Self {
        Catalog {
            pool,
            notes,
            roles,
            view: RwLock::new(Arc::new(View::empty())),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// The catalog as last read.
    pub fn view(&self) -> Arc<View> {
        self.view.read().expect("catalog lock").clone()
    }

    /// The entity named `code` as last read, without going to the database.
    pub fn cached(&self, code: &str) -> Option<Arc<Entity>> {
        self.view().entities.get(code).cloned()
    }

    /// The catalog as of at least access event `serial` (read again when it is older).
    pub async fn observe(&self, serial: i64) -> Result<Arc<View>, CatalogError> {
        self.reload_unless(|view| view.serial >= serial).await
    }

    /// The catalog read again if it is older than `age` (for what no event trigger sees).
    pub async fn refresh_if_older(&self, age: Duration) -> Result<Arc<View>, CatalogError> {
        self.reload_unless(|view| view.loaded_at.elapsed() < age)
            .await
    }

    /// The catalog read again now (a query found the table changed under it).
    pub async fn reload(&self) -> Result<Arc<View>, CatalogError> {
        let asked = Instant::now();
        self.reload_unless(|view| view.read_began > asked).await
    }

    /// The entity named `code`, if it is tracked. Clients name entities: an unknown name
    /// reads the catalog again (perhaps it was tracked a moment ago), but the reads of misses
    /// are at least `MISS_INTERVAL` apart and shared by every miss waiting for them, so that
    /// names made up in a flood cost the feed's pool one read per interval.
    pub async fn entity(&self, code: &str) -> Result<Option<Arc<Entity>>, CatalogError> {
        let view = self.view();
        if let Some(entity) = view.entities.get(code) {
            return Ok(Some(entity.clone()));
        }
        tokio::time::sleep_until((view.loaded_at + MISS_INTERVAL).into()).await;
        let seen = view.loaded_at;
        Ok(self
            .reload_unless(|now| now.loaded_at > seen)
            .await?
            .entities
            .get(code)
            .cloned())
    }

    /// Reads the catalog again unless `fresh` says the one held will do (checked again once
    /// the reading lock is held, so that waiters share the read made meanwhile).
    async fn reload_unless(
        &self,
        fresh: impl Fn(&View) -> bool,
    ) -> Result<Arc<View>, CatalogError> {
        let view = self.view();
        if fresh(&view) {
            return Ok(view);
        }
        let _reloading = self.reloading.lock().await;
        let view = self.view();
        if fresh(&view) {
            return Ok(view);
        }
        let began = Instant::now();
        let mut client = self.pool.get().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let roles: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&self.roles];
        let (access, rows) = tokio::join!(
            tx.query_one(ACCESS_SQL, &[]),
            tx.query(ENTITIES_SQL, &roles)
        );
        let (access, rows) = (access?, rows?);
        tx.commit().await?;
        drop(client);
        let entities = rows
            .iter()
            .map(|r| {
                let code: String = r.get(0);
                let (schema, table): (String, String) = (r.get(2), r.get(3));
                let columns: Vec<String> = r.get(7);
                let entity = Entity {
                    code: code.clone(),
                    rls: r.get(1),
                    table: format!("{}.{}", quote(&schema), quote(&table)),
                    key: r.get(5),
                    key_types: r.get(6),
                    columns: columns.into_iter().collect(),
                    allow_listed: r.get(8),
                    schema_version: r.get(4),
                    tracking: r.get(9),
                    relid: r.get(10),
                    access: r.get::<_, Option<String>>(11).unwrap_or_default(),
                };
                (code, Arc::new(entity))
            })
            .collect();
        let fingerprint = fingerprint(&entities);
        let moved = fingerprint != view.fingerprint;
        if moved {
            // What changed may be what no event trigger sees (ALTER ROLE, GRANT of a role,
            // REASSIGN OWNED): noted in the log for the entities it touches, so that every
            // reader (this one, other gateways, replays, /v1/changes) meets it in order. (At
            // start: what changed while no gateway of these roles watched, or a first note.)
            self.notes
                .get()
                .await?
                .query_one("SELECT sync._note_access($1)", &[&self.roles])
                .await?;
        }
        let epoch = view.epoch + u64::from(moved);
        let fresh = Arc::new(View {
            entities,
            serial: access.get(0),
            fingerprint,
            epoch,
            loaded_at: Instant::now(),
            read_began: began,
        });
        *self.view.write().expect("catalog lock") = fresh.clone();
        Ok(fresh)
    }
}

/// One digest of who may read every entity: when it moves, what was decided before may be
/// wrong now.
fn fingerprint(entities: &HashMap<String, Arc<Entity>>) -> String {
    let mut all: Vec<(&String, &String)> = entities.iter().map(|(c, e)| (c, &e.access)).collect();
    all.sort();
    short_digest(
        serde_json::to_string(&all)
            .expect("texts serialize")
            .as_bytes(),
    )
}

/// Whether `error` is `Entity::check_sql` finding the entity changed.
pub fn entity_changed(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|c| c.code() == "SY412")
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}
