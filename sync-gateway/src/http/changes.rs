//! `GET /v1/changes?since=…[&limit=1000][&entityCode=…][&wait=25][&clientId=…]`: the log for
//! clients without sockets, judged as the socket judges it (`model::subscription::judge` for
//! a whole-entity DELTA subscription, row-level security by `access::visibility::Judge`).
//! `wait` long-polls: with nothing new, the request waits for the gateway's own "log moved"
//! signal (the router's position) holding no database connection, then reads again. A cursor
//! the database has not reached is refused at once. The request's place under the long-poll
//! caps is held until its answer (up to `MAX_LIMIT` changes) has been taken by the client:
//! answers nobody reads must not pile up in memory past the caps.

use super::error::ApiError;
use super::extract::{check_client_id, Authenticated};
use crate::access::limits::Held;
use crate::access::plans::Plan;
use crate::access::visibility::{ChangeSight, Judge, Listeners};
use crate::feed::log::{read_page, Page, ReadError};
use crate::model::change::Change;
use crate::model::cursor::Cursor;
use crate::model::protocol::Mode;
use crate::model::subscription::{judge, Judgement, Shape, Target};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

pub const MAX_LIMIT: i32 = 10_000;
pub const MAX_WAIT: Duration = Duration::from_secs(60);

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
    let deadline = tokio::time::Instant::now() + wait;
    let mut moved = state.position.clone();
    let group = Listeners::new(0, [(0, Arc::new(user.clone()))]);
    let mut judge_rows = Judge::default();
    let mut cursor = since;
    let mut first = true;
    loop {
        moved.borrow_and_update();
        let mut work = state.work.start(&user.sub).await?;
        let page = read_page(&mut work.client, Some(&cursor), limit, None)
            .await
            .map_err(|e| match e {
                ReadError::Expired(_) => ApiError::gone_expired(),
                ReadError::Malformed(why) => ApiError::bad_request(format!("since: {why}")),
                other => ApiError::internal(other),
            })?;
        if first && page.changes.is_empty() && !page.end.reaches(&cursor) {
            return Err(ApiError::bad_request(
                "since is a cursor the database has not reached",
            ));
        }
        first = false;
        let out = render(
            &state,
            &user,
            &params,
            &group,
            &mut judge_rows,
            &work.client,
            &page,
        )
        .await?;
        drop(work);
        cursor = page.end.clone();
        if !out.is_empty() || page.more || tokio::time::Instant::now() >= deadline {
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
    group: &Listeners,
    judge_rows: &mut Judge,
    client: &tokio_postgres::Client,
    page: &Page,
) -> Result<Vec<Value>, ApiError> {
    let role = user.role.as_deref().expect("with_role");
    let mut by_entity: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for change in &page.changes {
        if params
            .entity_code
            .as_ref()
            .is_none_or(|e| *e == change.entity_code)
        {
            by_entity
                .entry(change.entity_code.as_str())
                .or_default()
                .push(change);
        }
    }
    // Per change id: what the user may see of it; changes of entities it may not read at all
    // are left out.
    let mut sights: HashMap<i64, Option<ChangeSight>> = HashMap::new();
    for (code, changes) in by_entity {
        let Some(entity) = state.catalog.cached(code) else {
            continue;
        };
        let plan: Arc<Plan> = state
            .plans
            .get(client, &entity, role)
            .await
            .map_err(ApiError::from_db)?;
        if plan.refusal(&entity).is_some() {
            continue;
        }
        let judged = judge_rows
            .entity(client, &state.plans, &entity, group, &changes)
            .await;
        if let Some((_, why)) = judged.refused.into_iter().next() {
            return Err(ApiError::forbidden(why));
        }
        match judged.sights {
            None => sights.extend(changes.iter().map(|c| (c.id, None))),
            Some(s) => sights.extend(changes.iter().map(|c| c.id).zip(s.into_iter().map(Some))),
        }
    }
    let everything = Target::Rows(None);
    let delta = Shape {
        mode: Mode::Delta,
        columns: None,
    };
    let mut out = Vec::new();
    for change in &page.changes {
        let Some(sight) = sights.get(&change.id) else {
            continue;
        };
        let own = change.written_by(&user.sub, params.client_id.as_deref());
        let rendered = match judge(change, &everything, ChangeSight::of(sight.as_ref(), 0), own) {
            Judgement::Skip => continue,
            Judgement::Resync => json!({"entityCode": change.entity_code, "action": "TRUNCATE"}),
            Judgement::Deliver(action) => {
                let mut rendered =
                    serde_json::to_value(delta.render(change, action)).expect("serializes");
                rendered["entityCode"] = json!(change.entity_code);
                rendered
            }
        };
        let mut rendered = rendered;
        rendered["cursor"] = json!(change.cursor);
        out.push(rendered);
    }
    Ok(out)
}
