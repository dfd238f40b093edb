//! Who wants which changes of one entity: by entity id (subscriptions naming ids), and by
//! group (whole-entity and filtered subscriptions), so that a change of a table with
//! row-level security visits only the subscriptions of the groups that may see it.

use super::{ConnId, SubId};
use crate::access::roles::GroupId;
use crate::model::change::Change;
use crate::model::subscription::Target;
use std::collections::{HashMap, HashSet};

type Key = (ConnId, SubId);

#[derive(Default)]
pub struct EntityIndex {
    by_id: HashMap<String, HashSet<Key>>,
    rows: HashMap<GroupId, HashSet<Key>>,
}

impl EntityIndex {
    pub fn add(&mut self, target: &Target, group: GroupId, key: Key) {
        match target {
            Target::Ids(ids) => {
                for id in ids {
                    self.by_id.entry(id.clone()).or_default().insert(key);
                }
            }
            Target::Rows(_) => {
                self.rows.entry(group).or_default().insert(key);
            }
        }
    }

    pub fn remove(&mut self, target: &Target, group: GroupId, key: Key) {
        match target {
            Target::Ids(ids) => {
                for id in ids {
                    remove_from(&mut self.by_id, id, &key);
                }
            }
            Target::Rows(_) => remove_from(&mut self.rows, &group, &key),
        }
    }

    /// One id of an ids subscription.
    pub fn remove_id(&mut self, id: &String, key: Key) {
        remove_from(&mut self.by_id, id, &key);
    }

    /// A rows subscription whose connection moved to another group (a refreshed token).
    pub fn regroup(&mut self, old: GroupId, new: GroupId, key: Key) {
        remove_from(&mut self.rows, &old, &key);
        self.rows.entry(new).or_default().insert(key);
    }

    /// Every subscription of the entity (a TRUNCATE, a replaced entity).
    pub fn all(&self, out: &mut Vec<Key>) {
        out.extend(self.by_id.values().flatten());
        out.extend(self.rows.values().flatten());
    }

    /// The subscriptions that may want `change` when every group sees it.
    pub fn every_group(&self, change: &Change, out: &mut Vec<Key>) {
        self.naming(change, out);
        out.extend(self.rows.values().flatten());
    }

    /// The subscriptions that may want `change` when only `groups` see a version of it.
    pub fn groups(&self, change: &Change, groups: &[GroupId], out: &mut Vec<Key>) {
        self.naming(change, out);
        for g in groups {
            out.extend(self.rows.get(g).into_iter().flatten());
        }
    }

    fn naming(&self, change: &Change, out: &mut Vec<Key>) {
        let by_id = change.entity_id.as_ref().and_then(|id| self.by_id.get(id));
        out.extend(by_id.into_iter().flatten());
    }
}

fn remove_from<K: std::hash::Hash + Eq>(map: &mut HashMap<K, HashSet<Key>>, key: &K, entry: &Key) {
    if let Some(set) = map.get_mut(key) {
        set.remove(entry);
        if set.is_empty() {
            map.remove(key);
        }
    }
}
