//! Whether this gateway can serve a client from its cursor now: one judgement for a
//! SUBSCRIBE's `since` and a long-poll's (SPEC 2.7). Never "no changes" for a position the
//! gateway has not reached: a cursor the database has but the live stream has not passed
//! yet (a standby still replaying, a gateway further ahead) is waited for, a bounded time.

use crate::access::limits::Busy;
use crate::model::cursor::Cursor;
use crate::AppState;
use std::time::Duration;

/// Where a client's cursor stands for this gateway.
#[derive(Debug, PartialEq, Eq)]
pub enum Reach {
    /// The live stream has passed it: serve from it.
    Live,
    /// Changes after it were pruned, or it is of another database (or of this one before a
    /// restore).
    Expired,
    /// No database has reached it (made up, or forged).
    Ahead,
    /// The primary has reached it, but this gateway's live stream did not within the
    /// patience: come back later, here or elsewhere.
    Behind,
}

const READ_SQL: &str =
    "SELECT sync._cursor_problem($1), sync.cursor_reached(sync.current_cursor(), $1)";
const PRIMARY_SQL: &str = "SELECT sync.cursor_reached(sync.current_cursor(), $1)";

/// Where `since` stands for `user`'s request, waiting up to `patience` for the live stream.
pub async fn reach(
    state: &AppState,
    user: &str,
    since: &Cursor,
    patience: Duration,
) -> Result<Reach, Busy> {
    let query = |sql, work: crate::access::limits::Work| async move {
        work.client
            .query_one(sql, &[&since.as_str()])
            .await
            .map_err(|e| Busy::Database(crate::ErrorChain(&e).to_string()))
    };
    let row = query(READ_SQL, state.work.start(user).await?).await?;
    if row.get::<_, Option<String>>(0).is_some() {
        return Ok(Reach::Expired);
    }
    // Not where this gateway reads (a standby behind): the primary may have it.
    let reached = row.get::<_, bool>(1)
        || (state.work.reads_replica()
            && query(PRIMARY_SQL, state.work.start_on_primary(user).await?)
                .await?
                .get::<_, bool>(0));
    if !reached {
        return Ok(Reach::Ahead);
    }
    let mut position = state.position.clone();
    let passed = tokio::time::timeout(patience, async {
        loop {
            if position
                .borrow_and_update()
                .as_ref()
                .is_some_and(|p| p.reaches(since))
            {
                return true;
            }
            if position.changed().await.is_err() {
                return false;
            }
        }
    })
    .await;
    Ok(match passed {
        Ok(true) => Reach::Live,
        _ => Reach::Behind,
    })
}
