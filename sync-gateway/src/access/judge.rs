//! The one judgement of a page of the log, for every path that delivers it: the live stream
//! (`access::stage`), a replay (`deliver::replay`) and `/v1/changes` (`http::changes`). Each
//! calls `Judge::page` for the page and `decide` for each subscriber and change, and maps
//! what they say the same way: a refusal ends the subscriber's reading of the entity (ERROR
//! `forbidden` on the socket, 403 over HTTP), a replaced entity makes it refetch (RESYNC
//! `entity_changed`), the rest is delivered as `model::subscription::judge` says.
//!
//! A change is judged on its own row images, old and new, for each *group* of subscribers to
//! its entity (users sharing a role and claims), never on the table as it is now (SPEC 2.2):
//! a subscriber learns nothing of a row version it could not see, and a change arrives with
//! its own data. Per entity and role, the role's plan (`access::plans`) decides how:
//! - it may not read the entity: its groups are refused;
//! - row-level security does not apply to it: its groups see everything;
//! - the policy compiled: evaluated here, the groups indexed by their claims, except the
//!   groups whose claims it cannot evaluate exactly;
//! - else `sync.visible` evaluates it in the database, one call for all such groups.
//!
//! Who may read what is the catalog's as of the page at least (`Catalog::observe` with the
//! page's newest access event), and a change is judged only under the tracking that wrote it:
//! one written by a table no longer tracked under its code (untracked, re-tracked, replaced)
//! is no subscriber's to see, whatever the table under that code is now. Nor is a change
//! followed in its page by an ACCESS or TRUNCATE of its entity, where everyone refetches,
//! nor one judged by who may read what later than it was written (in the database, on a
//! replay or request, with a catalog or plan newer than its page) while the log already held
//! such a row after it (`access::refetch`).

use super::in_database::{read_memberships, visible_in_database};
use super::listeners::{Audience, Group, Listeners};
use super::plans::{Plan, Plans};
use super::policy::{GroupIndex, Memberships};
use super::refetch::{Following, RefetchChecks};
use super::roles::GroupId;
use crate::feed::catalog::{Catalog, CatalogError, Entity};
use crate::model::change::{AccessScope, Change, Op};
use crate::model::protocol::ResyncReason;
use crate::model::subscription::{judge, Judgement, Sight, Target};
use deadpool_postgres::{Object, Pool};
use pg_sync_core::policy::Visibility;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio_postgres::Client;

/// Why a group's reading ends when its entity could not be judged (a connection, a query or
/// a membership table failed): the details go to the log, not to the client.
const UNJUDGED: &str = "the gateway could not judge this table's rows; subscribe again";

/// Who may see the versions of one change of an entity with row-level security.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeSight {
    /// Groups that may see the row before the change, ascending, each once (`either` and
    /// the router's index rely on it).
    pub before: Vec<GroupId>,
    /// Groups that may see it after, likewise.
    pub after: Vec<GroupId>,
}

impl ChangeSight {
    fn of(&self, group: GroupId) -> Sight {
        Sight {
            before: self.before.binary_search(&group).is_ok(),
            after: self.after.binary_search(&group).is_ok(),
        }
    }

    /// The groups that see one version or the other, sorted: the lists themselves when they
    /// are one (an update that kept the row in the same sight, the common case), else their
    /// merge. With every subscriber in a claim set of its own these lists are as long as
    /// the connections, and sorting their concatenation took a tenth of the router's time.
    pub fn either(&self) -> Cow<'_, [GroupId]> {
        let ascending = |groups: &[GroupId]| groups.windows(2).all(|w| w[0] < w[1]);
        debug_assert!(ascending(&self.before) && ascending(&self.after));
        if self.before == self.after || self.before.is_empty() {
            return Cow::Borrowed(&self.after);
        }
        if self.after.is_empty() {
            return Cow::Borrowed(&self.before);
        }
        let (mut a, mut b) = (self.before.iter().peekable(), self.after.iter().peekable());
        let mut out = Vec::with_capacity(self.before.len().max(self.after.len()));
        while let (Some(&&x), Some(&&y)) = (a.peek(), b.peek()) {
            out.push(x.min(y));
            if x <= y {
                a.next();
            }
            if y <= x {
                b.next();
            }
        }
        out.extend(a.chain(b));
        Cow::Owned(out)
    }
}

