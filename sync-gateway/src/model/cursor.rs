//! Cursors as the gateway handles them: opaque text to clients and to the log's readers, and
//! comparable here without asking the database (`pg_sync_core::cursor`, the extension's own code),
//! so that a cursor from the future is refused at once and a replay knows where to stop.

use serde::{Serialize, Serializer};
use std::sync::Arc;

pub use pg_sync_core::cursor::CursorError;

/// A position in the log (`sync.current_cursor()`, a change's `cursor`, a client's `since`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cursor(Arc<str>);

impl Cursor {
    /// A cursor the database wrote.
    pub fn from_db(text: String) -> Cursor {
        Cursor(text.into())
    }

    /// A cursor a client sent: refused unless it is one the extension could have written,
    /// and kept as the extension writes it. Other spellings of one position (leading zeros,
    /// another form of its list of transactions) would each be a URL and a cache key of
    /// their own: one user could fill the page caches with the same page.
    pub fn from_client(text: &str) -> Result<Cursor, CursorError> {
        Ok(Cursor(
            pg_sync_core::cursor::Cursor::decode(text)?.encode().into(),
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn decoded(&self) -> Option<pg_sync_core::cursor::Cursor> {
        pg_sync_core::cursor::Cursor::decode(&self.0).ok()
    }

    /// Whether this position (a cursor of `sync.current_cursor()`) is at or after `target`:
    /// every change before `target` is before it. False for a cursor of another log, and for
    /// a position inside a batch (it is not a place a replay can end).
    pub fn reaches(&self, target: &Cursor) -> bool {
        match (self.decoded(), target.decoded()) {
            (Some(pg_sync_core::cursor::Cursor::At { generation, mark }), Some(target)) => {
                generation == target.generation() && mark.reaches(&target)
            }
            _ => false,
        }
    }

    /// Whether this cursor (the end of a full page read from `since`) is in the batch of the
    /// log `since` is inside, or at its end: everything between them was fixed when the
    /// batch was, and never changes. (From a cursor between batches, a read's first batch
    /// ends at the read's present, which moves.)
    fn in_batch_of(&self, since: &Cursor) -> bool {
        use pg_sync_core::cursor::Cursor::{At, Within};
        let Some(Within {
            generation,
            from,
            to,
            ..
        }) = since.decoded()
        else {
            return false;
        };
        match self.decoded() {
            Some(Within {
                generation: g,
                from: f,
                to: t,
                ..
            }) => g == generation && f == from && t == to,
            Some(At {
                generation: g,
                mark,
            }) => g == generation && mark == to,
            None => false,
        }
    }

    /// Whether this cursor (the end of a full page read from `since`) is in the batch the
    /// read began with, or at its end: every change of the page was settled when it was
    /// read. Unlike `in_batch_of`, also from a cursor between batches, whose first batch
    /// ends where the read found the log: two reads may end it differently, each page right.
    pub fn in_batch_read_from(&self, since: &Cursor) -> bool {
        use pg_sync_core::cursor::Cursor::{At, Within};
        match (since.decoded(), self.decoded()) {
            (
                Some(At { generation, mark }),
                Some(Within {
                    generation: g,
                    from,
                    ..
                }),
            ) => g == generation && from == mark,
            (
                Some(At { generation, mark }),
                Some(At {
                    generation: g,
                    mark: end,
                }),
            ) => g == generation && end != mark,
            _ => self.in_batch_of(since),
        }
    }

    /// Whether both cursors belong to the same log (database and generation).
    pub fn same_log(&self, other: &Cursor) -> bool {
        match (self.decoded(), other.decoded()) {
            (Some(a), Some(b)) => a.generation() == b.generation(),
            _ => false,
        }
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Cursor {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_compare_without_the_database() {
        let early = Cursor::from_client("1.ab.10_20_12_50_22").unwrap();
        let late = Cursor::from_client("1.ab.12_30_12_80_32").unwrap();
        let elsewhere = Cursor::from_client("1.cd.12_30_12_80_32").unwrap();
        assert!(late.reaches(&early) && late.reaches(&late));
        assert!(!early.reaches(&late));
        assert!(!late.reaches(&elsewhere) && !late.same_log(&elsewhere));
        assert!(Cursor::from_client("1.ab.nonsense").is_err());
    }

    #[test]
    fn a_client_cursor_is_kept_as_the_extension_writes_it() {
        let written = Cursor::from_client("1.ab.10_20_12_50_22").unwrap();
        let padded = Cursor::from_client("1.ab.010_20_12_050_22").unwrap();
        assert_eq!(padded, written);
        assert_eq!(written.as_str(), "1.ab.10_20_12_50_22");
    }

    #[test]
    fn a_page_end_is_in_its_since_batch_only_inside_or_at_the_end_of_it() {
        let cursor = |text: &str| Cursor::from_client(&format!("1.ab.{text}")).unwrap();
        // The batch (from, to] and a position in it; the next batch (to, later].
        let (from, to, later) = ("10_20__5_22", "20_30__9_32", "30_40__15_42");
        let since = cursor(&format!("{from}.{to}.6.21.6"));
        assert!(cursor(&format!("{from}.{to}.8.25.7")).in_batch_of(&since));
        assert!(cursor(to).in_batch_of(&since), "at the batch's end");
        assert!(!cursor(&format!("{to}.{later}.12.33.11")).in_batch_of(&since));
        assert!(!cursor(later).in_batch_of(&since));
        // From a cursor between batches, a read's first batch ends at its present: never.
        assert!(!cursor(&format!("{from}.{to}.8.25.7")).in_batch_of(&cursor(from)));
    }

    #[test]
    fn a_page_end_is_in_the_batch_its_read_began_inside_or_at_the_end_of_it() {
        let cursor = |text: &str| Cursor::from_client(&format!("1.ab.{text}")).unwrap();
        let (from, to, later) = ("10_20__5_22", "20_30__9_32", "30_40__15_42");
        let inside = cursor(&format!("{from}.{to}.8.25.7"));
        assert!(
            inside.in_batch_read_from(&cursor(from)),
            "between batches: its first"
        );
        assert!(cursor(to).in_batch_read_from(&cursor(from)), "at its end");
        assert!(
            !cursor(from).in_batch_read_from(&cursor(from)),
            "no change read"
        );
        assert!(!inside.in_batch_read_from(&cursor(to)), "another batch");
        assert!(!cursor(&format!("{to}.{later}.12.33.11")).in_batch_read_from(&inside));
        assert!(inside.in_batch_read_from(&cursor(&format!("{from}.{to}.6.21.6"))));
        let elsewhere = Cursor::from_client("1.cd.20_30__9_32").unwrap();
        assert!(!elsewhere.in_batch_read_from(&cursor(from)), "another log");
    }
}
