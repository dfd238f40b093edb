//! Reading the log from a cursor: `sync.current_cursor()` and the pages behind
//! `sync.changes_since`. The meaning of cursors and why the queries below are gap-free is
//! explained in `pg_sync_core::cursor`; this module only runs them.
//!
//! Every query of one call reads with snapshots it names explicitly (`pg_visible_in_snapshot`
//! against the batch's end), so the result does not depend on whether SPI gives each query a
//! fresh snapshot. Expiry is checked by the PL/pgSQL wrapper `sync.changes_since`, which holds
//! the log's read lock so that no prune moves the horizon in between.

use pg_sync_core::cursor::{
    expiry, BatchCursors, Cursor, CursorError, Mark, Position, Snapshot, MAX_UNSETTLED,
};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

/// Pages larger than this are refused: a caller wanting more reads on from the last cursor.
const MAX_PAGE_ROWS: i32 = 100_000;

/// The page query, for the batch `(from, to]` after a position. First the transactions of the
/// page, by their last rows (`tx_first` marks a transaction's last row, see `log.rs`):
/// - the rest of the transaction at the position, when it was left in the middle;
/// - the transactions `from` does not see that may have written before it (`unsettled`)
///   and are visible at `to`: their last rows, by txid (few);
/// - the other transactions: their last rows lie in `(from.max_id, to.max_id]`, one range
///   scan in id order;
///
/// ordered by their last id (`txkey`); then their rows, each transaction's by its txid and id
/// range, in (txkey, id) order. The transactions come sorted, so the rows need only an
/// incremental sort, which stops at `$8` rows: a page reads about the rows it returns (joining
/// every transaction of the page whole and sorting made a page of 4,000 changes in 1,000-row
/// transactions read and sort 16,000 rows, 20 ms of its 30).
/// Only transactions whose last id is at most `$9` are considered: the page is then exact up
/// to `$9`, and the scan stops there (without it, transactions of many rows made each page
/// scan the rest of the batch: a 100k-change catch-up in pages of 1,000 took 29 s instead of
/// 2).
const PAGE_SQL: &str = "
WITH tails AS (
        SELECT $5 AS txkey, $6::xid8 AS txid, $7 AS after, $7 AS lowest
         WHERE $7 < $5
    UNION ALL
        SELECT m.id, x.txid, 0, m.tx_first FROM unnest($1::xid8[]) AS x(txid)
         CROSS JOIN LATERAL (SELECT h.id, h.tx_first FROM sync.change_history h
                              WHERE h.txid = x.txid ORDER BY h.id DESC LIMIT 1) m
         WHERE m.id > $5 AND m.id <= $9 AND m.tx_first IS NOT NULL
           AND pg_catalog.pg_visible_in_snapshot(x.txid, $2::pg_snapshot)
    UNION ALL
        (SELECT t.id, t.txid, 0, t.tx_first FROM sync.change_history t
          WHERE t.id > pg_catalog.int8larger($3, $5) AND t.id <= pg_catalog.int8smaller($4, $9)
            AND t.tx_first IS NOT NULL
            AND t.txid <> ALL ($1::xid8[])
            AND pg_catalog.pg_visible_in_snapshot(t.txid, $2::pg_snapshot)
          ORDER BY t.id LIMIT $8)
), page AS (SELECT * FROM tails ORDER BY txkey LIMIT $8)
SELECT h.id, p.txid::text, p.txkey
  FROM page p
 CROSS JOIN LATERAL (SELECT h.id FROM sync.change_history h
                      WHERE h.txid = p.txid AND h.id > p.after AND h.id >= p.lowest
                        AND h.id <= p.txkey AND h.op <> 'END') h
 ORDER BY p.txkey, h.id
 LIMIT $8";

/// The cursor of the calling transaction's snapshot: each change visible to the transaction
/// is before it, each other change after it.
#[pg_extern(volatile, parallel_unsafe)]
fn current_cursor() -> String {
    Spi::connect(|client| {
        let generation = log_state(client).0;
        Cursor::At {
            generation,
            mark: now_mark(client),
        }
        .encode()
    })
}

