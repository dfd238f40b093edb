//! `GET /v1/changes?since=…[&limit=1000][&entityCode=…][&wait=25][&clientId=…]`: the log for
//! clients without sockets, with the same filtering and row-level security as the socket.
//! `wait` long-polls: with nothing new, the request waits (woken by the same reader that
//! feeds the sockets) until a change arrives or the time is up.

use crate::access::{can_read, ids_to_check, judge, visible_rows, UserContext, Verdict};
use crate::http::ApiError;
use crate::log::{read_page, Op, ReadError};
use crate::outbox::Shape;
use crate::router::{Subscription, Target};
use crate::AppState;
use serde::Deserialize;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub const MAX_LIMIT: i32 = 10_000;
pub const MAX_WAIT_SECS: u64 = 60;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    pub since: Option<String>,
    pub limit: Option<i32>,
    pub entity_code: Option<String>,
    pub wait: Option<u64>,
    pub client_id: Option<String>,
    pub token: Option<String>,
}

pub async fn changes(
    state: Arc<AppState>,
    user: UserContext,
    params: Params,
) -> Result<Value, ApiError> {
    let since = params
        .since
        .ok_or_else(|| ApiError::bad_request("since is required: take it from a snapshot"))?;
    let limit = params.limit.unwrap_or(1000);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit is 1 to {MAX_LIMIT}")));
    }
    let wait = Duration::from_secs(params.wait.unwrap_or(0).min(MAX_WAIT_SECS));
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
    let deadline = tokio::time::Instant::now() + wait;
    let mut position = state.position.clone();
    let mut cursor = since;
    let mut client = state.pool.get().await.map_err(ApiError::internal)?;
    // Per entity: whether the user may read it at all.
    let mut readable: HashMap<String, bool> = HashMap::new();
    loop {
        position.borrow_and_update();
        let page = read_page(&mut client, Some(&cursor), limit, None)
            .await
            .map_err(|e| match e {
                ReadError::Expired(_) => ApiError::gone_expired(),
                ReadError::Malformed(why) => ApiError::bad_request(format!("since: {why}")),
                other => ApiError::internal(other),
            })?;
        cursor = page.end.clone();
        let mut out = Vec::new();
        let mut by_entity: HashMap<&str, Vec<&crate::log::Change>> = HashMap::new();
        for change in &page.changes {
            if params
                .entity_code
                .as_ref()
                .is_some_and(|e| *e != change.entity_code)
                || change.written_by(&user.sub, params.client_id.as_deref())
            {
                continue;
            }
            by_entity
                .entry(change.entity_code.as_str())
                .or_default()
                .push(change);
        }
        // The verdicts of the changes of tables with RLS, one query per entity.
        let mut verdicts: HashMap<i64, (Verdict, Option<crate::log::Change>)> = HashMap::new();
        for (code, changes) in &by_entity {
            let Some(entity) = state
                .catalog
                .entity(code)
                .await
                .map_err(ApiError::internal)?
            else {
                continue;
            };
            let allowed = match readable.get(*code) {
                Some(allowed) => *allowed,
                None => {
                    let allowed = can_read(&client, &user, &entity)
                        .await
                        .map_err(ApiError::from_db)?;
                    readable.insert(code.to_string(), allowed);
                    allowed
                }
            };
            let rows = if !allowed {
                None
            } else if entity.rls {
                let ids = ids_to_check(changes.iter().copied());
                Some(
                    visible_rows(&client, &entity, &user, &ids)
                        .await
                        .map_err(ApiError::from_db)?,
                )
            } else {
                for change in changes {
                    verdicts.insert(change.id, (Verdict::Send, None));
                }
                continue;
            };
            for change in changes {
                let judged = match &rows {
                    Some(rows) => {
                        let (verdict, change) = judge(change, rows);
                        let copy = matches!(change, Cow::Owned(_)).then(|| change.into_owned());
                        (verdict, copy)
                    }
                    None => (Verdict::Skip, None),
                };
                verdicts.insert(change.id, judged);
            }
        }
        let everything = Subscription {
            entity_code: String::new(),
            target: Target::Rows(None),
            shape: Shape {
                mode: crate::protocol::Mode::Delta,
                columns: None,
            },
        };
        for change in &page.changes {
            let Some((v, current)) = verdicts.get(&change.id) else {
                continue;
            };
            // A visible row that changed since goes out as it is now.
            let change = current.as_ref().unwrap_or(change);
            if change.op == Op::Truncate {
                if *v == Verdict::Send {
                    out.push(json!({"entityCode": change.entity_code, "action": "TRUNCATE", "cursor": change.cursor}));
                }
                continue;
            }
            // Gone rows were seen by nobody in particular here: nothing to say.
            let Some(action) = everything.view_checked(change, *v) else {
                continue;
            };
            let mut rendered =
                serde_json::to_value(everything.shape.render(change, action)).expect("serializes");
            rendered["entityCode"] = json!(change.entity_code);
            rendered["cursor"] = json!(change.cursor);
            out.push(rendered);
        }
        let waited_out = tokio::time::Instant::now() >= deadline;
        if !out.is_empty() || page.more || waited_out {
            return Ok(json!({"changes": out, "cursor": cursor}));
        }
        // Nothing yet: wait for the reader to move on, or for the time to run out.
        let _ = tokio::time::timeout_at(deadline, position.changed()).await;
    }
}
