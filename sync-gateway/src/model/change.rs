//! A change of the log as the gateway routes it, and what a subscriber sees of it.

use super::cursor::Cursor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One row of `sync.changes_since`.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub id: i64,
    pub entity_code: String,
    pub op: Op,
    pub entity_id: Option<String>,
    /// The row after the change (INSERT, UPDATE), published columns only.
    pub data: Option<Map<String, Value>>,
    /// The row before the change (UPDATE, DELETE).
    pub old_data: Option<Map<String, Value>>,
    pub changed: Option<Vec<String>>,
    /// The writer's origin tag.
    pub client_id: Option<String>,
    pub schema_version: i32,
    /// Capture time, ISO 8601 in UTC with milliseconds.
    pub captured_at: String,
    /// The position after this change.
    pub cursor: Cursor,
    /// The tracking of the table that wrote it (`sync.tracked.tracking`): a change is judged
    /// and delivered only under that tracking of its entity, never under another table
    /// tracked later with the same code. None: written before pg_sync 0.3.0 by a table no
    /// longer tracked.
    pub tracking: Option<i64>,
    /// The last change of its database transaction.
    pub tx_end: bool,
}

/// What the log recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    /// Who may read the entity changed here (a grant, a policy, an owner, a role): rows may
    /// have entered or left a subscriber's sight without changing.
    Access,
}

/// The membership row an ACCESS row names (`sync._policy_input` writes it in the row's
/// `data`): a table that policies of the entity read changed this row, so only the
/// subscribers whose policy matches its values may now see other rows of the entity. An
/// ACCESS row that names none (a policy, a grant, a TRUNCATE, a bulk write) concerns every
/// subscriber.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct AccessScope {
    /// The table written (the oid a compiled membership names, `Member::table`).
    pub input: u32,
    /// The row's old and new values of the columns the policies read: text, or null.
    pub rows: Vec<Map<String, Value>>,
}

impl AccessScope {
    /// The scope an ACCESS row's `data` names, if it names one.
    pub fn of(data: Option<&Map<String, Value>>) -> Option<AccessScope> {
        serde_json::from_value(Value::Object(data?.clone())).ok()
    }

    /// About the bytes it holds, for a cache of them.
    pub fn approximate_size(&self) -> usize {
        self.rows
            .iter()
            .flat_map(|r| r.iter())
            .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len) + 16)
            .sum::<usize>()
            + 32
    }
}

/// A change as a subscriber sees it (SPEC 2.3), and what a mutation of `/v1/write` asks for.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Create,
    Update,
    Delete,
}

impl Change {
    /// Whether the connection or request of user `sub` tagged `client_id` wrote this change,
    /// so that it is not sent back (SPEC 2.3): the change's tag is the plain client id (set by
    /// a trusted SQL writer) or `<sub>:<client id>` (how `/v1/write` records it, so no user
    /// can suppress another user's deliveries).
    pub fn written_by(&self, sub: &str, client_id: Option<&str>) -> bool {
        let (Some(tag), Some(client_id)) = (self.client_id.as_deref(), client_id) else {
            return false;
        };
        tag == client_id
            || tag
                .strip_prefix(sub)
                .and_then(|rest| rest.strip_prefix(':'))
                .is_some_and(|own| own == client_id)
    }

    /// About the bytes this change holds (its rows as JSON, its names and position): what
    /// a cache of changes weighs it by.
    pub fn approximate_size(&self) -> usize {
        let row = |r: &Option<Map<String, Value>>| {
            r.as_ref()
                .map_or(0, |r| serde_json::to_vec(r).map_or(0, |v| v.len()))
        };
        row(&self.data)
            + row(&self.old_data)
            + self.entity_code.len()
            + self.entity_id.as_ref().map_or(0, String::len)
            + self.cursor.as_str().len()
            + 128
    }
}

#[cfg(test)]
pub(crate) fn sample(op: Op, id: &str, data: Option<Value>, old: Option<Value>) -> Change {
    Change {
        id: 1,
        entity_code: "doc".into(),
        op,
        entity_id: Some(id.into()),
        data: data.and_then(|d| d.as_object().cloned()),
        old_data: old.and_then(|d| d.as_object().cloned()),
        changed: None,
        client_id: None,
        schema_version: 1,
        captured_at: "2026-11-30T00:00:00.000Z".into(),
        cursor: Cursor::from_db("c".into()),
        tracking: Some(1),
        tx_end: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_writes_are_recognised_only_under_the_users_own_name() {
        let tagged = |tag: &str| Change {
            client_id: Some(tag.into()),
            ..sample(Op::Insert, "1", None, None)
        };
        assert!(tagged("tab-1").written_by("alice", Some("tab-1")));
        assert!(tagged("alice:tab-1").written_by("alice", Some("tab-1")));
        assert!(!tagged("mallory:tab-1").written_by("alice", Some("tab-1")));
        assert!(!tagged("alice:tab-1").written_by("alice", Some("tab-2")));
        assert!(!tagged("alicex:tab-1").written_by("alice", Some("tab-1")));
        assert!(!tagged("tab-1").written_by("alice", None));
    }
}