/// NULL when `cursor` can be read from, else why it is expired. Raises 22023 when it is
/// malformed. (Internal: `sync.changes_since` raises SY410 with the reason.)
#[pg_extern(name = "_cursor_problem", volatile, parallel_unsafe)]
fn cursor_problem(cursor: Option<&str>) -> Option<String> {
    let cursor = cursor.map(parse_or_raise)?;
    Spi::connect(|client| {
        let (generation, horizon) = log_state(client);
        expiry(&cursor, &generation, horizon).map(str::to_owned)
    })
}

/// One page of changes after `cursor` and, when `until` is given, not after it: the ids of
/// the log rows in delivery order, each with the cursor after it and whether it is the last
/// change of its transaction. (Internal: `sync.changes_since` joins the rows.)
#[pg_extern(name = "_changes_page", volatile, parallel_unsafe)]
fn changes_page(
    cursor: Option<&str>,
    max_rows: i32,
    until: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(change_id, i64),
        name!(cursor, String),
        name!(tx_end, bool),
    ),
> {
    if !(1..=MAX_PAGE_ROWS).contains(&max_rows) {
        invalid_parameter(format!(
            "max_rows must be between 1 and {MAX_PAGE_ROWS}, not {max_rows}"
        ));
    }
    let cursor = cursor.map(parse_or_raise);
    let until = until.map(parse_or_raise).map(|until| match until {
        Cursor::At { mark, .. } => mark,
        Cursor::Within { .. } => {
            invalid_parameter("until must be a cursor from sync.current_cursor()".into())
        }
    });
    if let (Some(cursor), Some(until)) = (&cursor, &until) {
        if !until.reaches(cursor) {
            invalid_parameter("cursor is after until".into());
        }
    }
    let rows = Spi::connect(|client| read_page(client, cursor, max_rows as usize, until));
    TableIterator::new(rows)
}

/// Whether `position` is at or after `target`: every change before `target` is before
/// `position` too. `position` must be a cursor from `sync.current_cursor()` (a gateway uses
/// this to see whether its live stream has reached a client's cursor).
#[pg_extern(immutable, parallel_safe)]
fn cursor_reached(position: &str, target: &str) -> bool {
    match (parse_or_raise(position), parse_or_raise(target)) {
        (Cursor::At { mark, generation }, target) if generation == target.generation() => {
            mark.reaches(&target)
        }
        (Cursor::At { .. }, _) => false,
        (Cursor::Within { .. }, _) => {
            invalid_parameter("position must be a cursor from sync.current_cursor()".into())
        }
    }
}

fn parse_or_raise(text: &str) -> Cursor {
    Cursor::decode(text).unwrap_or_else(|CursorError::Malformed(why)| {
        invalid_parameter(format!("malformed cursor: {why}"))
    })
}

/// Raises SQLSTATE 22023 (invalid_parameter_value).
pub(crate) fn invalid_parameter(message: String) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        function_name!(),
    )
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}