/// What a page says of one change, for the groups listening to its entity.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Judged: None when every group listening sees every version, else who sees which (of
    /// an ACCESS row: `after` holds the groups that refetch at it).
    Seen(Option<Arc<ChangeSight>>),
    /// Every subscriber of the entity refetches here, and nobody is shown the change: it was
    /// written under a tracking its entity no longer has (`EntityChanged`), or too many
    /// membership writes follow it to judge it for each group (`AccessChanged`).
    Refetch(ResyncReason),
}

impl Verdict {
    /// Nobody sees it (an entity that could not be judged).
    fn hidden() -> Verdict {
        Verdict::Seen(Some(Arc::new(ChangeSight::default())))
    }
}

/// A subscriber as a decision needs it.
pub struct Subscriber<'a> {
    pub sub: &'a str,
    /// The connection's or request's origin tag: its own writes are not sent back.
    pub client_id: Option<&'a str>,
    pub group: GroupId,
}

/// What `subscriber`, whose subscription covers `target`, gets of `change`: the one
/// per-subscriber decision of every path.
pub fn decide(
    change: &Change,
    verdict: &Verdict,
    subscriber: &Subscriber<'_>,
    target: &Target,
) -> Judgement {
    let sight = match verdict {
        Verdict::Refetch(reason) => return Judgement::Resync(*reason),
        Verdict::Seen(None) => Sight::ALL,
        Verdict::Seen(Some(sight)) => sight.of(subscriber.group),
    };
    let own = change.written_by(subscriber.sub, subscriber.client_id);
    judge(change, target, sight, own)
}

/// A page judged for every group listening.
pub struct JudgedPage {
    pub changes: Vec<Arc<Change>>,
    /// Per change, in order.
    pub verdicts: Vec<Verdict>,
    /// (entity, group, why): groups that may not read an entity of this page (any more).
    pub refused: Vec<(String, GroupId, String)>,
    /// Whether any entity of the page was judged for row-level security (a metric).
    pub judged_rls: bool,
}

/// Where a judgement's database work runs: a connection the caller holds (a replay, a
/// request), or one taken from the visibility pool only when a page needs it (the live
/// stage).
pub enum Db<'a> {
    Held(&'a Client),
    Pool(&'a Pool, Option<Box<Object>>),
}

impl Db<'_> {
    async fn client(&mut self) -> Result<&Client, deadpool_postgres::PoolError> {
        match self {
            Db::Held(client) => Ok(client),
            Db::Pool(pool, held) => {
                if held.is_none() {
                    *held = Some(Box::new(pool.get().await?));
                }
                Ok(held.as_ref().expect("just taken"))
            }
        }
    }
}

/// Why a page could not be judged at all.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("reading who may read what: {0}")]
    Catalog(#[from] CatalogError),
}

/// Judges pages; keeps the compiled policies' indexes over groups between pages.
#[derive(Default)]
pub struct Judge {
    /// Per (entity, role): the index and what it was built for (the listeners' generation,
    /// the catalog epoch, and the plan, held so that a newer plan can never be mistaken for
    /// it by its address).
    indexes: HashMap<(String, String), BuiltIndex>,
    /// What asking whether a refetch follows found of the log after the pages judged so
    /// far (`access::refetch`).
    refetch_checks: RefetchChecks,
}

type BuiltIndex = ((u64, u64), Arc<Plan>, Arc<GroupIndex>);

