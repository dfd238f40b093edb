//! Reading pg_sync's change log: one page of `sync.changes_since` in one REPEATABLE READ
//! transaction, so that when the page ends the log, the transaction's own cursor is where
//! the next read starts (an idle reader's cursor keeps moving and never expires).

use serde_json::{Map, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, IsolationLevel};

/// One change of the log, as the gateway routes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub id: i64,
    pub entity_code: String,
    pub op: Op,
    pub entity_id: Option<String>,
    pub data: Option<Map<String, Value>>,
    pub old_data: Option<Map<String, Value>>,
    pub changed: Option<Vec<String>>,
    pub client_id: Option<String>,
    pub schema_version: i32,
    /// Capture time, ISO 8601 in UTC with milliseconds.
    pub captured_at: String,
    /// The position after this change.
    pub cursor: String,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

/// A page of changes and the cursor to continue from.
#[derive(Debug)]
pub struct Page {
    pub changes: Vec<Change>,
    /// After the last change, or, when the page reached the end of the read, the end itself.
    pub end: String,
    /// Whether more changes may follow right away.
    pub more: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cursor expired: {0}")]
    Expired(String),
    #[error("malformed cursor: {0}")]
    Malformed(String),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

impl ReadError {
    fn classify(error: tokio_postgres::Error) -> Self {
        let message = error
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        match error.code() {
            Some(code) if code.code() == "SY410" => ReadError::Expired(message),
            Some(code) if *code == SqlState::INVALID_PARAMETER_VALUE => {
                ReadError::Malformed(message)
            }
            _ => ReadError::Database(error),
        }
    }
}

const PAGE_SQL: &str = "
SELECT id, entity_code, op, entity_id, data, old_data, changed_columns, client_id, schema_version,
       to_char(captured_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), cursor
  FROM sync.changes_since($1, $2, $3)";

/// Reads up to `limit` changes after `since` (NULL: from the oldest retained), not beyond
/// `until` when given.
pub async fn read_page(
    client: &mut Client,
    since: Option<&str>,
    limit: i32,
    until: Option<&str>,
) -> Result<Page, ReadError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let rows = tx
        .query(PAGE_SQL, &[&since, &limit, &until])
        .await
        .map_err(ReadError::classify)?;
    let changes: Vec<Change> = rows
        .iter()
        .map(|r| Change {
            id: r.get(0),
            entity_code: r.get(1),
            op: match r.get::<_, &str>(2) {
                "INSERT" => Op::Insert,
                "UPDATE" => Op::Update,
                "DELETE" => Op::Delete,
                _ => Op::Truncate,
            },
            entity_id: r.get(3),
            data: object(r.get(4)),
            old_data: object(r.get(5)),
            changed: r.get(6),
            client_id: r.get(7),
            schema_version: r.get(8),
            captured_at: r.get(9),
            cursor: r.get(10),
        })
        .collect();
    let more = changes.len() >= limit as usize;
    let end = match (changes.last(), more, until) {
        (Some(last), true, _) => last.cursor.clone(),
        (_, false, Some(until)) => until.to_owned(),
        _ => tx
            .query_one("SELECT sync.current_cursor()", &[])
            .await?
            .get(0),
    };
    tx.commit().await?;
    Ok(Page { changes, end, more })
}

fn object(value: Option<Value>) -> Option<Map<String, Value>> {
    match value {
        Some(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// The cursor of now.
pub async fn current_cursor(client: &Client) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT sync.current_cursor()", &[])
        .await?
        .get(0))
}

/// Whether `position` (a cursor of `current_cursor`) is at or after `target`.
pub async fn cursor_reached(
    client: &Client,
    position: &str,
    target: &str,
) -> Result<bool, ReadError> {
    let row = client
        .query_one("SELECT sync.cursor_reached($1, $2)", &[&position, &target])
        .await
        .map_err(ReadError::classify)?;
    Ok(row.get(0))
}

/// Checks a client's cursor before replaying from it.
pub async fn check_cursor(client: &Client, cursor: &str) -> Result<(), ReadError> {
    let row = client
        .query_one("SELECT sync._cursor_problem($1)", &[&cursor])
        .await
        .map_err(ReadError::classify)?;
    match row.get::<_, Option<String>>(0) {
        Some(problem) => Err(ReadError::Expired(problem)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_writes_are_recognised_only_under_the_users_own_name() {
        let tagged = |tag: &str| Change {
            id: 1,
            entity_code: "doc".into(),
            op: Op::Insert,
            entity_id: None,
            data: None,
            old_data: None,
            changed: None,
            client_id: Some(tag.into()),
            schema_version: 1,
            captured_at: String::new(),
            cursor: String::new(),
        };
        assert!(tagged("tab-1").written_by("alice", Some("tab-1")));
        assert!(tagged("alice:tab-1").written_by("alice", Some("tab-1")));
        assert!(!tagged("mallory:tab-1").written_by("alice", Some("tab-1")));
        assert!(!tagged("alice:tab-1").written_by("alice", Some("tab-2")));
        assert!(!tagged("alicex:tab-1").written_by("alice", Some("tab-1")));
        assert!(!tagged("tab-1").written_by("alice", None));
    }
}