/// Walks batches from the cursor to the current snapshot (or `until`) until `max_rows` changes
/// are found: (id, the cursor after it, whether it ends its transaction).
fn read_page(
    client: &SpiClient<'_>,
    cursor: Option<Cursor>,
    max_rows: usize,
    until: Option<Mark>,
) -> Vec<(i64, String, bool)> {
    let current = now_mark(client);
    // The end of the read: `until`, unless this snapshot does not see all of it yet.
    let now = match until {
        Some(until) if current.snapshot.covers(&until.snapshot) => until,
        Some(_) => return Vec::new(),
        None => current,
    };
    let (generation, horizon) = log_state(client);
    // NULL: from the oldest retained change, i.e. from a mark that sees exactly the pruned past.
    let cursor = cursor.unwrap_or_else(|| Cursor::At {
        generation: generation.clone(),
        mark: Mark {
            snapshot: Snapshot {
                xmin: horizon,
                xmax: horizon,
                xip: vec![],
            },
            max_id: 0,
            next_xid: horizon,
        },
    });
    // A cursor from a snapshot newer than ours (a REPEATABLE READ transaction reading a
    // cursor made later, a standby that has not replayed as far as the cursor's primary or
    // standby): some changes before it may be invisible to us, so deliver nothing yet.
    if !now.snapshot.covers(&cursor.end().snapshot) {
        return Vec::new();
    }
    let (mut from, mut to, mut position) = match cursor {
        Cursor::At { mark, .. } => (mark, now.clone(), None),
        Cursor::Within {
            from, to, position, ..
        } => (from, to, Some(position)),
    };
    let mut out: Vec<(i64, String, bool)> = Vec::new();
    loop {
        let room = max_rows - out.len();
        let rows = batch_rows(client, &from, &to, position, room + 1);
        let exhausted = rows.len() <= room;
        // A row ends its transaction when the next row (one more was read for this) is of
        // another, or when it is the batch's last.
        let ends: Vec<bool> = (0..rows.len())
            .map(|i| rows.get(i + 1).is_none_or(|next| next.2 != rows[i].2))
            .collect();
        let cursors = BatchCursors::new(&generation, &from, &to);
        for ((id, txid, txkey), tx_end) in rows.into_iter().zip(ends).take(room) {
            out.push((id, cursors.encode(&Position { txkey, txid, id }), tx_end));
        }
        if !exhausted {
            return out;
        }
        // The batch is done: the cursor after its last change (or, if it had none, after the
        // last change of the batches before) is the batch's end, where the next one starts.
        if let Some(last) = out.last_mut() {
            last.1 = Cursor::At {
                generation: generation.clone(),
                mark: to.clone(),
            }
            .encode();
        }
        if to == now || out.len() == max_rows {
            return out;
        }
        from = to;
        to = now.clone();
        position = None;
    }
}

/// Up to `limit` rows of the batch `(from, to]` after `position`: (id, txid, txkey). Looks
/// at a window of ids past the position that grows until it holds `limit` rows or reaches
/// the batch's end.
fn batch_rows(
    client: &SpiClient<'_>,
    from: &Mark,
    to: &Mark,
    position: Option<Position>,
    limit: usize,
) -> Vec<(i64, u64, i64)> {
    let start = from.max_id.max(position.as_ref().map_or(0, |p| p.txkey));
    let mut window = (limit as i64).saturating_mul(4);
    loop {
        let end = start.saturating_add(window).min(to.max_id);
        let rows = batch_rows_up_to(client, from, to, position, limit, end);
        if rows.len() >= limit || end >= to.max_id {
            return rows;
        }
        window = window.saturating_mul(4);
    }
}

