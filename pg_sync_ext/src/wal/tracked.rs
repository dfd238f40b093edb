//! The tracked tables as the WAL path needs them: by table name, with the published
//! columns, the key and the owner whose rights type their values.

use super::enrich::Publication;
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use std::collections::HashMap;

/// A tracked table, as enrichment needs it.
pub struct Tracked {
    pub schema: String,
    /// `schema.table`, as the log names it.
    pub name: String,
    pub entity_code: String,
    pub schema_version: i32,
    /// `sync.tracked.tracking` when the change is ingested.
    pub tracking: i64,
    /// The published columns; None: all.
    pub published: Option<Vec<String>>,
    /// The primary key's columns in key order.
    pub key: Vec<String>,
    /// The table's owner: its values are typed with the owner's rights, not the
    /// extension's (type input functions, domain checks and casts to json are user code).
    pub owner: pg_sys::Oid,
}

impl Tracked {
    pub(super) fn publication(&self) -> Publication<'_> {
        Publication {
            columns: self.published.as_deref(),
            key: &self.key,
        }
    }
}

/// Tracked tables by table name (then schema).
#[derive(Default)]
pub struct TrackedTables(HashMap<String, Vec<Tracked>>);

impl TrackedTables {
    /// The tracked tables; `wal_only` keeps those tracked with WAL capture.
    pub(super) fn read(client: &SpiClient<'_>, wal_only: bool) -> Self {
        let rows = client
            .select(
                "SELECT schema_name, table_name, entity_code, schema_version, columns, key_columns,
                        owner, tracking
                   FROM sync.entities() WHERE NOT $1 OR capture = 'wal'",
                None,
                &[wal_only.into()],
            )
            .expect("reading sync.entities()");
        let mut tables = TrackedTables::default();
        for r in rows {
            let schema: String = r.get(1).unwrap().unwrap();
            let table: String = r.get(2).unwrap().unwrap();
            let tracked = Tracked {
                name: format!("{schema}.{table}"),
                schema,
                entity_code: r.get(3).unwrap().unwrap(),
                schema_version: r.get(4).unwrap().unwrap(),
                published: r.get(5).unwrap(),
                key: r.get(6).unwrap().unwrap_or_default(),
                owner: r.get(7).unwrap().unwrap(),
                tracking: r.get(8).unwrap().unwrap(),
            };
            tables.0.entry(table).or_default().push(tracked);
        }
        tables
    }

    pub(super) fn find(&self, schema: &str, table: &str) -> Option<&Tracked> {
        self.0.get(table)?.iter().find(|t| t.schema == schema)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (table, tracked) pairs.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Tracked)> {
        self.0
            .iter()
            .flat_map(|(table, all)| all.iter().map(move |t| (table.as_str(), t)))
    }

    pub(super) fn retain(&mut self, keep: impl Fn(&Tracked) -> bool) {
        for all in self.0.values_mut() {
            all.retain(&keep);
        }
        self.0.retain(|_, all| !all.is_empty());
    }
}
