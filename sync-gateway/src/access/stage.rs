//! The visibility stage, between the feed and the router (feed → stage → router): it judges
//! each page the reader hands on (`access::judge`) before the router, which does no I/O,
//! sees it, and tells the router of entities replaced under their code.
//!
//! Commands that change who listens (connections, subscriptions) pass through this stage on
//! their way to the router, in order with the batches, so that every batch the router gets
//! after a subscription was judged for that subscriber's group. The stage does not know the
//! router's commands: it is generic over them (`Passing`), reading only who listens to what.

use super::judge::{Db, Judge, JudgedPage};
use super::listeners::{Audience, Listeners};
use super::plans::Plans;
use super::roles::{GroupId, UserContext};
use crate::feed::catalog::{Catalog, View};
use crate::feed::reader::{Batch, Feed};
use crate::metrics::Metrics;
use crate::model::change::Change;
use crate::model::cursor::Cursor;
use deadpool_postgres::Pool;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A page of the live stream, judged for every group listening.
pub struct JudgedBatch {
    pub page: JudgedPage,
    pub end: Cursor,
    /// The read reached the end of the log: `end` is a batch boundary, where a replay can
    /// end. A full page ends inside a batch instead.
    pub complete: bool,
    /// When the read returned: the gateway's own share of a change's lag starts here.
    pub read_at: Instant,
}

/// What the stage hands the router, besides the commands it passes through.
pub enum Staged {
    Batch(Arc<JudgedBatch>),
    /// The reader lost its place (its cursor expired): everyone resynchronises.
    Reset(Cursor),
    /// These entities were untracked, tracked again or replaced by another table: their
    /// subscribers hold another table's rows, and refetch.
    Replaced(Vec<String>),
    /// This subscription was checked against a table no longer tracked under its code
    /// (replaced while the check, or the wait for its cursor, was under way): it is not
    /// passed on, and the connection refetches.
    Outdated {
        conn: u64,
        entity_code: String,
    },
}

/// What a command passing through says about who listens.
pub enum Listening<'a> {
    Connect {
        conn: u64,
        group: GroupId,
        user: &'a Arc<UserContext>,
    },
    Reauth {
        conn: u64,
        group: GroupId,
        user: &'a Arc<UserContext>,
    },
    Subscribe {
        conn: u64,
        entity: &'a str,
        /// The entity's tracking the subscription was checked against.
        tracking: i64,
    },
    /// Every subscription of the connection to the entity ends.
    Unsubscribe {
        conn: u64,
        entity: &'a str,
    },
    UnsubscribeAll(u64),
    Disconnect(u64),
}

/// The router's commands, as the stage sees them.
pub trait Passing: From<Staged> + Send + 'static {
    fn listening(&self) -> Option<Listening<'_>>;
}

/// Who listens to what, as the commands passing through show it.
#[derive(Default)]
struct Registry {
    /// Connection → its group, and the group's details.
    connections: HashMap<u64, (GroupId, Arc<UserContext>)>,
    /// Entity → group → the connections of the group subscribed to it.
    listening: HashMap<String, BTreeMap<GroupId, HashSet<u64>>>,
    /// Entity → a number that changes whenever its set of groups does.
    generations: HashMap<String, u64>,
    next_generation: u64,
    /// The listeners of each entity as last built, for their generation.
    built: HashMap<String, Arc<Listeners>>,
}

impl Registry {
    fn observe(&mut self, event: Listening<'_>) {
        match event {
            Listening::Connect { conn, group, user } => {
                self.connections.insert(conn, (group, user.clone()));
            }
            Listening::Reauth { conn, group, user } => {
                let old = self.connections.insert(conn, (group, user.clone()));
                if let Some((old_group, _)) = old {
                    let entities: Vec<String> = self
                        .listening
                        .iter()
                        .filter(|(_, groups)| {
                            groups.get(&old_group).is_some_and(|c| c.contains(&conn))
                        })
                        .map(|(e, _)| e.clone())
                        .collect();
                    for entity in entities {
                        self.forget(&entity, conn);
                        self.listen(&entity, group, conn);
                    }
                }
            }
            Listening::Subscribe { conn, entity, .. } => {
                if let Some((group, _)) = self.connections.get(&conn) {
                    let group = *group;
                    self.listen(entity, group, conn);
                }
            }
            Listening::Unsubscribe { conn, entity } => self.forget(entity, conn),
            Listening::UnsubscribeAll(conn) => self.forget_everywhere(conn),
            Listening::Disconnect(conn) => {
                self.forget_everywhere(conn);
                self.connections.remove(&conn);
            }
        }
    }

