//! The visibility stage, between the feed and the router (feed → visibility → router): it
//! judges each batch's changes for row-level security before the router, which does no I/O,
//! sees them (SPEC 2.2).
//!
//! A change is judged on its own row images, old and new, for each *group* of subscribers
//! to its entity (users sharing a role and claims), never on the table as it is now: so a
//! subscriber learns nothing of a row version it could not see, and a change arrives with
//! its own data. Per entity and role, the role's plan (`access::plans`) decides how:
//! - it may not read the entity: its groups are refused (their subscriptions end);
//! - row-level security does not apply to it: its groups see everything;
//! - the policy compiled: evaluated here, the groups indexed by their claims;
//! - else `sync.visible` evaluates it in the database, one call for all such groups.
//!
//! Commands that change who listens (connections, subscriptions) pass through this stage on
//! their way to the router, in order with the batches, so that every batch the router gets
//! after a subscription was judged for that subscriber's group.

use super::plans::{Plan, Plans};
use super::policy::GroupIndex;
use super::roles::{GroupId, Roles, UserContext};
use crate::deliver::router::Command;
use crate::feed::catalog::{Catalog, Entity};
use crate::feed::reader::Feed;
use crate::metrics::Metrics;
use crate::model::change::Change;
use crate::model::cursor::Cursor;
use crate::model::subscription::Sight;
use deadpool_postgres::Pool;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::Client;

/// A page of the log as the reader read it.
pub struct RawBatch {
    pub changes: Vec<Change>,
    pub end: Cursor,
    /// The read reached the end of the log: `end` is a batch boundary, what a replay can
    /// read up to. A full page ends inside a batch instead.
    pub complete: bool,
    /// The database's policy version when the page was read.
    pub policy_version: i64,
    /// When the read returned: the gateway's own share of a change's lag starts here.
    pub read_at: Instant,
}

/// Who may see the versions of one change of an entity with row-level security.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeSight {
    /// Groups that may see the row before the change, sorted.
    pub before: Vec<GroupId>,
    /// Groups that may see it after, sorted.
    pub after: Vec<GroupId>,
}

impl ChangeSight {
    pub fn of(sight: Option<&ChangeSight>, group: GroupId) -> Sight {
        match sight {
            None => Sight::ALL,
            Some(s) => Sight {
                before: s.before.binary_search(&group).is_ok(),
                after: s.after.binary_search(&group).is_ok(),
            },
        }
    }
}

/// A batch judged for every group listening.
pub struct JudgedBatch {
    pub changes: Vec<Arc<Change>>,
    /// Per change: None when every group listening to its entity sees it whole.
    pub sights: Vec<Option<Arc<ChangeSight>>>,
    /// (entity, group, why): groups that cannot read an entity of this batch; their
    /// subscriptions to it end with ERROR `forbidden`.
    pub refused: Vec<(String, GroupId, String)>,
    pub end: Cursor,
    pub complete: bool,
    pub read_at: Instant,
}

/// A group as its policies read it: a user of it (users of one group share role and claims).
pub type Group = Arc<UserContext>;

/// The groups listening to an entity, by role, as judging needs them; built again only when
/// the set changes (its `generation`).
pub struct Listeners {
    generation: u64,
    by_role: BTreeMap<String, Vec<(GroupId, Group)>>,
    /// Groups without a role, which read nothing.
    roleless: Vec<GroupId>,
}

impl Listeners {
    pub fn new(generation: u64, groups: impl IntoIterator<Item = (GroupId, Group)>) -> Listeners {
        let mut listeners = Listeners {
            generation,
            by_role: BTreeMap::new(),
            roleless: Vec::new(),
        };
        for (g, group) in groups {
            match group.role.clone() {
                Some(role) => listeners.by_role.entry(role).or_default().push((g, group)),
                None => listeners.roleless.push(g),
            }
        }
        listeners
    }
}

/// Judges changes of one entity for groups: the part replays share with the stage.
#[derive(Default)]
pub struct Judge {
    /// Compiled policies indexed over groups, per (entity, role), with what they were built
    /// for (the listeners' generation and the plan, held so that a newer plan can never be
    /// mistaken for it by its address).
    indexes: HashMap<(String, String), BuiltIndex>,
}

/// A compiled policy's index over groups: the listeners' generation and the plan it was
/// built for, and the index.
type BuiltIndex = (u64, Arc<Plan>, Arc<GroupIndex>);

