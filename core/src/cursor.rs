//! Cursors into the change log: what they mean, how they are written, and the snapshot
//! arithmetic behind them. Pure Rust: no PostgreSQL calls, so it is unit-tested and fuzzable
//! on its own, and shared by the extension (whose `changes.rs` runs the queries) and the gateway
//! (which compares cursors without asking the database).
//!
//! # Why snapshots, not ids
//!
//! Log ids are taken at capture, but transactions commit in another order: a reader that
//! keeps "the last id it saw" skips a transaction that took id 10 and commits after one that
//! took id 11. So, as in PgQ, a position in the log is a *snapshot*: the changes before a
//! cursor are exactly those whose capturing transaction (`txid`) is visible in it. The
//! snapshot of a REPEATABLE READ transaction is then a cursor that matches the rows the
//! transaction read, which is what the snapshot hand-over needs.
//!
//! # Batches and their order
//!
//! Reading from a cursor at snapshot `A` with the current snapshot `B` yields the *batch*
//! `(A, B]`: the changes of transactions visible in `B` but not in `A`. Inside a batch,
//! transactions come in the order of their largest log id (`txkey`), each transaction's
//! changes together and in id order. The largest id orders two transactions that changed the
//! same row correctly: the second one took its id for that row after the first one committed,
//! so after every id of the first one. Ordering by xid would not (the later committer can hold
//! the smaller xid). Batches are consecutive, and one row's changes never go back across
//! batches because a snapshot that sees the later one sees the earlier one.
//!
//! A long transaction does not hold anyone back: it stays in the snapshots' in-progress lists
//! and its changes arrive in the first batch after it commits.
//!
//! # Finding a batch without scanning the log
//!
//! Each mark keeps `max_id`, the largest log id visible in its snapshot, so a change with a
//! larger id is not visible in it, and `next_xid`, an upper bound of the xids assigned when
//! its snapshot was taken (read right after it). A transaction of the batch `(A, B]` either
//! had its xid when `A` was taken, or got it later. The first kind are *unsettled* at `A`:
//! the ones in `A.xip`, and every xid from `A.xmax` up to `A.next_xid` (a snapshot's xmax is
//! the latest *completed* xid + 1, so a running transaction whose xid is larger than every
//! completed one is neither visible nor listed, and may have written before `A`; a test
//! catches it). They are few, and looked up by txid. The second kind took their log ids
//! after `A` was taken (ids come from a CACHE 1 sequence, and every path that writes the log
//! assigns the xid first), so all of them are above `A.max_id`. The rows of a batch are
//! therefore found in the id range `(A.max_id, B.max_id]` plus the unsettled transactions,
//! and a page costs about its own size.
//!
//! A crash hands out again the transaction ids whose records never reached the disk. So a
//! mark is made only once the WAL up to it is flushed: every xid its snapshot counts as
//! completed survives, the snapshots after recovery cover it, and an xid used again is one
//! the mark counts as unsettled or never knew. (Without the flush, a cursor from before a
//! crash "saw" xids that were asynchronously committed and lost, and every snapshot after
//! the crash looked older than it until as many xids were used again.)
//!
//! # The text form
//!
//! Cursors are opaque to clients but must survive URLs, so they use only `[0-9a-f._-]`:
//! `1.<generation>.<mark>` at a batch boundary and
//! `1.<generation>.<mark from>.<mark to>.<txkey>.<txid>.<id>` inside one, where a mark is
//! `<xmin>_<xmax>_<xip-xip-…>_<max_id>_<next_xid>`. The generation identifies the log (see
//! `sync.state`), so a cursor of another database or of an earlier life of this one is
//! recognised as expired.

use thiserror::Error;

const VERSION: &str = "1";

