//! What the gateway knows about tracked entities: their published columns (for filters and
//! `columns`) and whether row-level security is on. Read from `sync.tracked` and the catalog,
//! refreshed every few seconds and when a client names an entity not seen yet.

use deadpool_postgres::Pool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How stale the cached entities may get.
const REFRESH: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Entity {
    pub code: String,
    /// The columns that reach the log: the allow-list and the primary key, or all.
    pub columns: HashSet<String>,
    /// Row-level security is enabled on the table.
    pub rls: bool,
}

/// Tracked entities by code.
type Entities = Arc<HashMap<String, Arc<Entity>>>;

pub struct Catalog {
    pool: Pool,
    /// When the entities were read, and what was read.
    entities: RwLock<(Instant, Entities)>,
}

const ENTITIES_SQL: &str = "
SELECT t.entity_code, c.relrowsecurity,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = t.relid AND a.attnum > 0 AND NOT a.attisdropped
                AND (t.columns IS NULL OR a.attname = ANY (t.columns)
                     OR a.attnum = ANY ((SELECT i.indkey FROM pg_catalog.pg_index i
                                          WHERE i.indrelid = t.relid AND i.indisprimary)::int2[])))
  FROM sync.tracked t JOIN pg_catalog.pg_class c ON c.oid = t.relid";

impl Catalog {
    pub fn new(pool: Pool) -> Self {
        let stale = Instant::now() - REFRESH * 2;
        Catalog {
            pool,
            entities: RwLock::new((stale, Arc::new(HashMap::new()))),
        }
    }

    /// The entity named `code`, if it is tracked.
    pub async fn entity(&self, code: &str) -> Result<Option<Arc<Entity>>, CatalogError> {
        let (loaded_at, entities) = self.entities.read().expect("catalog lock").clone();
        match entities.get(code) {
            Some(entity) if loaded_at.elapsed() < REFRESH => Ok(Some(entity.clone())),
            // Unknown or stale: look again, at most once a second for unknown names.
            _ if loaded_at.elapsed() < Duration::from_secs(1) => Ok(entities.get(code).cloned()),
            _ => Ok(self.reload().await?.get(code).cloned()),
        }
    }

    async fn reload(&self) -> Result<Entities, CatalogError> {
        let client = self.pool.get().await?;
        let rows = client.query(ENTITIES_SQL, &[]).await?;
        let entities: HashMap<String, Arc<Entity>> = rows
            .iter()
            .map(|r| {
                let code: String = r.get(0);
                let columns: Vec<String> = r.get(2);
                let entity = Entity {
                    code: code.clone(),
                    rls: r.get(1),
                    columns: columns.into_iter().collect(),
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