/// What judging one entity's changes found.
pub struct EntityJudgement {
    /// Per change (in order), or None when every group sees everything.
    pub sights: Option<Vec<ChangeSight>>,
    pub refused: Vec<(GroupId, String)>,
}

impl Judge {
    /// Judges `changes` (all of `entity`) for the groups listening.
    pub async fn entity(
        &mut self,
        client: &Client,
        plans: &Plans,
        entity: &Entity,
        listeners: &Listeners,
        changes: &[&Change],
    ) -> EntityJudgement {
        let generation = listeners.generation;
        let mut refused: Vec<(GroupId, String)> = listeners
            .roleless
            .iter()
            .map(|g| (*g, format!("reading {} needs a role", entity.code)))
            .collect();
        let mut see_all: Vec<GroupId> = Vec::new();
        let mut indexed: Vec<Arc<GroupIndex>> = Vec::new();
        let mut in_database: Vec<(GroupId, &Group)> = Vec::new();
        for (role, members) in &listeners.by_role {
            let role = role.as_str();
            let plan = match plans.get(client, entity, role).await {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::warn!(entity = entity.code, role, error = %crate::ErrorChain(&e), "reading a policy plan failed");
                    let why = "the gateway could not read this table's policies; subscribe again";
                    refused.extend(members.iter().map(|(g, _)| (*g, why.to_owned())));
                    continue;
                }
            };
            if let Some(why) = plan.refusal(entity) {
                refused.extend(members.iter().map(|(g, _)| (*g, why.clone())));
            } else if !plan.rls {
                see_all.extend(members.iter().map(|(g, _)| *g));
            } else if let Some(expr) = &plan.expr {
                let key = (entity.code.clone(), role.to_owned());
                let index = match self.indexes.get(&key) {
                    Some((built_for, built_plan, index))
                        if *built_for == generation && Arc::ptr_eq(built_plan, &plan) =>
                    {
                        index.clone()
                    }
                    _ => {
                        let groups = members
                            .iter()
                            .map(|(g, group)| (*g, group.claims_json.clone()));
                        let index = Arc::new(GroupIndex::new(expr.clone(), groups));
                        self.indexes
                            .insert(key, (generation, plan.clone(), index.clone()));
                        index
                    }
                };
                refused.extend(index.failed.iter().map(|(g, e)| {
                    (
                        *g,
                        format!(
                            "a row-level-security policy of {} failed for you: {e}",
                            entity.code
                        ),
                    )
                }));
                indexed.push(index);
            } else {
                in_database.extend(members.iter().map(|(g, group)| (*g, group)));
            }
        }
        if indexed.is_empty() && in_database.is_empty() {
            return EntityJudgement {
                sights: None,
                refused,
            };
        }
        // The images to judge: each change's old and new row, where it has them.
        let images: Vec<&serde_json::Map<String, Value>> = changes
            .iter()
            .flat_map(|c| [c.old_data.as_ref(), c.data.as_ref()])
            .flatten()
            .collect();
        let mut database_sees: Vec<Vec<GroupId>> = vec![Vec::new(); images.len()];
        if !in_database.is_empty() {
            match visible_in_database(client, entity, &in_database, &images).await {
                Ok(answers) => {
                    for ((g, _), answer) in in_database.iter().zip(answers) {
                        match answer {
                            Ok(bits) => {
                                for (i, seen) in bits.into_iter().enumerate() {
                                    if seen {
                                        database_sees[i].push(*g);
                                    }
                                }
                            }
                            Err(why) => refused.push((
                                *g,
                                format!(
                                    "a row-level-security policy of {} failed for you: {why}",
                                    entity.code
                                ),
                            )),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(entity = entity.code, error = %crate::ErrorChain(&e), "judging rows in the database failed");
                    let why = "the gateway could not judge this table's rows; subscribe again";
                    refused.extend(in_database.iter().map(|(g, _)| (*g, why.to_owned())));
                }
            }
        }
        let mut at = 0;
        let mut seen_by = |image: Option<&serde_json::Map<String, Value>>| -> Vec<GroupId> {
            let Some(image) = image else {
                return Vec::new();
            };
            let mut groups: Vec<GroupId> = see_all.clone();
            for index in &indexed {
                groups.extend(index.visible(image));
            }
            groups.append(&mut database_sees[at]);
            at += 1;
            groups.sort_unstable();
            groups.dedup();
            groups
        };
        let sights = changes
            .iter()
            .map(|c| {
                let before = seen_by(c.old_data.as_ref());
                let after = seen_by(c.data.as_ref());
                ChangeSight { before, after }
            })
            .collect();
        EntityJudgement {
            sights: Some(sights),
            refused,
        }
    }
}

/// `sync.visible` for `groups` over `images`: per group, a bit per image, or why it failed.
async fn visible_in_database(
    client: &Client,
    entity: &Entity,
    groups: &[(GroupId, &Group)],
    images: &[&serde_json::Map<String, Value>],
) -> Result<Vec<Result<Vec<bool>, String>>, tokio_postgres::Error> {
    let groups_json: Vec<Value> = groups
        .iter()
        .map(|(_, g)| json!({"role": g.role, "claims": g.claims_json}))
        .collect();
    let images_json = Value::Array(images.iter().map(|i| Value::Object((*i).clone())).collect());
    let row = client
        .query_one(
            "SELECT sync.visible($1::text::regclass, $2, $3)",
            &[&entity.table, &Value::Array(groups_json), &images_json],
        )
        .await?;
    let answers: Value = row.get(0);
    Ok(answers
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| match a.get("visible").and_then(Value::as_array) {
            Some(bits) => Ok(bits.iter().map(|b| b.as_bool() == Some(true)).collect()),
            None => Err(a["error"].as_str().unwrap_or("unknown error").to_owned()),
        })
        .collect())
}

