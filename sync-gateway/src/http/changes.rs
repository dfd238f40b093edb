//! `GET /v1/changes?since=…[&limit=1000][&entityCode=…][&wait=25][&clientId=…]`: the log for
//! clients without sockets, judged as the socket judges it (`access::judge`, for a
//! whole-entity DELTA subscription): a refusal is 403 as for a snapshot, a change of a
//! replaced entity an item `{"action": "RESYNC", "reason": "entity_changed"}`.
//! `wait` long-polls: with nothing new, the request waits for the gateway's own "log moved"
//! signal (the router's position) holding no database connection, then reads again. Where
//! `since` stands is judged first (`deliver::reach`): expired 410, a cursor no database has
//! reached 400, one this gateway's live stream has not passed within `--behind-patience` (a
//! standby still replaying) 503 with `Retry-After`; never an empty answer for it. The request's place under the long-poll
//! caps is held until its answer (up to `MAX_LIMIT` changes) has been taken by the client:
//! answers nobody reads must not pile up in memory past the caps.

use super::error::ApiError;
use super::extract::{check_client_id, Authenticated};
use crate::access::judge::{decide, Db, Judge, Listeners, Subscriber};
use crate::access::limits::Held;
use crate::deliver::reach::{reach, Reach};
use crate::feed::log::{read_page, Page, ReadError};
use crate::model::cursor::Cursor;
use crate::model::protocol::{Mode, ResyncReason};
use crate::model::subscription::{Judgement, Shape, Target};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

pub const MAX_LIMIT: i32 = 10_000;
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// When a client whose cursor this gateway has not reached should come back.
const BEHIND_RETRY: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    since: Option<String>,
    limit: Option<i32>,
    entity_code: Option<String>,
    wait: Option<u64>,
    client_id: Option<String>,
}

pub async fn changes(
    State(state): State<Arc<AppState>>,
    auth: Authenticated,
    Query(params): Query<Params>,
) -> Result<Response, ApiError> {
    let user = auth.with_role()?;
    check_client_id(params.client_id.as_deref())?;
    let since = params
        .since
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("since is required: take it from a snapshot"))?;
    let since =
        Cursor::from_client(since).map_err(|e| ApiError::bad_request(format!("since: {e}")))?;
    let limit = params.limit.unwrap_or(1000);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit is 1 to {MAX_LIMIT}")));
    }
    let wait = Duration::from_secs(params.wait.unwrap_or(0)).min(MAX_WAIT);
    if let Some(code) = &params.entity_code {
        if state
            .catalog
            .entity(code)
            .await
            .map_err(ApiError::internal)?
            .is_none()
        {
            return Err(ApiError::unknown_entity(code));
        }
    }
    // Held while the request waits too: waiting costs no database connection, but memory.
    let place = state.caps.long_polls.take(&user.sub)?;
    match reach(&state, &user.sub, &since, state.config.behind_patience).await? {
        Reach::Live => {}
        Reach::Expired => return Err(ApiError::gone_expired()),
        Reach::Ahead => {
            return Err(ApiError::bad_request(
                "since is a cursor the database has not reached",
            ))
        }
        Reach::Behind => return Err(ApiError::behind(BEHIND_RETRY)),
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut moved = state.position.clone();
    let mut group = Arc::new(Listeners::alone(Arc::new(user.clone()), 0));
    let mut judge = Judge::default();
    let mut cursor = since;
    loop {
        moved.borrow_and_update();
        let mut work = state.work.start(&user.sub).await?;
        let page = read_page(&mut work.client, Some(&cursor), limit, None)
            .await
            .map_err(|e| match e {
                ReadError::Expired(_) => ApiError::gone_expired(),
                ReadError::Malformed(why) => ApiError::bad_request(format!("since: {why}")),
                ReadError::Database(e) => ApiError::from_db(e),
                other => ApiError::internal(other),
            })?;
        let (end, more) = (page.end.clone(), page.more);
        let out = render(
            &state,
            &user,
            &params,
            &mut group,
            &mut judge,
            &work.client,
            page,
        )
        .await?;
        drop(work);
        cursor = end;
        if !out.is_empty() || more || tokio::time::Instant::now() >= deadline {
            return Ok(answer(json!({"changes": out, "cursor": cursor}), place));
        }
        // Nothing yet: wait for the live stream to move on, or for the time to run out.
        let _ = tokio::time::timeout_at(deadline, moved.changed()).await;
    }
}

/// `value` as JSON, with `place` given back once the body has been sent (the body's last,
/// empty part is asked for only when the rest was taken).
fn answer(value: Value, place: Held) -> Response {
    let json = serde_json::to_vec(&value).expect("JSON values serialize");
    let sent = futures_util::stream::once(async move { drop(place) })
        .filter_map(|()| async { None::<Result<Vec<u8>, std::io::Error>> });
    let body = futures_util::stream::iter([Ok(json)]).chain(sent);
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

/// The page's changes this user may see, DELTA-shaped with `entityCode` and `cursor`.
async fn render(
    state: &AppState,
    user: &crate::access::roles::UserContext,
    params: &Params,
    group: &mut Arc<Listeners>,
    judge: &mut Judge,
    client: &tokio_postgres::Client,
    page: Page,
) -> Result<Vec<Value>, ApiError> {
    let changes = page
        .changes
        .into_iter()
        .filter(|c| {
            params
                .entity_code
                .as_ref()
                .is_none_or(|e| *e == c.entity_code)
        })
        .map(Arc::new)
        .collect();
    let judged = judge
        .page(
            &state.catalog,
            &state.plans,
            &mut Db::Held(client),
            page.access_serial,
            changes,
            group,
        )
        .await
        .map_err(ApiError::internal)?;
    if let Some((_, _, why)) = judged.refused.into_iter().next() {
        return Err(ApiError::forbidden(why));
    }
    let subscriber = Subscriber {
        sub: &user.sub,
        client_id: params.client_id.as_deref(),
        group: 0,
    };
    let everything = Target::Rows(None);
    let delta = Shape {
        mode: Mode::Delta,
        columns: None,
    };
    let mut out = Vec::new();
    for (change, verdict) in judged.changes.iter().zip(&judged.verdicts) {
        let mut rendered = match decide(change, verdict, &subscriber, &everything) {
            Judgement::Skip => continue,
            Judgement::Resync(ResyncReason::Truncate) => json!({"action": "TRUNCATE"}),
            Judgement::Resync(reason) => json!({"action": "RESYNC", "reason": reason}),
            Judgement::Deliver(action) => {
                serde_json::to_value(delta.render(change, action)).expect("serializes")
            }
        };
        rendered["entityCode"] = json!(change.entity_code);
        rendered["cursor"] = json!(change.cursor);
        if change.tx_end {
            rendered["txEnd"] = json!(true);
        }
        out.push(rendered);
    }
    Ok(out)
}