/// A PostgreSQL snapshot (`pg_snapshot`) over 64-bit transaction ids (`xid8`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    /// Transactions in progress when the snapshot was taken, sorted, each in `[xmin, xmax)`.
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Parses PostgreSQL's text form `xmin:xmax:xip,xip`.
    pub fn parse_pg(text: &str) -> Result<Self, CursorError> {
        let mut parts = text.split(':');
        let (Some(xmin), Some(xmax), Some(xip), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CursorError::Malformed("snapshot needs xmin:xmax:xip"));
        };
        let xip = if xip.is_empty() {
            Vec::new()
        } else {
            xip.split(',').map(parse_u64).collect::<Result<_, _>>()?
        };
        Snapshot::new(parse_u64(xmin)?, parse_u64(xmax)?, xip)
    }

    /// Checks the invariants PostgreSQL guarantees, so that a forged cursor cannot describe
    /// an impossible snapshot.
    pub fn new(xmin: u64, xmax: u64, xip: Vec<u64>) -> Result<Self, CursorError> {
        if xmin > xmax {
            return Err(CursorError::Malformed("snapshot xmin above xmax"));
        }
        if xip.windows(2).any(|w| w[0] >= w[1]) {
            return Err(CursorError::Malformed("snapshot xip not sorted"));
        }
        if xip.iter().any(|&x| x < xmin || x >= xmax) {
            return Err(CursorError::Malformed("snapshot xip outside [xmin, xmax)"));
        }
        Ok(Snapshot { xmin, xmax, xip })
    }

    /// Makes a transaction invisible that this snapshot would count as finished.
    pub fn add_in_progress(&mut self, xid: u64) {
        if xid < self.xmax {
            if let Err(at) = self.xip.binary_search(&xid) {
                self.xip.insert(at, xid);
            }
            self.xmin = self.xmin.min(xid);
        }
    }

    /// PostgreSQL's text form, for `::pg_snapshot`.
    pub fn to_pg(&self) -> String {
        format!("{}:{}:{}", self.xmin, self.xmax, join(&self.xip, ","))
    }

    /// Whether a (committed) transaction is visible in this snapshot, as
    /// `pg_visible_in_snapshot` decides.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    /// Whether every transaction visible in `earlier` is visible here too: true when this
    /// snapshot was taken at the same time or later.
    pub fn covers(&self, earlier: &Snapshot) -> bool {
        self.xmax >= earlier.xmax
            && self
                .xip
                .iter()
                .all(|&x| x >= earlier.xmax || earlier.xip.binary_search(&x).is_ok())
    }
}

/// A consistent cut of the log: the changes visible in `snapshot`, the largest of whose ids
/// is at most `max_id`. `next_xid` is at least the next transaction id to be assigned when
/// the snapshot was taken (read after it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub snapshot: Snapshot,
    pub max_id: i64,
    pub next_xid: u64,
}

/// The cursors of positions within one batch, which differ only in the position: encoded once
/// for the batch, so that a page of 4,000 changes does not encode both marks 4,000 times.
pub struct BatchCursors {
    prefix: String,
}

impl BatchCursors {
    pub fn new(generation: &str, from: &Mark, to: &Mark) -> Self {
        BatchCursors {
            prefix: format!("{VERSION}.{generation}.{}.{}", from.encode(), to.encode()),
        }
    }

    /// `Cursor::Within { generation, from, to, position }.encode()`.
    pub fn encode(&self, position: &Position) -> String {
        let Position { txkey, txid, id } = position;
        format!("{}.{txkey}.{txid}.{id}", self.prefix)
    }
}

impl Mark {
    /// The transactions this mark does not see that may have written before it: those in
    /// progress below xmax, and every xid from xmax to `next_xid` (a snapshot's xmax is the
    /// latest *completed* xid + 1, so transactions above it may have been running too).
    pub fn unsettled(&self) -> Vec<u64> {
        let s = &self.snapshot;
        s.xip.iter().copied().chain(s.xmax..self.next_xid).collect()
    }

    /// Whether this mark is at or after `cursor`: every change before the cursor is before
    /// the mark.
    pub fn reaches(&self, cursor: &Cursor) -> bool {
        let end = cursor.end();
        self.snapshot.covers(&end.snapshot) && self.max_id >= end.max_id
    }

    fn encode(&self) -> String {
        let s = &self.snapshot;
        format!(
            "{}_{}_{}_{}_{}",
            s.xmin,
            s.xmax,
            encode_xip(&s.xip),
            self.max_id,
            self.next_xid
        )
    }

    fn decode(text: &str) -> Result<Self, CursorError> {
        let mut parts = text.split('_');
        let (Some(xmin), Some(xmax), Some(xip), Some(max_id), Some(next_xid), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(CursorError::Malformed("mark needs five fields"));
        };
        let xip = decode_xip(xip)?;
        let snapshot = Snapshot::new(parse_u64(xmin)?, parse_u64(xmax)?, xip)?;
        let next_xid = parse_u64(next_xid)?;
        // A running range far larger than any number of connections is a forged cursor.
        if next_xid < snapshot.xmax || next_xid - snapshot.xmax > MAX_UNSETTLED {
            return Err(CursorError::Malformed("next xid outside its snapshot"));
        }
        Ok(Mark {
            snapshot,
            max_id: parse_i64(max_id)?,
            next_xid,
        })
    }
}