/// Who listens to what, as the commands passing through show it.
#[derive(Default)]
struct Registry {
    /// Connection → its group, and the group's details.
    connections: HashMap<u64, (GroupId, Group)>,
    /// Entity → group → the connections of the group subscribed to it.
    listening: HashMap<String, BTreeMap<GroupId, HashSet<u64>>>,
    /// Entity → a number that changes whenever its set of groups does.
    generations: HashMap<String, u64>,
    next_generation: u64,
    /// The listeners of each entity as last built, for their generation.
    built: HashMap<String, Arc<Listeners>>,
}

impl Registry {
    fn observe(&mut self, command: &Command) {
        match command {
            Command::Connect(c) => {
                self.connections.insert(c.id, (c.group, c.user.clone()));
            }
            Command::Reauth { conn, user, group } => {
                let old = self.connections.insert(*conn, (*group, user.clone()));
                if let Some((old_group, _)) = old {
                    let entities: Vec<String> = self
                        .listening
                        .iter()
                        .filter(|(_, groups)| {
                            groups.get(&old_group).is_some_and(|c| c.contains(conn))
                        })
                        .map(|(e, _)| e.clone())
                        .collect();
                    for entity in entities {
                        self.forget(&entity, *conn);
                        self.listen(&entity, *group, *conn);
                    }
                }
            }
            Command::Subscribe(s) => {
                if let Some((group, _)) = self.connections.get(&s.conn) {
                    let group = *group;
                    self.listen(&s.subscription.entity_code, group, s.conn);
                }
            }
            Command::Unsubscribe {
                conn,
                entity_code,
                entity_ids: None,
            } => self.forget(entity_code, *conn),
            Command::UnsubscribeAll(conn) => self.forget_everywhere(*conn),
            Command::Disconnect(conn) => {
                self.forget_everywhere(*conn);
                self.connections.remove(conn);
            }
            _ => {}
        }
    }

