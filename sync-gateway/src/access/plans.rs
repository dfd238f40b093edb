//! How each role may read each tracked entity, as the extension says (`sync.policy_plan`):
//! whether it may SELECT at all, whether row-level security applies, and the compiled policy
//! when it has a simple shape. Cached per (entity, role) until the database's policy version
//! moves (an event trigger bumps it on CREATE/ALTER/DROP POLICY, GRANT, REVOKE and ALTER
//! TABLE; the reader reads it with each page) or roles change (checked every few seconds).

use super::policy::Expr;
use crate::feed::catalog::Entity;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio_postgres::Client;

/// A role's reads of one entity.
#[derive(Debug)]
pub struct Plan {
    /// The role may SELECT the table at all.
    pub select: bool,
    /// Row-level security applies to the role (not the owner, not BYPASSRLS, RLS enabled).
    pub rls: bool,
    /// The policy compiled, when it could be; else it is evaluated by the database.
    pub expr: Option<Expr>,
    /// A column the policy reads that is not published: row images cannot be judged.
    pub unpublished: Option<String>,
}

impl Plan {
    fn from_json(plan: &Value, entity: &Entity) -> Plan {
        let unpublished = plan["columns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|c| !entity.columns.contains(*c))
            .map(str::to_owned);
        let expr = plan.get("expr").filter(|e| !e.is_null()).and_then(|e| {
            Expr::from_json(e)
                .map_err(|why| tracing::warn!(entity = entity.code, %why, "a compiled policy did not parse"))
                .ok()
        });
        Plan {
            select: plan["select"].as_bool().unwrap_or(false),
            rls: plan["rls"].as_bool().unwrap_or(true),
            expr,
            unpublished,
        }
    }

    /// Why the role can see nothing of the entity, if so.
    pub fn refusal(&self, entity: &Entity) -> Option<String> {
        if !self.select {
            return Some(format!("no read access to {}", entity.code));
        }
        self.unpublished
            .as_ref()
            .filter(|_| self.rls)
            .map(|column| {
                format!(
                    "a row-level-security policy of {} reads {column}, which is not published: \
                 rows cannot be judged",
                    entity.code
                )
            })
    }
}

/// The policy version and the roles' epoch that plans are of.
type Version = (i64, u64);

/// Plans by (entity, role).
type ByEntityAndRole = HashMap<(String, String), Arc<Plan>>;

/// The cache.
#[derive(Default)]
pub struct Plans {
    cache: Mutex<(Version, ByEntityAndRole)>,
}

impl Plans {
    /// The plans are of `version` (the database's policy version and the roles' epoch) from
    /// now on: older ones are dropped.
    pub fn at_version(&self, version: Version) {
        let mut cache = self.cache.lock().expect("plans lock");
        if cache.0 != version {
            *cache = (version, HashMap::new());
        }
    }

    /// `role`'s plan for `entity`, if cached.
    pub fn cached(&self, entity: &Entity, role: &str) -> Option<Arc<Plan>> {
        let cache = self.cache.lock().expect("plans lock");
        cache
            .1
            .get(&(entity.code.clone(), role.to_owned()))
            .cloned()
    }

    /// `role`'s plan for `entity`, read from the database when not cached.
    pub async fn get(
        &self,
        client: &Client,
        entity: &Entity,
        role: &str,
    ) -> Result<Arc<Plan>, tokio_postgres::Error> {
        let key = (entity.code.clone(), role.to_owned());
        let version = {
            let cache = self.cache.lock().expect("plans lock");
            if let Some(plan) = cache.1.get(&key) {
                return Ok(plan.clone());
            }
            cache.0
        };
        let row = client
            .query_one(
                "SELECT sync.policy_plan($1::text::regclass, $2)",
                &[&entity.table, &role],
            )
            .await?;
        let plan = Arc::new(Plan::from_json(&row.get::<_, Value>(0), entity));
        let mut cache = self.cache.lock().expect("plans lock");
        if cache.0 == version {
            cache.1.insert(key, plan.clone());
        }
        Ok(plan)
    }
}
