//! Who wants which changes of one entity: by entity id (subscriptions naming ids), by the
//! value of a column (filters with an `eq` or `in` condition) and group, and by group (the
//! other whole-entity and filtered subscriptions), so that a change visits only the
//! subscriptions that may want it: of the groups that may see it under row-level security,
//! and of the filters its values may match (a subscriber per team filtering on its team).
//! What a subscription then gets is decided for each one visited (`access::judge::decide`).

use super::{ConnId, SubId};
use crate::access::roles::GroupId;
use crate::model::change::Change;
use crate::model::filter::{equality_keys, Condition};
use crate::model::subscription::Target;
use std::collections::{HashMap, HashSet};

type Key = (ConnId, SubId);

#[derive(Default)]
pub struct EntityIndex {
    by_id: HashMap<String, HashSet<Key>>,
    /// Per column, per key of a value (`Condition::index_keys`), per group: the filters
    /// filed under one of their `eq` or `in` conditions.
    by_value: HashMap<String, HashMap<u64, HashMap<GroupId, HashSet<Key>>>>,
    rows: HashMap<GroupId, HashSet<Key>>,
}

/// The condition a filter is filed by, with its keys: its first `eq` or `in` (a row it
/// matches holds one of the values, so it is found by them).
fn filed_by(target: &Target) -> Option<(&str, Vec<u64>)> {
    let Target::Rows(Some(filter)) = target else {
        return None;
    };
    filter
        .iter()
        .find_map(|c: &Condition| Some((c.column.as_str(), c.index_keys()?)))
}

impl EntityIndex {
    pub fn add(&mut self, target: &Target, group: GroupId, key: Key) {
        match (target, filed_by(target)) {
            (Target::Ids(ids), _) => {
                for id in ids {
                    self.by_id.entry(id.clone()).or_default().insert(key);
                }
            }
            (_, Some((column, keys))) => {
                let values = self.by_value.entry(column.to_owned()).or_default();
                for k in keys {
                    let groups = values.entry(k).or_default();
                    groups.entry(group).or_default().insert(key);
                }
            }
            (Target::Rows(_), None) => {
                self.rows.entry(group).or_default().insert(key);
            }
        }
    }

    pub fn remove(&mut self, target: &Target, group: GroupId, key: Key) {
        match (target, filed_by(target)) {
            (Target::Ids(ids), _) => {
                for id in ids {
                    remove_from(&mut self.by_id, id, &key);
                }
            }
            (_, Some((column, keys))) => {
                let Some(values) = self.by_value.get_mut(column) else {
                    return;
                };
                for k in keys {
                    if let Some(groups) = values.get_mut(&k) {
                        remove_from(groups, &group, &key);
                        if groups.is_empty() {
                            values.remove(&k);
                        }
                    }
                }
                if values.is_empty() {
                    self.by_value.remove(column);
                }
            }
            (Target::Rows(_), None) => remove_from(&mut self.rows, &group, &key),
        }
    }

    /// One id of an ids subscription.
    pub fn remove_id(&mut self, id: &String, key: Key) {
        remove_from(&mut self.by_id, id, &key);
    }

    /// A subscription whose connection moved to another group (a refreshed token).
    pub fn regroup(&mut self, target: &Target, old: GroupId, new: GroupId, key: Key) {
        self.remove(target, old, key);
        self.add(target, new, key);
    }

    /// Every subscription of the entity (a TRUNCATE, a replaced entity).
    pub fn all(&self, out: &mut Vec<Key>) {
        out.extend(self.by_id.values().flatten());
        let start = out.len();
        let filed = self.by_value.values().flat_map(|v| v.values());
        out.extend(filed.flat_map(|groups| groups.values()).flatten());
        once_each(out, start);
        out.extend(self.rows.values().flatten());
    }

    /// The subscriptions that may want `change` when every group sees it.
    pub fn every_group(&self, change: &Change, out: &mut Vec<Key>) {
        self.naming(change, out);
        self.filed(change, None, out);
        out.extend(self.rows.values().flatten());
    }

    /// The subscriptions that may want `change` when only `groups` (sorted) see a version of
    /// it. Of many groups, those listening are found by walking the listeners instead of
    /// looking each group up.
    pub fn groups(&self, change: &Change, groups: &[GroupId], out: &mut Vec<Key>) {
        self.naming(change, out);
        self.filed(change, Some(groups), out);
        if groups.len() < self.rows.len() {
            for g in groups {
                out.extend(self.rows.get(g).into_iter().flatten());
            }
        } else {
            let seeing = self
                .rows
                .iter()
                .filter(|(g, _)| groups.binary_search(g).is_ok());
            out.extend(seeing.flat_map(|(_, keys)| keys));
        }
    }

    fn naming(&self, change: &Change, out: &mut Vec<Key>) {
        let by_id = change.entity_id.as_ref().and_then(|id| self.by_id.get(id));
        out.extend(by_id.into_iter().flatten());
    }

    /// The filed filters that a value of the change's row, before or after it, may match
    /// (of `groups`, or of every group), each once.
    fn filed(&self, change: &Change, groups: Option<&[GroupId]>, out: &mut Vec<Key>) {
        let start = out.len();
        let images = [change.old_data.as_ref(), change.data.as_ref()];
        for (column, values) in &self.by_value {
            for value in images.iter().flatten().filter_map(|row| row.get(column)) {
                for by_group in equality_keys(value).filter_map(|k| values.get(&k)) {
                    match groups {
                        None => out.extend(by_group.values().flatten()),
                        Some(groups) => {
                            for g in groups {
                                out.extend(by_group.get(g).into_iter().flatten());
                            }
                        }
                    }
                }
            }
        }
        once_each(out, start);
    }
}

/// Leaves each subscription of `out[start..]` once: a filter is filed under each key of each
/// of its values and found by each image of a change, and a subscription given a change
/// twice would hold it twice while it replays (the router's `last_change` check is for
/// live deliveries).
fn once_each(out: &mut Vec<Key>, start: usize) {
    if out.len() > start + 1 {
        let mut found = out.split_off(start);
        found.sort_unstable();
        found.dedup();
        out.append(&mut found);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::change::{sample, Op};

    #[test]
    fn the_groups_that_see_a_change_find_their_listeners_whether_looked_up_or_walked() {
        let mut index = EntityIndex::default();
        for (group, conn) in [(1, 10), (2, 20), (2, 21), (3, 30)] {
            index.add(&Target::Rows(None), group, (conn, 1));
        }
        let change = sample(Op::Update, "7", None, None);
        let found = |groups: &[GroupId]| {
            let mut out = Vec::new();
            index.groups(&change, groups, &mut out);
            out.sort_unstable();
            out.iter().map(|&(conn, _)| conn).collect::<Vec<_>>()
        };
        // Fewer groups than listen: each looked up.
        assert_eq!(found(&[2]), [20, 21]);
        assert_eq!(found(&[4]), Vec::<ConnId>::new());
        // As many or more: the listeners walked, each kept if its group is named.
        assert_eq!(found(&[2, 4, 5, 6]), [20, 21]);
        assert_eq!(found(&[1, 2, 3, 4]), [10, 20, 21, 30]);
        assert_eq!(found(&[5, 6, 7, 8]), Vec::<ConnId>::new());
    }
}
