//! Which ACCESS or TRUNCATE rows of an entity the log already holds after a position: the
//! question `judge` asks of a page judged by who may read what *later* than the page was
//! written. The database judges by the tables its policies read as they are now (a
//! membership), and the gateway by policies and grants as it last read them; if they changed
//! after a change was written, their ACCESS row lies after the change in the log, where the
//! subscribers it concerns refetch (everyone, or those whose policy matches the membership
//! rows it names). Until then the change is shown to none of them: a user who joined a
//! project since is never shown versions PostgreSQL never let them SELECT.
//!
//! The rows after a position are found as `sync.changes_since` finds a batch
//! (`pg_sync_core::cursor`): those not visible in a mark are the ids above its `max_id` and
//! the transactions unsettled at it, one range scan and a few lookups; of those, the rows of
//! the position's own batch up to the position are left out. What one question finds is
//! kept (`RefetchChecks`) for the next page, which comes later in the log: the rows that
//! follow as of a mark (then only what committed since is looked at), or a row after which
//! everyone refetches (then pages before it need no question). So the questions of a
//! catch-up cost the log's length once, not once per page.

use crate::model::change::AccessScope;
use pg_sync_core::cursor::{Cursor, CursorError, Mark, Position};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use tokio_postgres::Client;

/// The most rows naming membership rows that one question keeps: past them, the page's
/// subscribers all refetch rather than the judge matching each row.
const MAX_NAMED: usize = 1000;

/// What follows a position in the log, for the entity asked about.
#[derive(Clone, Debug, PartialEq)]
pub enum Following {
    Nothing,
    /// A row after which every subscriber refetches (an ACCESS row naming no rows, a
    /// TRUNCATE).
    Everyone,
    /// ACCESS rows naming membership rows: the subscribers they concern refetch there.
    Named(Vec<Arc<AccessScope>>),
    /// More of those than are kept (`MAX_NAMED`).
    TooMany,
}

/// What the questions about each entity found so far: facts about the log, true for any
/// later position, so they are shared between users (`http::pages` keeps them per page end).
/// Positions asked about must come in the log's order, as pages do; a position of another
/// log (a database restored from a dump, with its ids and xids begun again) drops them.
#[derive(Clone, Debug, Default)]
pub struct RefetchChecks {
    /// The log (`sync.state.generation`) the facts are about.
    generation: Option<String>,
    known: HashMap<String, Known>,
    /// The mark of this page's first question: as good for the page's later questions,
    /// asked after it (one WAL flush per page, not per entity).
    page_mark: Option<Mark>,
}

#[derive(Clone, Debug)]
enum Known {
    /// As of this mark, these rows naming membership rows (and no others) follow the
    /// positions asked about (durable: a mark is made only once the WAL up to it is flushed,
    /// so no transaction it counts as completed is taken back by a crash and its xid handed
    /// out again).
    AsOf(Mark, Vec<(LogRow, Arc<AccessScope>)>),
    /// This row, after which everyone refetches, follows the positions asked about.
    Everyone(LogRow),
    /// More rows naming membership rows than are kept follow the positions asked about:
    /// the newest of them, while more than that many still follow.
    Many(Vec<LogRow>),
}

/// An ACCESS or TRUNCATE row of the log: its transaction, its id, and its transaction's
/// largest id (its order within a batch).
#[derive(Clone, Copy, Debug)]
struct LogRow {
    txid: u64,
    id: i64,
    txkey: i64,
}

impl LogRow {
    /// Whether this row comes after `position`: not before the batch it is in, and not up
    /// to the position in it.
    fn after(&self, position: &Cursor) -> bool {
        let (from, to, p) = parts(position);
        !from.snapshot.sees(self.txid)
            && !(to.snapshot.sees(self.txid)
                && (self.txkey < p.txkey || (self.txid == p.txid && self.id <= p.id)))
    }
}

