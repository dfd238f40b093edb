//! `GET /v1/changes?since=…[&limit=1000][&entityCode=…][&wait=20][&clientId=…][&aud=…]`: the
//! log for clients without sockets, judged as the socket judges it (`access::judge`, for a
//! whole-entity DELTA subscription): a refusal is 403 as for a snapshot, a change of a
//! replaced entity an item `{"action": "RESYNC", "reason": "entity_changed"}`.
//! `wait` long-polls: with nothing new, the request waits for the gateway's own "log moved"
//! signal (the router's position) holding no database connection, then reads again. Where
//! `since` stands is judged first (`deliver::reach`): expired 410, a cursor no database has
//! reached 400, one this gateway's live stream has not passed within `--behind-patience` (a
//! standby still replaying) 503 with `Retry-After`; never an empty answer for it. The request's place under the long-poll
//! caps is held until its answer (up to `MAX_LIMIT` changes) has been taken by the client:
//! answers nobody reads must not pile up in memory past the caps.
//!
//! Pages of one entity are shared within an audience (`access::sharing`): read once for all
//! its requests in flight, kept by the gateway (`http::pages`), and with `aud` in the URL and
//! `--shared-cache`, kept by the HTTP cache in front, which checks audiences: a closed page
//! (`http::pages::Page::closed`) for a year, another briefly. Every answer links the next
//! page (`Link: <…>; rel="next"`) with the audience of its reader; a URL whose `aud` is not
//! the reader's is redirected (307) to the reader's, so a cached page is served only to
//! whoever is of its audience. `/v1/changes/audience` is that check alone, for a cache's
//! authorization subrequest.

use super::error::ApiError;
use super::extract::{authenticate, bearer, check_client_id, Authenticated};
use super::pages::{Page, PageKey};
use crate::access::admission::readable;
use crate::access::judge::{decide, Db, Judge, Subscriber};
use crate::access::limits::Held;
use crate::access::listeners::Listeners;
use crate::access::roles::UserContext;
use crate::access::sharing;
use crate::deliver::reach::{reach, Reach};
use crate::feed::log::{read_page, Page as LogPage, ReadError};
use crate::model::cursor::Cursor;
use crate::model::digest::short_digest;
use crate::model::protocol::{Mode, ResyncReason};
use crate::model::subscription::{Judgement, Shape, Target};
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

pub const MAX_LIMIT: i32 = 10_000;
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// When a client whose cursor this gateway has not reached should come back.
const BEHIND_RETRY: Duration = Duration::from_secs(1);
/// How an answer may be kept: by the reader (`Cache-Control`, always `private`: a cache
/// that does not check the audience must not share it) and, with `--shared-cache`, by the
/// cache in front, which checks it (`X-Accel-Expires`, seconds, as docs/nginx.conf does).
struct Caching {
    cache_control: &'static str,
    shared_for: Option<&'static str>,
}

/// A closed page at its audience's URL: final for as long as it is retained (the first
/// answer a cache keeps is as right as any other gateway's).
const CLOSED: Caching = Caching {
    cache_control: "private, max-age=31536000, immutable",
    shared_for: Some("31536000"),
};
/// The live edge at its audience's URL: shared briefly (many readers at one position).
const OPEN: Caching = Caching {
    cache_control: "private, max-age=1",
    shared_for: Some("1"),
};
/// Anything else is one reader's, once.
const PRIVATE: Caching = Caching {
    cache_control: "private, no-store",
    shared_for: None,
};
/// What a query value escapes: all but RFC 3986's unreserved characters.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    since: Option<String>,
    limit: Option<i32>,
    entity_code: Option<String>,
    wait: Option<u64>,
    client_id: Option<String>,
    aud: Option<String>,
    /// The token, for clients that cannot send `Authorization` (kept in the links).
    token: Option<String>,
    /// The signature of a link's position (`http::links`).
    sig: Option<String>,
}

/// `asked` rounded down to 1, 2 or 5 times a power of ten (0 stays 0): what a page's `limit`
/// and `wait` are taken as. Each value is a URL of its own for the same page (and for
/// `limit`, a read and a place in the caches of its own), so that with every value from 1 to
/// 10,000 one user could make 10,000 of each page; with these, 13 limits and 7 waits. Both
/// are a most, so a smaller one answers the request.
fn one_two_five(asked: u64) -> u64 {
    if asked == 0 {
        return 0;
    }
    let mut power = 1;
    while power * 10 <= asked {
        power *= 10;
    }
    [5, 2, 1]
        .into_iter()
        .map(|step| step * power)
        .find(|&rounded| rounded <= asked)
        .unwrap_or(power)
}

