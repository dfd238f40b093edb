//! What the gateway knows about tracked entities: their table, primary key and published
//! columns (for filters, `columns`, snapshots and writes) and whether row-level security is
//! on. Read from `sync.tracked` and the catalog, refreshed every few seconds and when a
//! client names an entity not seen yet.
//!
//! Every identifier that reaches SQL built by the gateway comes from here, quoted here.

use deadpool_postgres::Pool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How stale the cached entities may get.
const REFRESH: Duration = Duration::from_secs(2);
/// How often a name not in the catalog may make it read again.
const MISS_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct Entity {
    pub code: String,
    /// The table, schema-qualified and quoted: `"app"."task"`.
    pub table: String,
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
    /// `sync.tracked.schema_version`: a change captured under a newer one means the table
    /// was altered since this was read (ENABLE ROW LEVEL SECURITY is an ALTER TABLE too).
    pub schema_version: i32,
}

impl Entity {
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

/// Tracked entities by code.
type Entities = Arc<HashMap<String, Arc<Entity>>>;

pub struct Catalog {
    pool: Pool,
    /// When the entities were read, and what was read.
    entities: RwLock<(Instant, Entities)>,
    /// Held while re-reading, so that concurrent misses share one read.
    reloading: tokio::sync::Mutex<()>,
}

const ENTITIES_SQL: &str = "
SELECT t.entity_code, c.relrowsecurity, n.nspname::text, c.relname::text, t.schema_version,
       ARRAY(SELECT a.attname::text FROM unnest(k.indkey::int2[]) WITH ORDINALITY u(attnum, o)
               JOIN pg_catalog.pg_attribute a ON a.attrelid = t.relid AND a.attnum = u.attnum
              ORDER BY u.o),
       ARRAY(SELECT pg_catalog.format_type(a.atttypid, a.atttypmod)
               FROM unnest(k.indkey::int2[]) WITH ORDINALITY u(attnum, o)
               JOIN pg_catalog.pg_attribute a ON a.attrelid = t.relid AND a.attnum = u.attnum
              ORDER BY u.o),
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = t.relid AND a.attnum > 0 AND NOT a.attisdropped
                AND (t.columns IS NULL OR a.attname = ANY (t.columns) OR a.attnum = ANY (k.indkey::int2[]))),
       t.columns IS NOT NULL
  FROM sync.tracked t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_index k ON k.indrelid = t.relid AND k.indisprimary";

impl Catalog {
    pub fn new(pool: Pool) -> Self {
        let stale = Instant::now() - REFRESH * 2;
        Catalog {
            pool,
            entities: RwLock::new((stale, Arc::new(HashMap::new()))),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Re-reads the entities every few seconds, so that routing (which uses `cached`) sees
    /// row-level security switched on or off and tables tracked or altered.
    pub async fn refresh(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.reload().await {
                        tracing::warn!(error = %crate::ErrorChain(&e), "reading tracked entities failed");
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// The entity named `code` as last read, without going to the database.
    pub fn cached(&self, code: &str) -> Option<Arc<Entity>> {
        self.entities
            .read()
            .expect("catalog lock")
            .1
            .get(code)
            .cloned()
    }

    /// The entity named `code`, if it is tracked. Clients name entities: an unknown name
    /// reads the catalog again (perhaps it was tracked a moment ago), but the reads of misses
    /// are at least `MISS_INTERVAL` apart and shared by every miss waiting for them, so that
    /// names made up in a flood cost the feed's pool one read per interval.
    pub async fn entity(&self, code: &str) -> Result<Option<Arc<Entity>>, CatalogError> {
        let (loaded_at, entities) = self.entities.read().expect("catalog lock").clone();
        if let Some(entity) = entities.get(code).filter(|_| loaded_at.elapsed() < REFRESH) {
            return Ok(Some(entity.clone()));
        }
        tokio::time::sleep_until((loaded_at + MISS_INTERVAL).into()).await;
        // Unknown (perhaps tracked a moment ago) or stale: read again, unless another caller
        // did while this one waited for the lock.
        let _reloading = self.reloading.lock().await;
        let (now_loaded_at, entities) = self.entities.read().expect("catalog lock").clone();
        if now_loaded_at > loaded_at {
            return Ok(entities.get(code).cloned());
        }
        Ok(self.reload().await?.get(code).cloned())
    }

    /// Reads the entities again now, unless a change's schema version shows nothing is new.
    pub async fn refresh_for(&self, code: &str, schema_version: i32) {
        if self
            .cached(code)
            .is_some_and(|e| e.schema_version < schema_version)
        {
            let _reloading = self.reloading.lock().await;
            if self
                .cached(code)
                .is_some_and(|e| e.schema_version < schema_version)
            {
                if let Err(e) = self.reload().await {
                    tracing::warn!(error = %crate::ErrorChain(&e), "reading tracked entities failed");
                }
            }
        }
    }

    async fn reload(&self) -> Result<Entities, CatalogError> {
        let client = self.pool.get().await?;
        let rows = client.query(ENTITIES_SQL, &[]).await?;
        let entities: HashMap<String, Arc<Entity>> = rows
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
                };
                (code, Arc::new(entity))
            })
            .collect();
        let entities = Arc::new(entities);
        *self.entities.write().expect("catalog lock") = (Instant::now(), entities.clone());
        Ok(entities)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}