/// A role whose groups a page judges in memory: its index, and those of its groups it judges.
type Indexed<'a> = (&'a str, Arc<GroupIndex>, Vec<(GroupId, &'a Group)>);

/// Who may read what, as a page is judged by it.
#[derive(Clone, Copy)]
struct Basis {
    /// The catalog's epoch (`feed::catalog::View::epoch`).
    epoch: u64,
    /// Whether it may be later than the page's own time: a replay or request reads the
    /// past, and the catalog may have moved on since the page was read.
    read_later: bool,
    /// The newest access event the page's snapshot saw: a plan read after a newer one
    /// may hold policies newer than the page.
    access_serial: i64,
}

/// What judging one entity's changes found.
struct EntityJudgement {
    /// Per change (in order), or None when every group sees everything.
    sights: Option<Vec<ChangeSight>>,
    refused: Vec<(GroupId, String)>,
    /// What the log already held after them when they were judged later than written.
    superseded: Superseded,
    /// Per ACCESS row naming membership rows: the groups (sorted) that refetch at it.
    named: Vec<Vec<GroupId>>,
}

/// Changes judged by who may read what later than they were written, while the log already
/// held rows after them where their subscribers refetch (`access::refetch`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Superseded {
    /// None such, or the groups they concern are left out of `sights`.
    No,
    /// A row where everyone refetches: shown to nobody.
    ForAll,
    /// More membership writes than are matched to groups: shown to nobody, and everyone
    /// refetches at the last change.
    RefetchNow,
}

/// An ACCESS row that names the membership rows written (`AccessScope`), in a page: where
/// it is, and how many of the entity's changes judged with it come before it.
struct NamedAccess {
    at: usize,
    after_changes: usize,
    scope: AccessScope,
}

impl Judge {
    /// A judge for the pages after the one whose judging found `checks`.
    pub fn resume(checks: Option<&RefetchChecks>) -> Judge {
        Judge {
            refetch_checks: checks.cloned().unwrap_or_default(),
            ..Judge::default()
        }
    }

    /// What judging found of the log after the pages judged so far, for `resume`.
    pub fn refetch_checks(self) -> RefetchChecks {
        self.refetch_checks
    }