/// A request's parameters, checked.
struct Request<'a> {
    since: Cursor,
    limit: i32,
    wait: Duration,
    params: &'a Params,
}

impl<'a> Request<'a> {
    fn parse(params: &'a Params) -> Result<Request<'a>, ApiError> {
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
        let limit = one_two_five(limit as u64) as i32;
        let wait = Duration::from_secs(one_two_five(
            params.wait.unwrap_or(0).min(MAX_WAIT.as_secs()),
        ));
        Ok(Request {
            since,
            limit,
            wait,
            params,
        })
    }

    /// This request's URL from `since`, with `aud` (none: one reader's) and the position's
    /// `sig`; the parameters in one order, so that the same page has one URL.
    fn url(&self, since: &Cursor, aud: Option<&str>, sig: Option<&str>) -> String {
        let encode = |s: &str| utf8_percent_encode(s, QUERY_VALUE).to_string();
        let mut url = format!(
            "/v1/changes?since={}&limit={}",
            encode(since.as_str()),
            self.limit
        );
        if let Some(code) = &self.params.entity_code {
            url += &format!("&entityCode={}", encode(code));
        }
        if let Some(aud) = aud {
            url += &format!("&aud={}", encode(aud));
        }
        if let Some(sig) = sig {
            url += &format!("&sig={}", encode(sig));
        }
        if self.params.wait.is_some() {
            url += &format!("&wait={}", self.wait.as_secs());
        }
        if let Some(client_id) = &self.params.client_id {
            url += &format!("&clientId={}", encode(client_id));
        }
        if let Some(token) = &self.params.token {
            url += &format!("&token={}", encode(token));
        }
        url
    }
}

/// Who shares a request's pages: the audience's digest, and the catalog epoch its plan was
/// read at (a page judged at another epoch is judged under other policies: not shared).
struct Audience {
    id: String,
    epoch: u64,
}

/// The audience `user` shares pages of this request with, if any: pages of one entity,
/// without a `clientId` (whose own changes are left out).
async fn audience_of(
    state: &AppState,
    user: &UserContext,
    params: &Params,
) -> Result<Option<Audience>, ApiError> {
    let Some(code) = &params.entity_code else {
        return Ok(None);
    };
    let readable = readable(&state.catalog, &state.plans, &state.work, user, code).await?;
    if params.client_id.is_some() {
        return Ok(None);
    }
    Ok(
        sharing::audience(&readable.entity, &readable.plan, user).map(|id| Audience {
            id,
            epoch: readable.epoch,
        }),
    )
}

pub async fn changes(
    State(state): State<Arc<AppState>>,
    auth: Authenticated,
    uri: Uri,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = auth.with_role()?;
    let request = Request::parse(&params)?;
    let audience = audience_of(&state, &user, &params).await?;
    let id = audience.as_ref().map(|a| a.id.as_str());
    // Whether a gateway linked this position (only then may a cache keep its page long, and
    // only then is the next position signed: a chain of signed positions starts at a
    // snapshot's cursor, never at one the reader made up).
    let entity = params.entity_code.as_deref().unwrap_or_default();
    let linked = params
        .sig
        .as_deref()
        .filter(|sig| state.page_links.signed(entity, request.since.as_str(), sig));
    if params.aud.is_some() && params.aud.as_deref() != id {
        // Another audience's URL (swapped, or from before a claim or policy change). A
        // signature goes on only if it was valid: the redirect signs nothing.
        let location = request.url(&request.since, id, linked);
        return Ok((
            StatusCode::TEMPORARY_REDIRECT,
            [
                (header::LOCATION, location),
                (header::CACHE_CONTROL, PRIVATE.cache_control.into()),
            ],
        )
            .into_response());
    }
    // Held while the request waits too: waiting costs no database connection, but memory.
    let place = state.caps.long_polls.take(&user.sub)?;
    let (page, shared) = match &audience {
        Some(audience) => shared(&state, &user, &request, audience).await?,
        None => (
            Arc::new(private(&state, &user, &request, &user.sub).await?),
            false,
        ),
    };
    // The empty live edge is not kept: its next link may be its own URL.
    let caching = match (shared && params.aud.is_some(), page.closed, page.empty) {
        (true, true, _) => CLOSED,
        (true, false, false) => OPEN,
        _ => PRIVATE,
    };
    // A cache in front keys pages by URL: only the one URL of a page (as links name it) is
    // kept there, so that variants of it (another order, an unknown parameter) cannot fill
    // the cache and push out everyone's pages. Nor a URL with a token: each token would be
    // another copy of the page (and the cache would keep the token). Nor a closed page at a
    // position no gateway linked (a made-up cursor would be a page kept a year).
    let canonical =
        uri.path_and_query().map(|p| p.as_str()) == Some(&request.url(&request.since, id, linked));
    let kept_in_front = state.config.shared_cache
        && canonical
        && params.token.is_none()
        && (linked.is_some() || !page.closed);
    let caching = match kept_in_front {
        true => caching,
        false => Caching {
            shared_for: None,
            ..caching
        },
    };
    let sig = (id.is_some() && linked.is_some())
        .then(|| state.page_links.sign(entity, page.cursor.as_str()));
    let next = request.url(&page.cursor, id, sig.as_deref());
    Ok(answer(&page, caching, &next, &headers, place))
}

/// `GET /v1/changes/audience`, for an HTTP cache's authorization subrequest: 204 when the
/// original request (its URL in `X-Original-URI`) names no audience or the token holder's
/// (the token in `Authorization`, or in the original URL), 401 for a bad token, else 403;
/// the cache then passes the request on to a gateway, which gives it its real answer (a
/// redirect, a refusal, a bad request).
pub async fn check_audience(State(state): State<Arc<AppState>>, headers: HeaderMap) -> StatusCode {
    let original: Option<Uri> = headers
        .get("x-original-uri")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let Some(Ok(Query(params))) = original.map(|uri| Query::<Params>::try_from_uri(&uri)) else {
        return StatusCode::FORBIDDEN;
    };
    let token = bearer(&headers).or_else(|| params.token.clone());
    let user = match authenticate(&state, token).map(Authenticated::with_role) {
        Err(e) => return e.status(),
        Ok(Err(_)) => return StatusCode::FORBIDDEN,
        Ok(Ok(user)) => user,
    };
    let Some(asked) = &params.aud else {
        return StatusCode::NO_CONTENT;
    };
    match audience_of(&state, &user, &params).await {
        Ok(Some(audience)) if *asked == audience.id => StatusCode::NO_CONTENT,
        _ => StatusCode::FORBIDDEN,
    }
}

/// The page after `since` as `audience` sees it, and whether it is the audience's: a closed
/// page from the cache, else read once for every request of the audience that asks at the
/// live position, long-polled. The shared read runs as a task of its own (a reader going
/// away does not cancel it for the others), under caps of the audience's own, not of the
/// reader who came first (who could fill theirs to make it fail); that reader spends a place
/// of their own too while it runs, so that requests started and abandoned at once cannot
/// keep more reads going than their cap (one per entity's audience otherwise). A shared read
/// that fails, or that was judged under other policies than the audience was made from, or
/// whose starter has no place left, is shared with nobody: each reader then reads alone,
/// under its own caps.
async fn shared(
    state: &Arc<AppState>,
    user: &UserContext,
    request: &Request<'_>,
    audience: &Audience,
) -> Result<(Arc<Page>, bool), ApiError> {
    let key = PageKey {
        since: request.since.as_str().to_owned(),
        limit: request.limit,
        entity: request.params.entity_code.clone().unwrap_or_default(),
        audience: audience.id.clone(),
        at: None,
    };
    let deadline = tokio::time::Instant::now() + request.wait;
    let mut moved = state.position.clone();
    loop {
        if let Some(page) = state.pages.closed(&key).await {
            return Ok((page, true));
        }
        let at = moved
            .borrow_and_update()
            .as_ref()
            .map(|p| p.as_str().to_owned());
        let key = PageKey {
            at: Some(at.unwrap_or_default()),
            ..key.clone()
        };
        let read = {
            let (state, user, params) = (state.clone(), user.clone(), request.params.clone());
            let (since, limit, epoch) = (request.since.clone(), request.limit, audience.epoch);
            let key_audience = audience.id.clone();
            async move {
                let at_once = Request {
                    since,
                    limit,
                    wait: Duration::ZERO,
                    params: &params,
                };
                let _starter = state.work.hold(&user.sub).ok()?;
                // NUL: no token's `sub` names it in practice.
                let holder = format!("\0audience {}", key_audience);
                let page = private(&state, &user, &at_once, &holder).await.ok()?;
                (state.catalog.view().epoch == epoch).then_some(page)
            }
        };
        // Spawned only by the one request that reads (moka runs one init per key).
        let Some(page) = state
            .pages
            .read_once(key, async { tokio::spawn(read).await.ok().flatten() })
            .await
        else {
            let alone = private(state, user, request, &user.sub).await?;
            return Ok((Arc::new(alone), false));
        };
        if !page.empty || page.full || tokio::time::Instant::now() >= deadline {
            return Ok((page, true));
        }
        // Nothing yet: wait for the live stream to move on, or for the time to run out (or
        // for the gateway to stop).
        if let Ok(Err(_)) = tokio::time::timeout_at(deadline, moved.changed()).await {
            return Ok((page, true));
        }
    }
}

/// The page after `since` as `user` sees it, long-polled, its queries counted under
/// `holder`'s caps.
async fn private(
    state: &AppState,
    user: &UserContext,
    request: &Request<'_>,
    holder: &str,
) -> Result<Page, ApiError> {
    match reach(state, holder, &request.since, state.config.behind_patience).await? {
        Reach::Live => {}
        Reach::Expired => return Err(ApiError::gone_expired()),
        Reach::Ahead => {
            return Err(ApiError::bad_request(
                "since is a cursor the database has not reached",
            ))
        }
        Reach::Behind => return Err(ApiError::behind(BEHIND_RETRY)),
    }
    let mut deadline = tokio::time::Instant::now() + request.wait;
    let mut moved = state.position.clone();
    let mut group = Arc::new(Listeners::alone(Arc::new(user.clone()), 0));
    let mut judge = Judge::resume(state.pages.refetch_checks(&request.since).await.as_deref());
    let mut cursor = request.since.clone();
    loop {
        moved.borrow_and_update();
        let mut work = state.work.start(holder).await?;
        state.metrics.changes_pages_read.inc();
        let page = read_page(&mut work.client, Some(&cursor), request.limit, None)
            .await
            .map_err(|e| match e {
                ReadError::Expired(_) => ApiError::gone_expired(),
                ReadError::Malformed(why) => ApiError::bad_request(format!("since: {why}")),
                ReadError::Database(e) => ApiError::from_db(e),
                other => ApiError::internal(other),
            })?;
        let (end, full) = (page.end.clone(), page.more);
        let out = render(
            state,
            user,
            request.params,
            &mut group,
            &mut judge,
            &work.client,
            page,
        )
        .await?;
        drop(work);
        cursor = end;
        if !out.is_empty() || full || tokio::time::Instant::now() >= deadline {
            let body = Bytes::from(
                serde_json::to_vec(&json!({"changes": out, "cursor": cursor}))
                    .expect("JSON values serialize"),
            );
            state
                .pages
                .keep_refetch_checks(cursor.clone(), judge.refetch_checks())
                .await;
            return Ok(Page {
                etag: format!("\"{}\"", short_digest(&body)),
                body,
                closed: full && cursor.in_batch_read_from(&request.since),
                cursor,
                full,
                empty: out.is_empty(),
            });
        }
        // Nothing yet: wait for the live stream to move on, or for the time to run out (the
        // gateway stopping ends it: one more read, then the answer).
        if let Ok(Err(_)) = tokio::time::timeout_at(deadline, moved.changed()).await {
            deadline = tokio::time::Instant::now();
        }
    }
}

/// The page as JSON with its headers (`Link` to `next`), or 304 when the client holds it
/// (`If-None-Match`); `place` given back once the body has been sent (the body's last, empty
/// part is asked for only when the rest was taken).
fn answer(page: &Page, caching: Caching, next: &str, request: &HeaderMap, place: Held) -> Response {
    let mut headers = HeaderMap::new();
    let mut set = |name, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    set(header::CACHE_CONTROL, caching.cache_control);
    if let Some(seconds) = caching.shared_for {
        set(HeaderName::from_static("x-accel-expires"), seconds);
    }
    set(header::ETAG, &page.etag);
    set(header::LINK, &format!("<{next}>; rel=\"next\""));
    let held = request
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == page.etag.as_bytes());
    if held {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let sent = futures_util::stream::once(async move { drop(place) })
        .filter_map(|()| async { None::<Result<Bytes, std::io::Error>> });
    let body = futures_util::stream::iter([Ok(page.body.clone())]).chain(sent);
    (headers, Body::from_stream(body)).into_response()
}

/// The page's changes this user may see, DELTA-shaped with `entityCode` and `cursor`.
async fn render(
    state: &AppState,
    user: &UserContext,
    params: &Params,
    group: &mut Arc<Listeners>,
    judge: &mut Judge,
    client: &tokio_postgres::Client,
    page: LogPage,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_waits_are_one_two_or_five_times_a_power_of_ten_at_most_the_asked() {
        let rounded = |range: std::ops::RangeInclusive<u64>| {
            let mut all: Vec<u64> = range.map(one_two_five).collect();
            all.dedup();
            all
        };
        assert_eq!(
            rounded(1..=MAX_LIMIT as u64),
            [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000]
        );
        assert_eq!(one_two_five(1000), 1000, "the default limit stays");
        assert_eq!(one_two_five(999), 500);
        assert_eq!(one_two_five(4), 2);
        assert_eq!(rounded(0..=MAX_WAIT.as_secs()), [0, 1, 2, 5, 10, 20, 50]);
    }
}