/// The last change delivered inside a batch: transaction `txid`, whose largest id is
/// `txkey`, up to and including change `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub txkey: i64,
    pub txid: u64,
    pub id: i64,
}

/// A place in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cursor {
    /// Every change visible in the mark has been delivered, none other.
    At { generation: String, mark: Mark },
    /// Inside the batch `(from, to]`: its changes up to `position` have been delivered.
    Within {
        generation: String,
        from: Mark,
        to: Mark,
        position: Position,
    },
}

impl Cursor {
    pub fn generation(&self) -> &str {
        match self {
            Cursor::At { generation, .. } | Cursor::Within { generation, .. } => generation,
        }
    }

    /// The mark this cursor's undelivered changes are counted from: everything visible in it
    /// has been delivered.
    pub fn base(&self) -> &Mark {
        match self {
            Cursor::At { mark, .. } => mark,
            Cursor::Within { from, .. } => from,
        }
    }

    /// The mark at which this cursor's batch ends: every change before the cursor is visible
    /// in it.
    pub fn end(&self) -> &Mark {
        match self {
            Cursor::At { mark, .. } => mark,
            Cursor::Within { to, .. } => to,
        }
    }

    pub fn encode(&self) -> String {
        match self {
            Cursor::At { generation, mark } => format!("{VERSION}.{generation}.{}", mark.encode()),
            Cursor::Within {
                generation,
                from,
                to,
                position,
            } => BatchCursors::new(generation, from, to).encode(position),
        }
    }

    pub fn decode(text: &str) -> Result<Self, CursorError> {
        if text.len() > MAX_CURSOR_LEN {
            return Err(CursorError::Malformed("cursor too long"));
        }
        let parts: Vec<&str> = text.split('.').collect();
        if parts[0] != VERSION {
            return Err(CursorError::Malformed("unknown cursor version"));
        }
        let generation = parts.get(1).copied().unwrap_or_default();
        if generation.is_empty() || !generation.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CursorError::Malformed("bad generation"));
        }
        let generation = generation.to_owned();
        match parts.len() {
            3 => Ok(Cursor::At {
                generation,
                mark: Mark::decode(parts[2])?,
            }),
            7 => {
                let from = Mark::decode(parts[2])?;
                let to = Mark::decode(parts[3])?;
                let position = Position {
                    txkey: parse_i64(parts[4])?,
                    txid: parse_u64(parts[5])?,
                    id: parse_i64(parts[6])?,
                };
                if !to.snapshot.covers(&from.snapshot) || to.max_id < from.max_id {
                    return Err(CursorError::Malformed("batch ends before it starts"));
                }
                if position.id > position.txkey || position.txkey > to.max_id {
                    return Err(CursorError::Malformed("position outside its batch"));
                }
                // (The transaction may look visible in `from` after a crash reused its xid.)
                if !to.snapshot.sees(position.txid) {
                    return Err(CursorError::Malformed("transaction outside its batch"));
                }
                Ok(Cursor::Within {
                    generation,
                    from,
                    to,
                    position,
                })
            }
            _ => Err(CursorError::Malformed("wrong number of fields")),
        }
    }
}

/// Transactions a mark may count as running above its xmax. Each is looked up on every page
/// read from the cursor, so a forged cursor claiming many would make pages expensive. A mark
/// taken in a statement's own snapshot counts a handful; one taken late in a long REPEATABLE
/// READ transaction counts every xid assigned since its snapshot, and is refused.
pub const MAX_UNSETTLED: u64 = 8192;

/// Cursors stay short enough for a URL even with hundreds of transactions in progress.
pub const MAX_CURSOR_LEN: usize = 8192;

/// Why a cursor cannot be read from. Mapped to SQLSTATEs at the SQL boundary: `22023` for
/// malformed, `SY410` for expired.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CursorError {
    #[error("malformed cursor: {0}")]
    Malformed(&'static str),
}

/// Why a well-formed cursor is expired, if it is: it belongs to another log, or changes it
/// has not delivered were pruned.
pub fn expiry(cursor: &Cursor, generation: &str, horizon: u64) -> Option<&'static str> {
    if cursor.generation() != generation {
        return Some("it belongs to another database or to one restored since");
    }
    // Pruning removed whole transactions below the horizon. The cursor's base sees all of
    // them exactly when none of them was still in progress at its snapshot.
    if cursor.base().snapshot.xmin < horizon {
        return Some("changes after it were pruned");
    }
    None
}