    /// Judges `changes`, a page whose snapshot saw access event `access_serial`, for the
    /// groups `audience` says listen.
    pub async fn page(
        &mut self,
        catalog: &Catalog,
        plans: &Plans,
        db: &mut Db<'_>,
        access_serial: i64,
        changes: Vec<Arc<Change>>,
        audience: &mut impl Audience,
    ) -> Result<JudgedPage, JudgeError> {
        let view = catalog.observe(access_serial).await?;
        let basis = Basis {
            epoch: view.epoch,
            read_later: matches!(db, Db::Held(_)) || view.serial > access_serial,
            access_serial,
        };
        self.refetch_checks.new_page();
        let mut verdicts = vec![Verdict::Seen(None); changes.len()];
        let mut refused = Vec::new();
        let mut judged_rls = false;
        let mut by_entity: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, c) in changes.iter().enumerate() {
            by_entity.entry(c.entity_code.as_str()).or_default().push(i);
        }
        for (code, at) in by_entity {
            let Some(listeners) = audience.listeners(code) else {
                // Nobody listens: shown to nobody, should a subscription the audience does not
                // know of (a bug) be held anywhere, rather than to everyone unjudged.
                let hidden = Verdict::hidden();
                for i in at {
                    verdicts[i] = hidden.clone();
                }
                continue;
            };
            let entity = view.entities.get(code);
            // Every subscriber refetches at a TRUNCATE or an ACCESS row that names no
            // membership rows: the changes before it in the page are shown to nobody rather
            // than judged by who may read what now, after it (a user who joined a project
            // since would be shown versions of its rows that PostgreSQL never let them
            // SELECT). Before an ACCESS row naming membership rows, they are shown to nobody
            // it concerns (`entity`).
            let refetches: Vec<Refetches> =
                at.iter().map(|&i| Refetches::at(&changes[i])).collect();
            let everyone = at
                .iter()
                .zip(&refetches)
                .rev()
                .find(|(_, r)| matches!(r, Refetches::Everyone))
                .map(|(&i, _)| i);
            let mut current = Vec::with_capacity(at.len());
            let mut named = Vec::new();
            let mut refetched = false;
            for (i, refetch) in at.into_iter().zip(refetches) {
                match entity {
                    Some(e) if changes[i].tracking != Some(e.tracking) => {
                        verdicts[i] = Verdict::Refetch(ResyncReason::EntityChanged)
                    }
                    Some(_) if everyone.is_some_and(|r| i < r) => verdicts[i] = Verdict::hidden(),
                    Some(_) => match refetch {
                        Refetches::Nobody => current.push(i),
                        Refetches::Everyone => refetched = true,
                        Refetches::Named(scope) => named.push(NamedAccess {
                            at: i,
                            after_changes: current.len(),
                            scope,
                        }),
                    },
                    None => verdicts[i] = Verdict::Refetch(ResyncReason::EntityChanged),
                }
            }
            let Some(entity) = entity else {
                continue;
            };
            if current.is_empty() && named.is_empty() && !refetched {
                continue;
            }
            let of_entity: Vec<&Change> = current.iter().map(|&i| &*changes[i]).collect();
            let judgement = self
                .entity(db, plans, basis, entity, &listeners, &of_entity, &named)
                .await;
            match (judgement.superseded, judgement.sights) {
                (Superseded::No, None) => {}
                (Superseded::No, Some(sights)) => {
                    judged_rls = true;
                    for (&i, sight) in current.iter().zip(sights) {
                        verdicts[i] = Verdict::Seen(Some(Arc::new(sight)));
                    }
                }
                (superseded, _) => {
                    for &i in &current {
                        verdicts[i] = Verdict::hidden();
                    }
                    if let (Superseded::RefetchNow, Some(&last)) = (superseded, current.last()) {
                        verdicts[last] = Verdict::Refetch(ResyncReason::AccessChanged);
                    }
                }
            }
            for (access, groups) in named.iter().zip(judgement.named) {
                verdicts[access.at] = Verdict::Seen(Some(Arc::new(ChangeSight {
                    before: Vec::new(),
                    after: groups,
                })));
            }
            refused.extend(
                judgement
                    .refused
                    .into_iter()
                    .map(|(g, why)| (code.to_owned(), g, why)),
            );
        }
        Ok(JudgedPage {
            changes,
            verdicts,
            refused,
            judged_rls,
        })
    }

    /// Judges `changes` (all of `entity`, under its tracking, none an ACCESS row that names
    /// membership rows) for the groups listening, and finds who refetches at each of `named`.
    #[allow(clippy::too_many_arguments)]
    async fn entity(
        &mut self,
        db: &mut Db<'_>,
        plans: &Plans,
        basis: Basis,
        entity: &Entity,
        listeners: &Listeners,
        changes: &[&Change],
        named: &[NamedAccess],
    ) -> EntityJudgement {
        let nobody = |why: &str| EntityJudgement {
            sights: Some(vec![ChangeSight::default(); changes.len()]),
            refused: listeners.groups().map(|g| (g, why.to_owned())).collect(),
            superseded: Superseded::No,
            named: vec![Vec::new(); named.len()],
        };
        let client = match db.client().await {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "no connection to judge row-level security");
                return nobody(UNJUDGED);
            }
        };
        let mut refused: Vec<(GroupId, String)> = listeners
            .roleless
            .iter()
            .map(|g| (*g, format!("reading {} needs a role", entity.code)))
            .collect();
        let mut see_all: Vec<GroupId> = Vec::new();
        let mut indexed: Vec<Indexed> = Vec::new();
        let mut in_database: Vec<(GroupId, &Group)> = Vec::new();
        let mut plan_later = false;
        for (role, members) in &listeners.by_role {
            let plan = match plans.get(client, basis.epoch, entity, role).await {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::warn!(entity = entity.code, role, error = %crate::ErrorChain(&e), "reading a policy plan failed");
                    let why = "the gateway could not read this table's policies; subscribe again";
                    refused.extend(members.iter().map(|(g, _)| (*g, why.to_owned())));
                    continue;
                }
            };
            plan_later |= plan.read_at > basis.access_serial;
            if let Some(why) = plan.refusal(entity) {
                refused.extend(members.iter().map(|(g, _)| (*g, why.clone())));
            } else if !plan.rls {
                see_all.extend(members.iter().map(|(g, _)| *g));
            } else if let Some(expr) = &plan.expr {
                let key = (entity.code.clone(), role.clone());
                let built_for = (listeners.generation(), basis.epoch);
                let index = match self.indexes.get(&key) {
                    Some((built, built_plan, index))
                        if *built == built_for && Arc::ptr_eq(built_plan, &plan) =>
                    {
                        index.clone()
                    }
                    _ => {
                        let groups = members
                            .iter()
                            .map(|(g, group)| (*g, group.claims_json.clone()));
                        let index = Arc::new(GroupIndex::new(expr.clone(), groups));
                        self.indexes
                            .insert(key, (built_for, plan.clone(), index.clone()));
                        index
                    }
                };
                refused.extend(index.failed.iter().map(|(g, e)| {
                    let why = format!(
                        "a row-level-security policy of {} failed for you: {e}",
                        entity.code
                    );
                    (*g, why)
                }));
                // Groups the policy failed for are refused above, and judged nowhere.
                let failed: HashSet<GroupId> = index.failed.iter().map(|(g, _)| *g).collect();
                let (inexact, exact): (Vec<_>, Vec<_>) = members
                    .iter()
                    .filter(|(g, _)| !failed.contains(g))
                    .partition(|(g, _)| index.inexact.binary_search(g).is_ok());
                in_database.extend(inexact.into_iter().map(|(g, group)| (*g, group)));
                indexed.push((
                    role,
                    index,
                    exact.into_iter().map(|(g, group)| (*g, group)).collect(),
                ));
            } else {
                in_database.extend(members.iter().map(|(g, group)| (*g, group)));
            }
        }
        // The images to judge: each change's old and new row, where it has them (none when
        // nothing is judged here or in the database).
        let images: Vec<&Map<String, Value>> = if indexed.is_empty() && in_database.is_empty() {
            Vec::new()
        } else {
            changes
                .iter()
                .flat_map(|c| [c.old_data.as_ref(), c.data.as_ref()])
                .flatten()
                .collect()
        };
        // Who a membership write concerns, decided as it will be when its own ACCESS row is
        // judged, whatever this page's keys make of the groups below: each compiled
        // policy's index says whom the rows it names match, and the groups judged in the
        // database by their plan (or claims) are concerned by any.
        let compiled: Vec<Arc<GroupIndex>> = indexed.iter().map(|(_, i, _)| i.clone()).collect();
        let always_concerned: Vec<GroupId> = in_database.iter().map(|(g, _)| *g).collect();
        // Membership rows as the database holds them now, for the roles whose compiled
        // policy asks about them.
        let mut memberships: Vec<Memberships> = Vec::with_capacity(indexed.len());
        let mut asked_members = false;
        let mut i = 0;
        while i < indexed.len() {
            let (role, index, groups) = &indexed[i];
            match read_memberships(client, role, index, &images).await {
                Ok(Some((read, asked))) => {
                    asked_members |= asked;
                    memberships.push(read);
                    i += 1;
                }
                Ok(None) => {
                    // More membership rows under the page's keys than are read: the
                    // database judges these groups, as it judges policies not compiled.
                    in_database.extend(groups.iter().copied());
                    indexed.remove(i);
                }
                Err(e) => {
                    tracing::warn!(entity = entity.code, role, error = %crate::ErrorChain(&e), "reading a membership table failed");
                    refused.extend(groups.iter().map(|(g, _)| (*g, UNJUDGED.to_owned())));
                    indexed.remove(i);
                }
            }
        }
        // The groups whose sight a membership write named by `scopes` may change.
        let concerned = |scopes: &[&AccessScope]| -> Vec<GroupId> {
            if scopes.is_empty() {
                return Vec::new();
            }
            let mut groups = always_concerned.clone();
            for index in &compiled {
                groups.extend(index.named_by(scopes));
            }
            groups.sort_unstable();
            groups.dedup();
            groups
        };
        let named_groups: Vec<Vec<GroupId>> =
            named.iter().map(|n| concerned(&[&n.scope])).collect();
        // Judged by who may read what later than the page's own time: the database's
        // answer is as of now (its verdicts, the membership rows), and so are the catalog and
        // plans read since the page (a plan read on the live stream after a policy changed,
        // before the catalog saw it).
        let judged_later = !changes.is_empty()
            && (!in_database.is_empty()
                || asked_members
                || ((basis.read_later || plan_later)
                    && !(indexed.is_empty() && see_all.is_empty())));
        if indexed.is_empty() && in_database.is_empty() && !judged_later {
            return EntityJudgement {
                sights: None,
                refused,
                superseded: Superseded::No,
                named: named_groups,
            };
        }
        let answers = if in_database.is_empty() || images.is_empty() {
            Ok(vec![Visibility::Visible(Vec::new()); in_database.len()])
        } else {
            visible_in_database(client, entity, &in_database, &images).await
        };
        // Groups that refetch after changes, which are shown to none of them: per group, how
        // many of the changes come before its last refetch (an ACCESS row later in the page,
        // or one later in the log, asked of changes judged later: all of them).
        let mut hidden_before: HashMap<GroupId, usize> = HashMap::new();
        for (n, groups) in named.iter().zip(&named_groups) {
            for g in groups {
                let before = hidden_before.entry(*g).or_default();
                *before = (*before).max(n.after_changes);
            }
        }
        // Asked also when the database's judging failed: the groups judged here are shown
        // the changes still.
        if judged_later {
            let last = &changes.last().expect("judged later: changes").cursor;
            let superseded = match self
                .refetch_checks
                .follows(client, &entity.code, last.as_str())
                .await
            {
                Ok(Following::Nothing) => Superseded::No,
                Ok(Following::Everyone) => Superseded::ForAll,
                Ok(Following::TooMany) => Superseded::RefetchNow,
                Ok(Following::Named(scopes)) => {
                    let scopes: Vec<&AccessScope> = scopes.iter().map(|s| &**s).collect();
                    for g in concerned(&scopes) {
                        hidden_before.insert(g, changes.len());
                    }
                    Superseded::No
                }
                Err(e) => {
                    tracing::warn!(entity = entity.code, error = %crate::ErrorChain(&e), "reading the log after a page failed");
                    return nobody(UNJUDGED);
                }
            };
            if superseded != Superseded::No {
                return EntityJudgement {
                    sights: None,
                    refused,
                    superseded,
                    named: named_groups,
                };
            }
        }
        if indexed.is_empty() && in_database.is_empty() {
            return EntityJudgement {
                sights: None,
                refused,
                superseded: Superseded::No,
                named: named_groups,
            };
        }
        let mut database_sees: Vec<Vec<GroupId>> = vec![Vec::new(); images.len()];
        match answers {
            Ok(answers) => {
                for ((g, _), answer) in in_database.iter().zip(answers) {
                    match answer {
                        Visibility::Visible(bits) => {
                            for (i, seen) in bits.into_iter().enumerate().take(images.len()) {
                                if seen {
                                    database_sees[i].push(*g);
                                }
                            }
                        }
                        Visibility::Error(why) => refused.push((
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
                refused.extend(in_database.iter().map(|(g, _)| (*g, UNJUDGED.to_owned())));
            }
        }
        let mut at = 0;
        // Per index, the groups that see each distinct inputs of an image (`inputs`).
        let mut seen: Vec<HashMap<String, Vec<GroupId>>> = vec![HashMap::new(); indexed.len()];
        let mut seen_by = |image: Option<&Map<String, Value>>| -> Vec<GroupId> {
            let Some(image) = image else {
                return Vec::new();
            };
            let mut groups: Vec<GroupId> = see_all.clone();
            for (((_, index, _), memberships), seen) in
                indexed.iter().zip(&memberships).zip(&mut seen)
            {
                let row = memberships.row(image);
                match index.inputs(image) {
                    Some(inputs) => groups.extend_from_slice(
                        seen.entry(inputs).or_insert_with(|| index.visible(&row)),
                    ),
                    None => groups.extend(index.visible(&row)),
                }
            }
            groups.append(&mut database_sees[at]);
            at += 1;
            groups.sort_unstable();
            groups.dedup();
            groups
        };
        let sights = changes
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let shown = |groups: Vec<GroupId>| -> Vec<GroupId> {
                    groups
                        .into_iter()
                        .filter(|g| hidden_before.get(g).is_none_or(|&before| k >= before))
                        .collect()
                };
                let before = shown(seen_by(c.old_data.as_ref()));
                let after = shown(seen_by(c.data.as_ref()));
                ChangeSight { before, after }
            })
            .collect();
        EntityJudgement {
            sights: Some(sights),
            refused,
            superseded: Superseded::No,
            named: named_groups,
        }
    }
}