/// The batch a position is in and where in it: an `At` cursor is the end of a batch.
fn parts(position: &Cursor) -> (&Mark, &Mark, Position) {
    match position {
        Cursor::At { mark, .. } => (
            mark,
            mark,
            Position {
                txkey: 0,
                txid: 0,
                id: 0,
            },
        ),
        Cursor::Within {
            from, to, position, ..
        } => (from, to, *position),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RefetchError {
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
    #[error("a cursor of the log did not parse: {0}")]
    Cursor(#[from] CursorError),
}

/// The entity's ACCESS or TRUNCATE rows that a mark does not see (ids above `$2`, one range
/// scan; the transactions of `$3`, by txid) and that come after the position ($4: its
/// batch's start, $5-$8: its batch's end and the position in it), with what they name: one
/// naming nothing first, else up to `$9` of them. Two branches, as `PAGE_SQL` has them: with
/// an OR and the ORDER BY, the planner may scan the whole log backwards with the id range as
/// a mere filter. The range's upper end, the largest id this statement sees, changes nothing
/// it finds: it is there for a log not yet analyzed (a new one, filled in a burst), where
/// `id > $2` alone is guessed to hold a third of the log and read by a scan of all of it,
/// each page of a catch-up again (80-100 ms a page at 1M changes: a catch-up took 26-45 s
/// instead of 7-9); a range with both ends is guessed small.
const FOLLOWING_SQL: &str = "
WITH candidates AS (
        SELECT h.txid, h.id, h.data FROM sync.change_history h
         WHERE h.id > $2 AND h.id <= (SELECT max(m.id) FROM sync.change_history m)
           AND h.entity_code = $1 AND h.op IN ('ACCESS', 'TRUNCATE')
    UNION ALL
        SELECT h.txid, h.id, h.data FROM sync.change_history h
         WHERE h.txid = ANY ($3::text::xid8[]) AND h.entity_code = $1
           AND h.op IN ('ACCESS', 'TRUNCATE')
)
SELECT c.txid::text, c.id, k.txkey, c.data
  FROM candidates c
 CROSS JOIN LATERAL (SELECT max(x.id) AS txkey FROM sync.change_history x
                      WHERE x.txid = c.txid) k
 WHERE NOT pg_catalog.pg_visible_in_snapshot(c.txid, $4::text::pg_snapshot)
   AND NOT (pg_catalog.pg_visible_in_snapshot(c.txid, $5::text::pg_snapshot)
            AND (k.txkey < $6 OR (c.txid = $7::text::xid8 AND c.id <= $8)))
 ORDER BY c.data IS NULL DESC, c.id DESC LIMIT $9";

impl RefetchChecks {
    /// What ACCESS or TRUNCATE rows of `entity` the log holds after `position` that the
    /// database sees now. Asked after the judging it checks, so that whatever the judging
    /// saw, this sees too.
    pub async fn follows(
        &mut self,
        client: &Client,
        entity: &str,
        position: &str,
    ) -> Result<Following, RefetchError> {
        let position = Cursor::decode(position)?;
        if self.generation.as_deref() != Some(position.generation()) {
            self.known.clear();
            self.generation = Some(position.generation().to_owned());
        }
        let (base, mut named) = match self.known.remove(entity) {
            Some(Known::Everyone(row)) if row.after(&position) => {
                self.known.insert(entity.to_owned(), Known::Everyone(row));
                return Ok(Following::Everyone);
            }
            Some(Known::Many(rows)) => {
                let still: Vec<LogRow> = rows.into_iter().filter(|r| r.after(&position)).collect();
                if still.len() > MAX_NAMED {
                    self.known.insert(entity.to_owned(), Known::Many(still));
                    return Ok(Following::TooMany);
                }
                (position.base().clone(), Vec::new())
            }
            Some(Known::AsOf(mark, named)) => {
                let still: Vec<_> = named
                    .into_iter()
                    .filter(|(row, _)| row.after(&position))
                    .collect();
                (mark, still)
            }
            _ => (position.base().clone(), Vec::new()),
        };
        // Made before the question, so that it sees no more than the question did.
        let now = match &self.page_mark {
            Some(mark) => mark.clone(),
            None => self.page_mark.insert(current_mark(client).await?).clone(),
        };
        let (from, to, p) = parts(&position);
        let unsettled = format!(
            "{{{}}}",
            base.unsettled()
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let found = client
            .query(
                FOLLOWING_SQL,
                &[
                    &entity,
                    &base.max_id,
                    &unsettled,
                    &from.snapshot.to_pg(),
                    &to.snapshot.to_pg(),
                    &p.txkey,
                    &p.txid.to_string(),
                    &p.id,
                    &(MAX_NAMED as i64 + 1),
                ],
            )
            .await?;
        let mut everyone = None;
        for found in &found {
            let txid: String = found.get(0);
            let row = LogRow {
                txid: txid.parse().map_err(|_| CursorError::Malformed("txid"))?,
                id: found.get(1),
                txkey: found.get(2),
            };
            let data: Option<Value> = found.get(3);
            let scope = data.as_ref().and_then(|d| AccessScope::of(d.as_object()));
            match scope {
                None => {
                    everyone = Some(row);
                    break;
                }
                // Found again when it committed after the mark it was found under.
                Some(_) if named.iter().any(|(r, _)| r.id == row.id) => {}
                Some(scope) => named.push((row, Arc::new(scope))),
            }
        }
        if !found.is_empty() {
            // The rows may be asynchronous commits not yet on disk: a crash would take them
            // back, and the changes hidden for them would never be followed by a refetch. A
            // mark made now makes them durable. (On a hot standby nothing is flushed; what it
            // replayed was on the primary's disk already.)
            current_mark(client).await?;
        }
        if let Some(row) = everyone {
            self.known.insert(entity.to_owned(), Known::Everyone(row));
            return Ok(Following::Everyone);
        }
        if named.len() > MAX_NAMED {
            let rows = named.into_iter().map(|(row, _)| row).collect();
            self.known.insert(entity.to_owned(), Known::Many(rows));
            return Ok(Following::TooMany);
        }
        let scopes: Vec<Arc<AccessScope>> = named.iter().map(|(_, s)| s.clone()).collect();
        self.known
            .insert(entity.to_owned(), Known::AsOf(now, named));
        Ok(if scopes.is_empty() {
            Following::Nothing
        } else {
            Following::Named(scopes)
        })
    }

    /// A new page: its first question makes a mark of its own.
    pub fn new_page(&mut self) {
        self.page_mark = None;
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// About the bytes held, for a cache of them.
    pub fn approximate_size(&self) -> usize {
        self.known
            .iter()
            .map(|(entity, known)| {
                let held = match known {
                    Known::AsOf(mark, named) => {
                        8 * mark.snapshot.xip.len()
                            + named
                                .iter()
                                .map(|(_, s)| s.approximate_size())
                                .sum::<usize>()
                    }
                    Known::Everyone(_) => 0,
                    Known::Many(rows) => 24 * rows.len(),
                };
                entity.len() + held + 96
            })
            .sum()
    }
}

/// `sync.current_cursor()`'s mark: the WAL up to it is flushed.
async fn current_mark(client: &Client) -> Result<Mark, RefetchError> {
    let text: String = client
        .query_one("SELECT sync.current_cursor()", &[])
        .await?
        .get(0);
    Ok(Cursor::decode(&text)?.end().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_sync_core::cursor::Snapshot;

    fn mark(xmin: u64, xmax: u64, xip: Vec<u64>, max_id: i64) -> Mark {
        Mark {
            snapshot: Snapshot::new(xmin, xmax, xip).unwrap(),
            max_id,
            next_xid: xmax,
        }
    }

    #[test]
    fn a_row_follows_a_position_only_past_it() {
        let g = "g".to_owned();
        let at = Cursor::At {
            generation: g.clone(),
            mark: mark(10, 12, vec![], 100),
        };
        let row = |txid, id, txkey| LogRow { txid, id, txkey };
        assert!(
            !row(11, 90, 90).after(&at),
            "visible at the mark: before it"
        );
        assert!(row(12, 101, 101).after(&at));
        let within = Cursor::Within {
            generation: g,
            from: mark(10, 12, vec![], 100),
            to: mark(10, 20, vec![15], 200),
            position: Position {
                txkey: 150,
                txid: 13,
                id: 140,
            },
        };
        assert!(!row(11, 90, 90).after(&within), "before the batch");
        assert!(
            !row(14, 120, 130).after(&within),
            "in the batch, before the position"
        );
        assert!(
            !row(13, 135, 150).after(&within),
            "the position's own, up to it"
        );
        assert!(
            row(13, 145, 150).after(&within),
            "the position's own, after it"
        );
        assert!(
            row(16, 160, 170).after(&within),
            "in the batch, after the position"
        );
        assert!(
            row(15, 110, 210).after(&within),
            "running at the batch's end"
        );
        assert!(row(21, 210, 210).after(&within), "after the batch");
    }
}
