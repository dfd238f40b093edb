//! What a subscription covers, how it shows changes, and what a subscriber who may see a
//! change's versions as `Sight` says gets of it (`judge`; `access::judge::decide` is the one
//! decision every path makes, with row-level security and the change's tracking).

use super::change::{Action, Change, Op};
use super::filter::{matches_all, Condition};
use super::protocol::{ChangeOut, Mode, ResyncReason};
use serde_json::{Map, Value};
use std::collections::HashSet;

/// Which rows of an entity a subscription covers.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Ids(HashSet<String>),
    /// Every row, or the rows matching the filter.
    Rows(Option<Vec<Condition>>),
}

impl Target {
    /// Whether a version of a row (its id and image) is covered.
    fn covers(&self, entity_id: Option<&String>, image: &Map<String, Value>) -> bool {
        match self {
            Target::Ids(ids) => entity_id.is_some_and(|id| ids.contains(id)),
            Target::Rows(None) => true,
            Target::Rows(Some(filter)) => matches_all(filter, image),
        }
    }

    /// Subscriptions it counts as (an id counts one).
    pub fn size(&self) -> usize {
        match self {
            Target::Ids(ids) => ids.len(),
            Target::Rows(_) => 1,
        }
    }
}

/// How a subscription shows changes: INVALIDATE or DELTA, and which columns of DELTA data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub mode: Mode,
    pub columns: Option<Vec<String>>,
}

