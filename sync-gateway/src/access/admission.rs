//! Whether a user may read an entity at all (subscribing, snapshots): it is tracked, the user
//! acts as a role, and that role may SELECT it with every column its policies read
//! published. Answered from the plans cache, so an admission rarely asks the database.

use super::limits::{Busy, ClientWork};
use super::plans::{Plan, Plans};
use super::roles::UserContext;
use crate::feed::catalog::{Catalog, Entity};
use std::sync::Arc;
use tokio_postgres::error::SqlState;

/// Why a user may not read an entity.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is not a tracked entity")]
    Unknown(String),
    #[error("reading {0} needs a role, and the token names none (and there is no default role)")]
    NoRole(String),
    #[error("{0}")]
    NoAccess(String),
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The catalog or the database could not answer.
    #[error("{0}")]
    Failed(String),
}

/// The entity `code`, if `user` may read it.
pub async fn readable_entity(
    catalog: &Catalog,
    plans: &Plans,
    work: &ClientWork,
    user: &UserContext,
    code: &str,
) -> Result<Arc<Entity>, Refusal> {
    Ok(readable(catalog, plans, work, user, code).await?.entity)
}

/// An entity a user may read, with how: the role's plan, read at catalog `epoch` (what
/// decides who shares a cached page, `access::sharing`).
pub struct Readable {
    pub entity: Arc<Entity>,
    pub plan: Arc<Plan>,
    pub epoch: u64,
}

/// The entity `code` and the plan `user` reads it by, if `user` may read it.
pub async fn readable(
    catalog: &Catalog,
    plans: &Plans,
    work: &ClientWork,
    user: &UserContext,
    code: &str,
) -> Result<Readable, Refusal> {
    let failed = |e: &dyn std::error::Error| Refusal::Failed(crate::ErrorChain(e).to_string());
    // A table dropped since the catalog was read (replaced under the same code) is looked
    // up once more, in a catalog read now.
    let mut reloaded = false;
    loop {
        let entity = catalog
            .entity(code)
            .await
            .map_err(|e| failed(&e))?
            .ok_or_else(|| Refusal::Unknown(code.to_owned()))?;
        let Some(role) = &user.role else {
            return Err(Refusal::NoRole(entity.code.clone()));
        };
        let view = catalog.view();
        let epoch = view.epoch;
        let plan = match plans.cached(epoch, &entity, role) {
            Some(plan) => plan,
            None => {
                let work = work.start(&user.sub).await?;
                match plans.get(&work.client, epoch, &entity, role).await {
                    Ok(plan) => plan,
                    Err(e) if !reloaded && e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
                        reloaded = true;
                        catalog.reload().await.map_err(|e| failed(&e))?;
                        continue;
                    }
                    Err(e) => return Err(failed(&e)),
                }
            }
        };
        return match plan.refusal(&entity) {
            Some(why) => Err(Refusal::NoAccess(why)),
            None => Ok(Readable {
                entity,
                plan,
                epoch,
            }),
        };
    }
}