    fn changed(&mut self, entity: &str) {
        self.next_generation += 1;
        self.generations
            .insert(entity.to_owned(), self.next_generation);
    }

    fn listen(&mut self, entity: &str, group: GroupId, conn: u64) {
        let groups = self.listening.entry(entity.to_owned()).or_default();
        let conns = groups.entry(group).or_default();
        let new_group = conns.is_empty();
        conns.insert(conn);
        if new_group {
            self.changed(entity);
        }
    }

    fn forget(&mut self, entity: &str, conn: u64) {
        let Some(groups) = self.listening.get_mut(entity) else {
            return;
        };
        let before = groups.len();
        groups.retain(|_, conns| {
            conns.remove(&conn);
            !conns.is_empty()
        });
        if groups.len() != before {
            self.changed(entity);
        }
    }

    fn forget_everywhere(&mut self, conn: u64) {
        let entities: Vec<String> = self.listening.keys().cloned().collect();
        for entity in entities {
            self.forget(&entity, conn);
        }
    }

    /// `group` no longer reads `entity`: the router ends its subscriptions.
    fn refuse(&mut self, entity: &str, group: GroupId) {
        if let Some(groups) = self.listening.get_mut(entity) {
            if groups.remove(&group).is_some() {
                self.changed(entity);
            }
        }
    }

    /// Nobody listens to `entity` any more (it was replaced: its subscriptions end).
    fn drop_entity(&mut self, entity: &str) {
        if self.listening.remove(entity).is_some() {
            self.changed(entity);
        }
    }

    /// These entities were replaced: nobody listens to them here, and the router is told
    /// (None when there are none).
    fn replaced(&mut self, codes: Vec<String>) -> Option<Staged> {
        codes.iter().for_each(|code| self.drop_entity(code));
        (!codes.is_empty()).then_some(Staged::Replaced(codes))
    }
}

impl Audience for Registry {
    /// The groups listening to `entity`, built again only when they changed.
    fn listeners(&mut self, entity: &str) -> Option<Arc<Listeners>> {
        let groups = self.listening.get(entity).filter(|g| !g.is_empty())?;
        let generation = self.generations.get(entity).copied().unwrap_or(0);
        if let Some(built) = self.built.get(entity) {
            if built.generation() == generation {
                return Some(built.clone());
            }
        }
        let details = groups.iter().filter_map(|(g, conns)| {
            let conn = conns.iter().next()?;
            let (_, group) = self.connections.get(conn)?;
            Some((*g, group.clone()))
        });
        let built = Arc::new(Listeners::new(generation, details));
        self.built.insert(entity.to_owned(), built.clone());
        Some(built)
    }
}

/// The catalog as the stage handed it on: the replacements since `seen` are not handed on
/// yet. Every tracking a subscription passed on was checked against is in `seen`, so that
/// its replacement is found.
struct Handed {
    seen: Arc<View>,
}

/// A subscription checked against a table no longer tracked under its code.
#[derive(Debug, PartialEq)]
struct Outdated;

impl Handed {
    /// The entities `view` no longer has as `seen` had them, now handed on.
    fn replacements(&mut self, view: Arc<View>) -> Vec<String> {
        let replaced = if view.epoch != self.seen.epoch {
            view.replaced_since(&self.seen)
        } else {
            vec![]
        };
        self.seen = view;
        replaced
    }

    /// Whether a subscription checked against `entity` as `tracking` passes, `view` being
    /// the catalog now (at least as new as the one it was checked against, and as `seen`),
    /// and the replacements to hand on before it. Checked against an older catalog than
    /// `seen`, whose replacements were handed on, it would never end; against a newer one,
    /// a replacement compared with `seen`, which lacks its tracking, would not be found.
    fn subscription(
        &mut self,
        view: Arc<View>,
        entity: &str,
        tracking: i64,
    ) -> Result<Vec<String>, Outdated> {
        if !view.tracks(entity, tracking) {
            return Err(Outdated);
        }
        Ok(self.replacements(view))
    }
}

/// The stage's task.
pub struct Stage {
    /// Policies judged in the database (`--visibility-pool-size`).
    pub pool: Pool,
    pub catalog: Arc<Catalog>,
    pub plans: Arc<Plans>,
    pub metrics: Arc<Metrics>,
}