impl Shape {
    /// A change as this shape sends it.
    pub fn render(&self, change: &Change, action: Action) -> ChangeOut {
        let delta = self.mode == Mode::Delta;
        let data = (delta && action != Action::Delete).then(|| {
            let row = change.data.clone().unwrap_or_default();
            let row = match &self.columns {
                None => row,
                Some(columns) => row
                    .into_iter()
                    .filter(|(k, _)| columns.contains(k))
                    .collect(),
            };
            Value::Object(row)
        });
        ChangeOut {
            entity_id: change.entity_id.clone().unwrap_or_default(),
            action,
            data,
            changed: (delta && action == Action::Update)
                .then(|| change.changed.clone().unwrap_or_default()),
            schema_version: delta.then_some(change.schema_version),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Subscription {
    pub entity_code: String,
    pub target: Target,
    pub shape: Shape,
}

/// Which versions of a changed row the subscriber may see (row-level security): the row
/// before the change and after it. Both, for tables everyone who may read them sees whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sight {
    pub before: bool,
    pub after: bool,
}

impl Sight {
    pub const ALL: Sight = Sight {
        before: true,
        after: true,
    };
}

/// What a subscriber gets for a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judgement {
    Skip,
    /// The subscriber refetches (the entity was truncated, or replaced).
    Resync(ResyncReason),
    Deliver(Action),
}

/// The judgement of `change` for a subscriber with `target`, who wrote it itself when `own`,
/// and who may see its versions as `sight` says (SPEC 2.2, 2.3): a version is in the
/// subscriber's view when it may see it and the target covers it; entering the view is a
/// CREATE, staying an UPDATE, leaving a DELETE, and a change outside before and after is not
/// sent. A filter is never evaluated on a version the subscriber may not see.
pub fn judge(change: &Change, target: &Target, sight: Sight, own: bool) -> Judgement {
    let (before, after) = match change.op {
        // What empties or changes the copy as a whole reaches the writer too: its copy is
        // not emptied by its own write.
        Op::Truncate => return Judgement::Resync(ResyncReason::Truncate),
        // Only the subscribers an ACCESS row concerns refetch (`access::judge`).
        Op::Access if sight.after => return Judgement::Resync(ResyncReason::AccessChanged),
        Op::Access => return Judgement::Skip,
        _ if own => return Judgement::Skip,
        Op::Insert => (false, true),
        Op::Delete => (true, false),
        Op::Update => (true, true),
    };
    let id = change.entity_id.as_ref();
    let empty = Map::new();
    // An UPDATE without its old row (WAL capture without REPLICA IDENTITY FULL) counts the
    // row as it was as covered when the new one is, as clients expect for an update.
    let old = change.old_data.as_ref();
    let was_in = before
        && sight.before
        && match (old, change.op) {
            (Some(old), _) => target.covers(id, old),
            (None, Op::Update) => target.covers(id, change.data.as_ref().unwrap_or(&empty)),
            (None, _) => target.covers(id, &empty),
        };
    let is_in = after && sight.after && target.covers(id, change.data.as_ref().unwrap_or(&empty));
    match (was_in, is_in) {
        (false, true) => Judgement::Deliver(Action::Create),
        (true, true) => Judgement::Deliver(Action::Update),
        (true, false) => Judgement::Deliver(Action::Delete),
        (false, false) => Judgement::Skip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::change::sample;
    use crate::model::filter::Op as FilterOp;
    use serde_json::json;

    fn salary_over(n: i64) -> Target {
        Target::Rows(Some(vec![Condition {
            column: "salary".into(),
            op: FilterOp::Gt,
            value: Some(json!(n)),
        }]))
    }

    fn update(before: i64, after: i64) -> Change {
        sample(
            Op::Update,
            "1",
            Some(json!({"id": 1, "salary": after})),
            Some(json!({"id": 1, "salary": before})),
        )
    }

    #[test]
    fn rows_entering_staying_and_leaving_a_filter() {
        let t = salary_over(100);
        let all = Sight::ALL;
        assert_eq!(
            judge(&update(50, 150), &t, all, false),
            Judgement::Deliver(Action::Create)
        );
        assert_eq!(
            judge(&update(150, 200), &t, all, false),
            Judgement::Deliver(Action::Update)
        );
        assert_eq!(
            judge(&update(150, 50), &t, all, false),
            Judgement::Deliver(Action::Delete)
        );
        assert_eq!(judge(&update(10, 50), &t, all, false), Judgement::Skip);
    }

    #[test]
    fn row_level_security_decides_before_any_filter() {
        let t = salary_over(100);
        let hidden = Sight {
            before: false,
            after: false,
        };
        // A hidden row's DELETE tells nothing, whatever the filter would say of it.
        let delete = sample(Op::Delete, "1", None, Some(json!({"id": 1, "salary": 500})));
        assert_eq!(judge(&delete, &t, hidden, false), Judgement::Skip);
        assert_eq!(
            judge(&delete, &Target::Rows(None), hidden, false),
            Judgement::Skip
        );
        // Leaving sight is a DELETE, entering a CREATE, with the change's own data.
        let leaving = Sight {
            before: true,
            after: false,
        };
        let entering = Sight {
            before: false,
            after: true,
        };
        assert_eq!(
            judge(&update(150, 200), &t, leaving, false),
            Judgement::Deliver(Action::Delete)
        );
        assert_eq!(
            judge(&update(150, 200), &t, entering, false),
            Judgement::Deliver(Action::Create)
        );
        // Named ids learn nothing of a version they may not see.
        let ids = Target::Ids(["1".to_owned()].into());
        assert_eq!(judge(&update(1, 2), &ids, hidden, false), Judgement::Skip);
        assert_eq!(
            judge(&update(1, 2), &ids, leaving, false),
            Judgement::Deliver(Action::Delete)
        );
    }

    #[test]
    fn own_writes_are_skipped_and_truncates_resync() {
        let insert = sample(Op::Insert, "1", Some(json!({"id": 1})), None);
        assert_eq!(
            judge(&insert, &Target::Rows(None), Sight::ALL, true),
            Judgement::Skip
        );
        let truncate = Change {
            entity_id: None,
            ..sample(Op::Truncate, "", None, None)
        };
        // The writer's own TRUNCATE empties its copy too.
        for own in [false, true] {
            assert_eq!(
                judge(&truncate, &Target::Rows(None), Sight::ALL, own),
                Judgement::Resync(ResyncReason::Truncate)
            );
        }
    }
}