/// `batch_rows` among the transactions whose last id is at most `end`.
fn batch_rows_up_to(
    client: &SpiClient<'_>,
    from: &Mark,
    to: &Mark,
    position: Option<Position>,
    limit: usize,
    end: i64,
) -> Vec<(i64, u64, i64)> {
    let p = position.unwrap_or(Position {
        txkey: 0,
        txid: 0,
        id: 0,
    });
    let unsettled = format!(
        "{{{}}}",
        from.unsettled()
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let args = [
        unsettled.into(),
        to.snapshot.to_pg().into(),
        from.max_id.into(),
        to.max_id.into(),
        p.txkey.into(),
        p.txid.to_string().into(),
        p.id.into(),
        (limit as i64).into(),
        end.into(),
    ];
    // Planned for these values each time, not kept: a generic plan made while the log was
    // small can stay in use as it grows (see `sync.changes_since`, which had that problem).
    client
        .select(PAGE_SQL, None, &args)
        .expect("page query runs")
        .map(|row| {
            let id: i64 = row.get(1).expect("id").expect("id not null");
            let txid: String = row.get(2).expect("txid").expect("txid not null");
            let txkey: i64 = row.get(3).expect("txkey").expect("txkey not null");
            (id, txid.parse().expect("xid8 is a number"), txkey)
        })
        .collect()
}

/// The mark of the calling transaction's snapshot, on a primary or on a hot standby.
fn now_mark(client: &SpiClient<'_>) -> Mark {
    // SAFETY: reads a flag of shared memory.
    if unsafe { pg_sys::RecoveryInProgress() } {
        standby_mark(client)
    } else {
        current_mark(client)
    }
}

/// The mark of a hot standby's snapshot (SPEC 2.7). In recovery a snapshot does not list the
/// transactions in progress on the primary, and the next xid knows only what was replayed, so
/// the mark is built from one the primary made (the newest tick replayed, `sync.tick()`): the
/// log's transactions this snapshot sees and the tick does not (committed since, replayed)
/// become visible, and every other xid from the tick's xmax up to the newest of them stays in
/// progress. Exact: a change is before it exactly when this snapshot sees it.
///
/// The xids not seen need no more care: a transaction that took log ids below the largest
/// id seen wrote its first WAL record before the later transaction that took that id
/// committed, so the standby's next xid (replayed) is above it, and it is either listed here
/// or above the mark's xmax and below its `next_xid`: unsettled, found by its txid later.
fn standby_mark(client: &SpiClient<'_>) -> Mark {
    let tick: Option<String> = client
        .select(
            "SELECT (SELECT t.cursor FROM sync.tick t ORDER BY t.id DESC LIMIT 1)",
            Some(1),
            &[],
        )
        .expect("reading sync.tick")
        .first()
        .get_one()
        .expect("a tick's cursor");
    let Some(tick) = tick else {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_sync: this standby has replayed no tick yet".to_owned(),
            function_name!(),
        )
        .set_hint("Call SELECT sync.tick(); on the primary (a gateway with --read-url does).")
        .report(PgLogLevel::ERROR);
        unreachable!("an ERROR does not return")
    };
    let anchor = match Cursor::decode(&tick) {
        Ok(Cursor::At { mark, .. }) => mark,
        _ => invalid_parameter(format!("sync.tick holds a malformed cursor: {tick}")),
    };
    let unsettled = format!(
        "{{{}}}",
        anchor
            .unsettled()
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let row = client
        .select(
            "SELECT coalesce((SELECT max(h.id) FROM sync.change_history h), 0),
                    ARRAY(SELECT DISTINCT h.txid::text FROM sync.change_history h
                           WHERE (h.id > $1 OR h.txid = ANY ($2::xid8[]))
                             AND NOT pg_catalog.pg_visible_in_snapshot(h.txid, $3::pg_snapshot))",
            Some(1),
            &[
                anchor.max_id.into(),
                unsettled.into(),
                anchor.snapshot.to_pg().into(),
            ],
        )
        .expect("reading what the standby replayed since its tick")
        .first();
    let max_id: i64 = row.get(1).expect("max id").expect("max id not null");
    let seen_since: Vec<u64> = row
        .get::<Vec<String>>(2)
        .expect("txids")
        .unwrap_or_default()
        .iter()
        .map(|x| x.parse().expect("xid8 is a number"))
        .collect();
    // SAFETY: reads a counter under its lock: the next xid of what was replayed.
    let replayed_next = unsafe { pg_sys::ReadNextFullTransactionId() }.value;
    let s = &anchor.snapshot;
    let xmax = seen_since
        .iter()
        .map(|x| x + 1)
        .max()
        .unwrap_or(0)
        .max(s.xmax);
    let next_xid = replayed_next.max(xmax).max(anchor.next_xid);
    let too_many = (xmax - s.xmax) + s.xip.len() as u64 + (next_xid - xmax) > MAX_UNSETTLED;
    let seen_since: std::collections::HashSet<u64> = seen_since.into_iter().collect();
    let xip: Vec<u64> = if too_many {
        Vec::new()
    } else {
        s.xip
            .iter()
            .copied()
            .chain(s.xmax..xmax)
            .filter(|x| !seen_since.contains(x))
            .collect()
    };
    if too_many {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_SNAPSHOT_TOO_OLD,
            "pg_sync: too many transactions since this standby's last tick for a cursor".to_owned(),
            function_name!(),
        )
        .set_hint("Call SELECT sync.tick(); on the primary more often.")
        .report(PgLogLevel::ERROR);
    }
    Mark {
        snapshot: Snapshot::new(s.xmin, xmax, xip).expect("a snapshot of the tick's bounds"),
        max_id: max_id.max(anchor.max_id),
        next_xid,
    }
}