impl Stage {
    /// Passes commands on (first: a disconnect never waits behind a backlog) and judges
    /// batches, until both inputs are closed.
    pub async fn run<C: Passing>(
        self,
        mut control: mpsc::Receiver<C>,
        mut batches: mpsc::Receiver<Feed>,
        router: mpsc::Sender<C>,
    ) {
        let mut registry = Registry::default();
        let mut judge = Judge::default();
        let mut handed = Handed {
            seen: self.catalog.view(),
        };
        let (mut control_open, mut batches_open) = (true, true);
        while control_open || batches_open {
            let out: Vec<C> = tokio::select! {
                biased;
                command = control.recv(), if control_open => match command {
                    Some(command) => match command.listening() {
                        Some(Listening::Subscribe { conn, entity, tracking }) => {
                            match handed.subscription(self.catalog.view(), entity, tracking) {
                                Ok(replaced) => {
                                    let replaced = registry.replaced(replaced).map(Into::into);
                                    registry.observe(Listening::Subscribe { conn, entity, tracking });
                                    replaced.into_iter().chain([command]).collect()
                                }
                                Err(Outdated) => {
                                    let entity_code = entity.to_owned();
                                    vec![Staged::Outdated { conn, entity_code }.into()]
                                }
                            }
                        }
                        Some(event) => {
                            registry.observe(event);
                            vec![command]
                        }
                        None => vec![command],
                    },
                    None => {
                        control_open = false;
                        continue;
                    }
                },
                feed = batches.recv(), if batches_open => match feed {
                    Some(Feed::Batch(batch)) => {
                        let judged = self.judge(&mut registry, &mut judge, batch).await;
                        // Entities replaced since the last batch: their subscribers refetch,
                        // before anything of this batch reaches them.
                        let view = self.catalog.view();
                        self.metrics.access_epoch.set(view.epoch as i64);
                        let replaced = registry.replaced(handed.replacements(view));
                        replaced.into_iter().chain([Staged::Batch(Arc::new(judged))]).map(Into::into).collect()
                    }
                    Some(Feed::Reset(position)) => vec![Staged::Reset(position).into()],
                    None => {
                        batches_open = false;
                        continue;
                    }
                },
            };
            for command in out {
                if router.send(command).await.is_err() {
                    return;
                }
            }
        }
    }

    async fn judge(&self, registry: &mut Registry, judge: &mut Judge, batch: Batch) -> JudgedBatch {
        let changes: Vec<Arc<Change>> = batch.changes.into_iter().map(Arc::new).collect();
        let mut db = Db::Pool(&self.pool, None);
        let page = match judge
            .page(
                &self.catalog,
                &self.plans,
                &mut db,
                batch.access_serial,
                changes.clone(),
                registry,
            )
            .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %crate::ErrorChain(&e), "a page could not be judged");
                let why = "the gateway could not read who may read this table; subscribe again";
                Judge::unjudged(changes, registry, why)
            }
        };
        if page.judged_rls {
            self.metrics.rls_checks.inc();
        }
        for (entity, group, _) in &page.refused {
            registry.refuse(entity, *group);
        }
        JudgedBatch {
            page,
            end: batch.end,
            complete: batch.complete,
            read_at: batch.read_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_checked_against_a_replaced_table_is_outdated() {
        let mut handed = Handed {
            seen: Arc::new(View::of(1, &[("task", 7)])),
        };
        let retracked = Arc::new(View::of(2, &[("task", 8)]));
        assert_eq!(
            handed.subscription(retracked.clone(), "task", 7),
            Err(Outdated)
        );
        // Checked against the new table: passes, after the old one's replacement.
        assert_eq!(
            handed.subscription(retracked, "task", 8),
            Ok(vec!["task".to_owned()])
        );
        let untracked = Arc::new(View::of(3, &[]));
        assert_eq!(handed.subscription(untracked, "task", 8), Err(Outdated));
    }

    /// Fails when a subscription passes without `seen` moving to the catalog it passed
    /// against: the entity, tracked after `seen`, is untracked before the next batch.
    #[test]
    fn the_replacement_of_a_table_tracked_after_the_last_batch_is_found() {
        let mut handed = Handed {
            seen: Arc::new(View::of(1, &[])),
        };
        let tracked = Arc::new(View::of(2, &[("task", 7)]));
        assert_eq!(handed.subscription(tracked, "task", 7), Ok(vec![]));
        let untracked = Arc::new(View::of(3, &[]));
        assert_eq!(handed.replacements(untracked), ["task"]);
    }
}
