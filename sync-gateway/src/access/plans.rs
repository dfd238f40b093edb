//! How each role may read each tracked entity, as the extension says (`sync.policy_plan`):
//! whether it may SELECT at all, whether row-level security applies, and the compiled policy
//! when it has a simple shape. Cached per (entity, its tracking, role) for one catalog epoch
//! (`feed::catalog`): any change of who may read what (a policy, a grant, an owner, a role's
//! attributes or memberships, the table re-tracked) moves the epoch and empties the cache.

use crate::feed::catalog::Entity;
use pg_sync_core::policy::Expr;
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
    /// Why the role may not SELECT, as the extension says.
    pub why: Option<String>,
    /// The newest access event once it was read (`sync.access_serial()`): a page that saw
    /// an older one may be judged by policies newer than its own (`access::refetch`).
    pub read_at: i64,
}

impl Plan {
    fn from_json(plan: Value, entity: &Entity, read_at: i64) -> Plan {
        let plan: pg_sync_core::policy::Plan = serde_json::from_value(plan).unwrap_or_else(|e| {
            tracing::warn!(entity = entity.code, error = %e, "a policy plan did not parse");
            pg_sync_core::policy::Plan {
                why: Some("the gateway could not read this table's policies".into()),
                ..Default::default()
            }
        });
        let unpublished = plan
            .columns
            .into_iter()
            .find(|c| !entity.columns.contains(c));
        Plan {
            select: plan.select,
            rls: plan.rls,
            expr: plan.expr,
            unpublished,
            why: plan.why.filter(|_| !plan.select),
            read_at,
        }
    }

    /// Why the role can see nothing of the entity, if so.
    pub fn refusal(&self, entity: &Entity) -> Option<String> {
        if !self.select {
            return Some(match &self.why {
                Some(why) => format!("no read access to {}: {why}", entity.code),
                None => format!("no read access to {}", entity.code),
            });
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

/// Plans by (entity, its tracking, role).
type ByEntityAndRole = HashMap<(String, i64, String), Arc<Plan>>;

/// The cache, for one catalog epoch.
#[derive(Default)]
pub struct Plans {
    cache: Mutex<(u64, ByEntityAndRole)>,
}

impl Plans {
    fn key(entity: &Entity, role: &str) -> (String, i64, String) {
        (entity.code.clone(), entity.tracking, role.to_owned())
    }

    /// `role`'s plan for `entity` at catalog `epoch`, if cached.
    pub fn cached(&self, epoch: u64, entity: &Entity, role: &str) -> Option<Arc<Plan>> {
        let cache = self.cache.lock().expect("plans lock");
        (cache.0 == epoch)
            .then(|| cache.1.get(&Self::key(entity, role)).cloned())
            .flatten()
    }

    /// `role`'s plan for `entity` at catalog `epoch` (the epoch of the view `entity` comes
    /// from), read from the database when not cached. A plan read for an older epoch than the
    /// cache's is used but not kept. The first plan kept for an epoch stays: two reads racing
    /// a policy change within one epoch both get it, so that every judgement of the epoch
    /// (and the audience of a shared page, `access::sharing`) uses one plan.
    pub async fn get(
        &self,
        client: &Client,
        epoch: u64,
        entity: &Entity,
        role: &str,
    ) -> Result<Arc<Plan>, tokio_postgres::Error> {
        if let Some(plan) = self.cached(epoch, entity, role) {
            return Ok(plan);
        }
        let row = client
            .query_one("SELECT sync.policy_plan($1, $2)", &[&entity.relid, &role])
            .await?;
        // Read after the plan, in a later snapshot: at least as new as the policies it read.
        let read_at: i64 = client
            .query_one("SELECT sync.access_serial()", &[])
            .await?
            .get(0);
        let plan = Arc::new(Plan::from_json(row.get::<_, Value>(0), entity, read_at));
        let mut cache = self.cache.lock().expect("plans lock");
        if cache.0 < epoch {
            *cache = (epoch, HashMap::new());
        }
        if cache.0 == epoch {
            return Ok(cache
                .1
                .entry(Self::key(entity, role))
                .or_insert(plan)
                .clone());
        }
        Ok(plan)
    }
}