/// The mark of the current snapshot: it and the largest log id visible in it, read together.
///
/// A transaction that has written sees its own changes, but no other session does until it
/// commits, and `pg_current_snapshot()` is inconsistent about them (its own xid is "visible"
/// once a later xid completed, invisible before). So the mark counts the calling transaction
/// as in progress, like everyone else's view of it: its own changes come after its cursor.
fn current_mark(client: &SpiClient<'_>) -> Mark {
    let row = client
        .select(
            "SELECT pg_catalog.pg_current_snapshot()::text, own.xid::text,
                    coalesce((SELECT h.id FROM sync.change_history h
                               WHERE h.txid IS DISTINCT FROM own.xid
                               ORDER BY h.id DESC LIMIT 1), 0)
               FROM (SELECT pg_catalog.pg_current_xact_id_if_assigned() AS xid) own",
            Some(1),
            &[],
        )
        .expect("snapshot query runs")
        .first();
    let snapshot: String = row.get(1).expect("snapshot").expect("snapshot not null");
    let own: Option<String> = row.get(2).expect("own xid");
    let max_id: i64 = row.get(3).expect("max id").expect("max id not null");
    // Read after the snapshot was taken: an upper bound of the xids assigned before it.
    // SAFETY: reads a counter under its lock.
    let next_xid = unsafe { pg_sys::ReadNextFullTransactionId() }.value;
    // Every transaction this snapshot counts as completed wrote its commit or abort record
    // before it: make those durable before the mark leaves. Otherwise a crash hands their
    // xids out again (asynchronous commits, and every transaction that took an xid and wrote
    // nothing else, are not flushed at commit), and a later snapshot would stay "older" than
    // the mark until as many xids were used again, with the changes in between held back.
    // It also means no client holds a change that a crash takes back. Costs nothing when the
    // WAL is flushed already, one flush otherwise.
    // SAFETY: waits for the WAL up to a position already inserted to be flushed.
    unsafe { pg_sys::XLogFlush(inserted_wal_end()) };
    let mut snapshot = Snapshot::parse_pg(&snapshot).expect("PostgreSQL snapshots parse");
    let since_snapshot = next_xid.saturating_sub(snapshot.xmax);
    if since_snapshot > MAX_UNSETTLED {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_SNAPSHOT_TOO_OLD,
            format!(
                "pg_sync: this transaction's snapshot is too old for a cursor \
                 ({since_snapshot} transactions started since it was taken)"
            ),
            function_name!(),
        )
        .set_hint("Take cursors and read changes at the start of a REPEATABLE READ transaction, or in READ COMMITTED.")
        .report(PgLogLevel::ERROR);
    }
    if let Some(own) = own {
        snapshot.add_in_progress(own.parse().expect("xid8 is a number"));
    }
    Mark {
        snapshot,
        max_id,
        next_xid,
    }
}

/// The end of the WAL inserted so far. That is the insert position, except at the start of a
/// page: there it names the byte after the page's header, which is written only with the next
/// record, and a flush asked for it fails ("xlog flush request … is not satisfied", after a
/// segment switch and in a reconnect storm). The page's start is then the end.
fn inserted_wal_end() -> pg_sys::XLogRecPtr {
    /// `SizeOfXLogShortPHD` and `SizeOfXLogLongPHD` (access/xlog_internal.h): the headers
    /// of a page and of a segment's first page, MAXALIGNed.
    const SHORT: u64 = (std::mem::size_of::<pg_sys::XLogPageHeaderData>() as u64 + 7) & !7;
    const LONG: u64 = (std::mem::size_of::<pg_sys::XLogLongPageHeaderData>() as u64 + 7) & !7;
    // SAFETY: reads the insert position under its lock, and a setting fixed at start-up.
    let (at, segment) = unsafe {
        (
            pg_sys::GetXLogInsertRecPtr(),
            pg_sys::wal_segment_size as u64,
        )
    };
    if at % segment == LONG {
        at - LONG
    } else if at % u64::from(pg_sys::XLOG_BLCKSZ) == SHORT {
        at - SHORT
    } else {
        at
    }
}

/// The log's generation and retention horizon.
fn log_state(client: &SpiClient<'_>) -> (String, u64) {
    let row = client
        .select(
            "SELECT generation, horizon::text FROM sync.state",
            Some(1),
            &[],
        )
        .expect("sync.state is readable")
        .first();
    let generation: String = row
        .get(1)
        .expect("generation")
        .expect("generation not null");
    let horizon: String = row.get(2).expect("horizon").expect("horizon not null");
    (generation, horizon.parse().expect("xid8 is a number"))
}
