//! Reading pg_sync's change log: one page of `sync.changes_since` in one REPEATABLE READ
//! transaction, with the transaction's own cursor and the newest access event read at the
//! same snapshot (pipelined, one round trip), so that when the page ends the log, that cursor
//! is where the next read starts (an idle reader's cursor keeps moving and never expires),
//! and the page is never judged by who could read what before an access change it follows
//! (`feed::catalog`).

use crate::model::change::{Change, Op};
use crate::model::cursor::Cursor;
use serde_json::{Map, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, IsolationLevel};

/// A page of changes and the cursor to continue from.
#[derive(Debug)]
pub struct Page {
    pub changes: Vec<Change>,
    /// After the last change, or, when the page reached the end of the read, the end itself.
    pub end: Cursor,
    /// Whether more changes may follow right away.
    pub more: bool,
    /// The newest `sync.access_event` in the page's snapshot: judging it needs the catalog
    /// and plans of at least that access change.
    pub access_serial: i64,
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
       to_char(captured_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), cursor,
       tracking, tx_end
  FROM sync.changes_since($1, $2, $3)";

const STATE_SQL: &str = "SELECT sync.current_cursor(), sync.access_serial()";

/// Reads up to `limit` changes after `since` (None: from the oldest retained), not beyond
/// `until` when given.
pub async fn read_page(
    client: &mut Client,
    since: Option<&Cursor>,
    limit: i32,
    until: Option<&Cursor>,
) -> Result<Page, ReadError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let (since_text, until_text) = (since.map(Cursor::as_str), until.map(Cursor::as_str));
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&since_text, &limit, &until_text];
    let (rows, state) = tokio::join!(tx.query(PAGE_SQL, &params), tx.query_one(STATE_SQL, &[]));
    let rows = rows.map_err(ReadError::classify)?;
    let state = state?;
    let changes: Vec<Change> = rows
        .iter()
        .map(|r| Change {
            id: r.get(0),
            entity_code: r.get(1),
            op: match r.get::<_, &str>(2) {
                "INSERT" => Op::Insert,
                "UPDATE" => Op::Update,
                "DELETE" => Op::Delete,
                "ACCESS" => Op::Access,
                _ => Op::Truncate,
            },
            entity_id: r.get(3),
            data: object(r.get(4)),
            old_data: object(r.get(5)),
            changed: r.get(6),
            client_id: r.get(7),
            schema_version: r.get(8),
            captured_at: r.get(9),
            cursor: Cursor::from_db(r.get(10)),
            tracking: r.get(11),
            tx_end: r.get(12),
        })
        .collect();
    let more = changes.len() >= limit as usize;
    let end = match (changes.last(), more, until) {
        (Some(last), true, _) => last.cursor.clone(),
        (_, false, Some(until)) => until.clone(),
        _ => Cursor::from_db(state.get(0)),
    };
    tx.commit().await?;
    Ok(Page {
        changes,
        end,
        more,
        access_serial: state.get(1),
    })
}

impl Page {
    /// A full page cut after the last change that ends its transaction (when it holds one;
    /// the rest is read again with the next page): the router then tells each connection
    /// where every transaction of the batch ends (`txEnd`), even one whose changes for it
    /// all came before the page's end. A transaction larger than a page stays split.
    pub fn up_to_transaction_end(mut self) -> Page {
        if !self.more {
            return self;
        }
        if let Some(last) = self.changes.iter().rposition(|c| c.tx_end) {
            self.changes.truncate(last + 1);
            self.end = self.changes[last].cursor.clone();
        }
        self
    }
}

fn object(value: Option<Value>) -> Option<Map<String, Value>> {
    match value {
        Some(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// The cursor of now.
pub async fn current_cursor(client: &Client) -> Result<Cursor, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT sync.current_cursor()", &[])
        .await?;
    Ok(Cursor::from_db(row.get(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::change::sample;

    fn page(ends: &[bool], more: bool) -> Page {
        let changes = ends
            .iter()
            .enumerate()
            .map(|(i, &tx_end)| Change {
                cursor: Cursor::from_db(format!("after {i}")),
                tx_end,
                ..sample(Op::Insert, &i.to_string(), None, None)
            })
            .collect();
        Page {
            changes,
            end: Cursor::from_db("end".into()),
            more,
            access_serial: 0,
        }
    }

    #[test]
    fn a_full_page_ends_with_its_last_whole_transaction() {
        let cut = page(&[false, true, false, true, false, false], true).up_to_transaction_end();
        assert_eq!(cut.changes.len(), 4);
        assert_eq!(cut.end.as_str(), "after 3");
        assert!(cut.more);
        // The last page, or one transaction larger than a page, as read.
        let last = page(&[true, false], false).up_to_transaction_end();
        assert_eq!((last.changes.len(), last.end.as_str()), (2, "end"));
        let large = page(&[false, false], true).up_to_transaction_end();
        assert_eq!((large.changes.len(), large.end.as_str()), (2, "end"));
    }
}