fn parse_u64(text: &str) -> Result<u64, CursorError> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CursorError::Malformed("bad number"));
    }
    text.parse()
        .map_err(|_| CursorError::Malformed("bad number"))
}

fn parse_i64(text: &str) -> Result<i64, CursorError> {
    i64::try_from(parse_u64(text)?).map_err(|_| CursorError::Malformed("bad number"))
}

/// A mark's in-progress xids: `-`-separated, a run of three or more consecutive ones as
/// `first~last` (a standby's mark lists every xid assigned since its anchor tick that it does
/// not see: mostly runs).
fn encode_xip(xip: &[u64]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < xip.len() {
        let mut j = i;
        while j + 1 < xip.len() && xip[j + 1] == xip[j] + 1 {
            j += 1;
        }
        if j - i >= 2 {
            parts.push(format!("{}~{}", xip[i], xip[j]));
        } else {
            parts.extend(xip[i..=j].iter().map(u64::to_string));
        }
        i = j + 1;
    }
    parts.join("-")
}

/// The xids `encode_xip` wrote; at most `MAX_UNSETTLED` of them, so that a forged run cannot
/// make a cursor expensive.
fn decode_xip(text: &str) -> Result<Vec<u64>, CursorError> {
    let mut xip = Vec::new();
    if text.is_empty() {
        return Ok(xip);
    }
    for part in text.split('-') {
        let (first, last) = match part.split_once('~') {
            Some((first, last)) => (parse_u64(first)?, parse_u64(last)?),
            None => {
                let x = parse_u64(part)?;
                (x, x)
            }
        };
        let room = MAX_UNSETTLED.saturating_sub(xip.len() as u64);
        if last < first || last - first >= room {
            return Err(CursorError::Malformed("too many xids in progress"));
        }
        xip.extend(first..=last);
    }
    Ok(xip)
}