/// Who refetches at a change of the log.
enum Refetches {
    /// A row change: nobody.
    Nobody,
    /// Every subscriber of its entity: a TRUNCATE, or an ACCESS row that names no
    /// membership rows (a policy, a grant, a bulk write).
    Everyone,
    /// The subscribers the membership rows an ACCESS row names concern.
    Named(AccessScope),
}

impl Refetches {
    fn at(change: &Change) -> Refetches {
        match change.op {
            Op::Truncate => Refetches::Everyone,
            Op::Access => {
                AccessScope::of(change.data.as_ref()).map_or(Refetches::Everyone, Refetches::Named)
            }
            _ => Refetches::Nobody,
        }
    }
}

impl Judge {
    /// A page nobody may see anything of (it could not be judged): every group listening is
    /// refused, so that nobody is shown a change unjudged.
    pub fn unjudged(
        changes: Vec<Arc<Change>>,
        audience: &mut impl Audience,
        why: &str,
    ) -> JudgedPage {
        let mut refused = Vec::new();
        let mut codes: Vec<&str> = changes.iter().map(|c| c.entity_code.as_str()).collect();
        codes.sort_unstable();
        codes.dedup();
        for code in codes {
            if let Some(listeners) = audience.listeners(code) {
                refused.extend(
                    listeners
                        .groups()
                        .map(|g| (code.to_owned(), g, why.to_owned())),
                );
            }
        }
        JudgedPage {
            verdicts: vec![Verdict::hidden(); changes.len()],
            changes,
            refused,
            judged_rls: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_groups_seeing_either_version_are_each_named_once_in_order() {
        let sight = |before: &[GroupId], after: &[GroupId]| ChangeSight {
            before: before.to_vec(),
            after: after.to_vec(),
        };
        let either = |s: &ChangeSight| s.either().into_owned();
        assert_eq!(either(&sight(&[1, 3, 5], &[1, 3, 5])), [1, 3, 5]);
        assert!(matches!(sight(&[1, 3], &[1, 3]).either(), Cow::Borrowed(_)));
        assert_eq!(either(&sight(&[], &[2, 4])), [2, 4]);
        assert_eq!(either(&sight(&[2, 4], &[])), [2, 4]);
        assert_eq!(
            either(&sight(&[1, 3, 5], &[2, 3, 6, 7])),
            [1, 2, 3, 5, 6, 7]
        );
        assert_eq!(either(&sight(&[4, 8], &[1, 2])), [1, 2, 4, 8]);
        assert_eq!(either(&sight(&[], &[])), Vec::<GroupId>::new());
    }
}
