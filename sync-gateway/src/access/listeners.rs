//! Who listens to the entities of a page, as judging needs them: the groups of subscribers
//! (users sharing a role and claims) by role (`access::judge` judges per group).

use super::roles::{GroupId, UserContext};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A group as its policies read it: a user of it (users of one group share role and claims).
pub type Group = Arc<UserContext>;

/// The groups listening to an entity, by role, as judging needs them; built again only when
/// the set changes (its `generation`).
pub struct Listeners {
    generation: u64,
    pub(super) by_role: BTreeMap<String, Vec<(GroupId, Group)>>,
    /// Groups without a role, which read nothing.
    pub(super) roleless: Vec<GroupId>,
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

    /// One user alone, as group 0 (a replay, a `/v1/changes` request).
    pub fn alone(user: Arc<UserContext>, group: GroupId) -> Listeners {
        Listeners::new(0, [(group, user)])
    }

    /// A number that changes whenever the groups do.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub(super) fn groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.by_role
            .values()
            .flatten()
            .map(|(g, _)| *g)
            .chain(self.roleless.iter().copied())
    }
}

/// Who listens to the entities of a page.
pub trait Audience {
    /// The groups listening to `entity`; None when nobody does (its changes need no judging).
    fn listeners(&mut self, entity: &str) -> Option<Arc<Listeners>>;
}

impl Audience for Arc<Listeners> {
    fn listeners(&mut self, _entity: &str) -> Option<Arc<Listeners>> {
        Some(self.clone())
    }
}