fn join(xs: &[u64], sep: &str) -> String {
    xs.iter().map(u64::to_string).collect::<Vec<_>>().join(sep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(xmin: u64, xmax: u64, xip: &[u64]) -> Snapshot {
        Snapshot::new(xmin, xmax, xip.to_vec()).unwrap()
    }

    fn mark(snapshot: Snapshot, max_id: i64) -> Mark {
        let next_xid = snapshot.xmax + 2;
        Mark {
            snapshot,
            max_id,
            next_xid,
        }
    }

    #[test]
    fn runs_of_xids_in_progress_are_written_short_and_bounded() {
        let xip = vec![1, 2, 3, 5, 7, 8, 9, 10];
        assert_eq!(encode_xip(&xip), "1~3-5-7~10");
        assert_eq!(decode_xip("1~3-5-7~10").unwrap(), xip);
        assert_eq!(decode_xip("").unwrap(), Vec::<u64>::new());
        assert!(decode_xip("5~3").is_err());
        assert!(
            decode_xip("1~100000").is_err(),
            "a forged run is refused, not expanded"
        );
        assert!(decode_xip("1~5000-6000~9500").is_err(), "nor many runs");
    }

    #[test]
    fn pg_text_round_trip() {
        let s = Snapshot::parse_pg("10:20:12,15").unwrap();
        assert_eq!(s, snap(10, 20, &[12, 15]));
        assert_eq!(s.to_pg(), "10:20:12,15");
        assert_eq!(Snapshot::parse_pg("7:7:").unwrap().to_pg(), "7:7:");
    }

    #[test]
    fn visibility_follows_postgres() {
        let s = snap(10, 20, &[12, 15]);
        assert!(s.sees(9));
        assert!(s.sees(10));
        assert!(!s.sees(12));
        assert!(s.sees(13));
        assert!(!s.sees(20));
        assert!(!s.sees(25));
    }

    #[test]
    fn a_transaction_can_be_marked_in_progress() {
        let mut s = snap(10, 20, &[12]);
        s.add_in_progress(15);
        s.add_in_progress(25);
        s.add_in_progress(12);
        assert_eq!(s, snap(10, 20, &[12, 15]));
        s.add_in_progress(5);
        assert_eq!(s, snap(5, 20, &[5, 12, 15]));
    }

    #[test]
    fn later_snapshots_cover_earlier_ones() {
        let earlier = snap(10, 20, &[12, 15]);
        assert!(snap(15, 25, &[15, 21]).covers(&earlier));
        assert!(earlier.covers(&earlier));
        // 13 committed before `earlier`, so a snapshot that lists it as running is older.
        assert!(!snap(13, 25, &[13]).covers(&earlier));
        assert!(!snap(10, 18, &[]).covers(&earlier));
    }

    #[test]
    fn cursors_round_trip() {
        let at = Cursor::At {
            generation: "ab12".into(),
            mark: mark(snap(10, 20, &[12, 15]), 99),
        };
        let text = at.encode();
        assert_eq!(text, "1.ab12.10_20_12-15_99_22");
        assert_eq!(Cursor::decode(&text).unwrap(), at);

        let within = Cursor::Within {
            generation: "ab12".into(),
            from: mark(snap(10, 20, &[12, 15]), 99),
            to: mark(snap(15, 30, &[15]), 180),
            position: Position {
                txkey: 150,
                txid: 12,
                id: 140,
            },
        };
        assert_eq!(Cursor::decode(&within.encode()).unwrap(), within);
        assert!(within
            .encode()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
    }

    #[test]
    fn malformed_cursors_are_refused() {
        for bad in [
            "",
            "x",
            "2.ab.1_1__0_1",
            "1..1_1__0_1",
            "1.zz.1_1__0_1",
            "1.ab.1_1_0",
            "1.ab.1_1__0",
            "1.ab.5_1__0_5",
            "1.ab.1_9_9_0_9",
            "1.ab.1_9_4-3_0_9",
            "1.ab.1_9__-1_9",
            "1.ab.1_9__99999999999999999999_9",
            "1.ab.1_9__0_8",
            "1.ab.1_9__0_99999999",
            "1.ab.1_9__0_9.1_9__0_9",
            "1.ab.1_1__0_1;DROP TABLE x",
            // batch end before its start; position outside the batch
            "1.ab.10_20__50_20.5_10__60_10.55.12.55",
            "1.ab.10_20__50_20.10_30__60_30.70.25.70",
            "1.ab.10_20__50_20.10_30__60_30.55.35.55",
            "1.ab.10_20__50_20.10_30__60_30.55.25.56",
        ] {
            assert!(Cursor::decode(bad).is_err(), "accepted {bad:?}");
        }
        assert!(Cursor::decode(&"9".repeat(MAX_CURSOR_LEN + 1)).is_err());
        // At most MAX_UNSETTLED transactions above xmax (9 + 8192 = 8201).
        assert!(Cursor::decode("1.ab.1_9__0_8201").is_ok());
        assert!(Cursor::decode("1.ab.1_9__0_8202").is_err());
    }

    #[test]
    fn unsettled_transactions_include_those_above_xmax() {
        assert_eq!(
            mark(snap(10, 20, &[12, 15]), 5).unsettled(),
            [12, 15, 20, 21]
        );
    }

    #[test]
    fn a_mark_reaches_cursors_up_to_it() {
        let early = mark(snap(10, 20, &[12]), 50);
        let late = mark(snap(12, 30, &[12]), 80);
        let at = |mark: &Mark| Cursor::At {
            generation: "ab".into(),
            mark: mark.clone(),
        };
        assert!(late.reaches(&at(&early)));
        assert!(late.reaches(&at(&late)));
        assert!(!early.reaches(&at(&late)));
        let within = Cursor::Within {
            generation: "ab".into(),
            from: early.clone(),
            to: late.clone(),
            position: Position {
                txkey: 60,
                txid: 25,
                id: 60,
            },
        };
        assert!(late.reaches(&within));
        assert!(!early.reaches(&within));
    }

    /// Decoding whatever a client sends never panics: random strings over the cursor
    /// alphabet, and mutations of a valid cursor.
    #[test]
    fn decoding_random_text_never_panics() {
        let alphabet = b"0123456789._-abz";
        let valid = "1.ab12.10_20_12-15_99_22.15_30_15_180_32.150.12.140";
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 80) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(next() % 16) as usize] as char)
                .collect();
            let _ = Cursor::decode(&text);
            let mut mutated = valid.as_bytes().to_vec();
            let at = (next() as usize) % mutated.len();
            mutated[at] = alphabet[(next() % 16) as usize];
            let _ = Cursor::decode(&String::from_utf8(mutated).unwrap());
        }
    }

    #[test]
    fn expiry_checks_generation_and_horizon() {
        let cursor = Cursor::At {
            generation: "ab".into(),
            mark: mark(snap(100, 110, &[100]), 5),
        };
        assert_eq!(expiry(&cursor, "ab", 100), None);
        assert!(expiry(&cursor, "cd", 100).is_some());
        assert!(expiry(&cursor, "ab", 101).is_some());
    }
}