    fn listen(&mut self, entity: &str, group: GroupId, conn: u64) {
        let groups = self.listening.entry(entity.to_owned()).or_default();
        let conns = groups.entry(group).or_default();
        if conns.is_empty() {
            self.next_generation += 1;
            self.generations
                .insert(entity.to_owned(), self.next_generation);
        }
        conns.insert(conn);
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
            self.next_generation += 1;
            self.generations
                .insert(entity.to_owned(), self.next_generation);
        }
    }

    fn forget_everywhere(&mut self, conn: u64) {
        let entities: Vec<String> = self.listening.keys().cloned().collect();
        for entity in entities {
            self.forget(&entity, conn);
        }
    }

    /// The groups listening to `entity`, built again only when they changed.
    fn listeners(&mut self, entity: &str) -> Option<Arc<Listeners>> {
        let groups = self.listening.get(entity).filter(|g| !g.is_empty())?;
        let generation = self.generations.get(entity).copied().unwrap_or(0);
        if let Some(built) = self
            .built
            .get(entity)
            .filter(|b| b.generation == generation)
        {
            return Some(built.clone());
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

    /// `group` no longer reads `entity`: the router ends its subscriptions.
    fn refuse(&mut self, entity: &str, group: GroupId) {
        if let Some(groups) = self.listening.get_mut(entity) {
            if groups.remove(&group).is_some() {
                self.next_generation += 1;
                self.generations
                    .insert(entity.to_owned(), self.next_generation);
            }
        }
    }
}

/// The stage's task.
pub struct Stage {
    pub pool: Pool,
    pub catalog: Arc<Catalog>,
    pub plans: Arc<Plans>,
    pub roles: Arc<Roles>,
    pub metrics: Arc<Metrics>,
    pub router: mpsc::Sender<Command>,
}

impl Stage {
    /// Passes commands on (first: a disconnect never waits behind a backlog) and judges
    /// batches, until both inputs are closed.
    pub async fn run(
        self,
        mut control: mpsc::Receiver<Command>,
        mut batches: mpsc::Receiver<Feed>,
    ) {
        let mut registry = Registry::default();
        let mut judge = Judge::default();
        let (mut control_open, mut batches_open) = (true, true);
        while control_open || batches_open {
            let command = tokio::select! {
                biased;
                command = control.recv(), if control_open => match command {
                    Some(command) => {
                        registry.observe(&command);
                        command
                    }
                    None => {
                        control_open = false;
                        continue;
                    }
                },
                feed = batches.recv(), if batches_open => match feed {
                    Some(Feed::Batch(batch)) => Command::Batch(Arc::new(self.judge(&mut registry, &mut judge, batch).await)),
                    Some(Feed::Reset(position)) => Command::Reset(position),
                    None => {
                        batches_open = false;
                        continue;
                    }
                },
            };
            if self.router.send(command).await.is_err() {
                return;
            }
        }
    }

    async fn judge(
        &self,
        registry: &mut Registry,
        judge: &mut Judge,
        batch: RawBatch,
    ) -> JudgedBatch {
        self.plans
            .at_version((batch.policy_version, self.roles.epoch()));
        let changes: Vec<Arc<Change>> = batch.changes.into_iter().map(Arc::new).collect();
        let mut sights: Vec<Option<Arc<ChangeSight>>> = vec![None; changes.len()];
        let mut refused = Vec::new();
        let mut by_entity: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, c) in changes.iter().enumerate() {
            by_entity.entry(c.entity_code.as_str()).or_default().push(i);
        }
        let mut client = None;
        for (code, at) in by_entity {
            let Some(listeners) = registry.listeners(code) else {
                continue;
            };
            let Some(entity) = self.catalog.cached(code) else {
                // Listened to but no longer known (untracked meanwhile): nobody is shown rows
                // that cannot be judged. (No sight at all would mean everyone sees them.)
                for i in at {
                    sights[i] = Some(Arc::new(ChangeSight::default()));
                }
                continue;
            };
            if client.is_none() {
                client = match self.pool.get().await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "no connection to judge row-level security");
                        None
                    }
                };
            }
            let judgement = match &client {
                Some(client) => {
                    let of_entity: Vec<&Change> = at.iter().map(|&i| &*changes[i]).collect();
                    judge
                        .entity(client, &self.plans, &entity, &listeners, &of_entity)
                        .await
                }
                None => EntityJudgement {
                    sights: Some(vec![ChangeSight::default(); at.len()]),
                    refused: listeners
                        .by_role
                        .values()
                        .flatten()
                        .map(|(g, _)| *g)
                        .chain(listeners.roleless.iter().copied())
                        .map(|g| {
                            let why =
                                "the gateway could not judge this table's rows; subscribe again";
                            (g, why.to_owned())
                        })
                        .collect(),
                },
            };
            if let Some(entity_sights) = judgement.sights {
                self.metrics.rls_checks.inc();
                for (i, sight) in at.into_iter().zip(entity_sights) {
                    sights[i] = Some(Arc::new(sight));
                }
            }
            for (group, why) in judgement.refused {
                registry.refuse(code, group);
                refused.push((code.to_owned(), group, why));
            }
        }
        JudgedBatch {
            changes,
            sights,
            refused,
            end: batch.end,
            complete: batch.complete,
            read_at: batch.read_at,
        }
    }
}
