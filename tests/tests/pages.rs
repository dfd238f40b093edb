//! Cacheable pages of `/v1/changes` (SPEC 2.4): a page that ended at its limit is the same
//! bytes for everyone of its audience, forever, and says so to HTTP caches; identical reads in
//! flight are made once. The attacker holds a valid token and someone else's page URL: of
//! another audience (other claims), from before a claim or policy change, or of a table whose
//! policy only the database can judge. Each gets a redirect to a URL of their own, never the
//! page.

use futures_util::StreamExt;
use pg_sync_tests::gateway::{http_request, token, Gateway, HttpResponse, PATIENCE, SECRET};
use pg_sync_tests::nginx::Nginx;
use pg_sync_tests::{Cluster, GATEWAY_ROLE};
use serde_json::{json, Value};

/// Tasks are visible within their org; `note` is visible through a table the policy reads
/// (the gateway cannot compile that: its pages are nobody's to share).
const SCHEMA: &str = "
    CREATE TABLE task (id int PRIMARY KEY, org text NOT NULL, title text);
    ALTER TABLE task ENABLE ROW LEVEL SECURITY;
    CREATE POLICY by_org ON task
        USING (org = current_setting('request.jwt.claims', true)::jsonb ->> 'org');
    CREATE TABLE reader (sub text PRIMARY KEY);
    CREATE TABLE note (id int PRIMARY KEY);
    ALTER TABLE note ENABLE ROW LEVEL SECURITY;
    CREATE POLICY readers ON note USING (EXISTS (
        SELECT 1 FROM reader r
         WHERE r.sub = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));
    SELECT sync.track('task');
    SELECT sync.track('note');";

/// A cluster with 30 tasks and a gateway told that the cache in front checks audiences; the
/// cursor of a snapshot of tasks taken before them, and its signature.
async fn setup() -> (Cluster, Gateway, String, String) {
    let cluster = Cluster::start().await;
    cluster.execute(SCHEMA).await;
    let gateway = Gateway::start(&cluster, &["--shared-cache"]).await;
    let (start, sig) = snapshot_start(&gateway).await;
    // 30 tasks, half of each org, one transaction each.
    for id in 1..=30 {
        let org = if id % 2 == 0 { "acme" } else { "beta" };
        cluster
            .execute(&format!("INSERT INTO task VALUES ({id}, '{org}', 't{id}')"))
            .await;
    }
    (cluster, gateway, start, sig)
}

/// An empty `--page-link-secret` is refused at start: anyone could sign links with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_page_link_secret_is_refused() {
    let cluster = Cluster::start().await;
    let args: Vec<String> = [
        "--database-url",
        &cluster.url_as(GATEWAY_ROLE, "postgres"),
        "--page-link-secret",
        "",
    ]
    .map(str::to_owned)
    .into();
    let refused = Gateway::launch(&args).await.err().expect("refused");
    assert!(refused.contains("--page-link-secret is empty"), "{refused}");
}

/// The cursor of a snapshot of tasks and its `sig`: the page of `/v1/changes` from it may be
/// kept in front.
async fn snapshot_start(gateway: &Gateway) -> (String, String) {
    let snapshot = get(gateway, &bearer("starter", "acme"), "/v1/snapshot/task").await;
    assert_eq!(snapshot.status, 200);
    let head = snapshot.body.split(|b| *b == b'\n').next().unwrap();
    let head: Value = serde_json::from_slice(head).unwrap();
    let field = |name: &str| head[name].as_str().expect("cursor and sig").to_owned();
    (field("cursor"), field("sig"))
}

fn bearer(sub: &str, org: &str) -> String {
    format!(
        "Bearer {}",
        token(sub, &[("role", json!("app_user")), ("org", json!(org))])
    )
}

async fn get(gateway: &Gateway, auth: &str, path: &str) -> HttpResponse {
    get_with(gateway, auth, path, &[]).await
}

async fn get_with(
    gateway: &Gateway,
    auth: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut all = vec![("Authorization", auth)];
    all.extend_from_slice(headers);
    gateway.request("GET", path, &all, None).await.unwrap()
}

/// The URL of `Link: <…>; rel="next"`.
fn next(response: &HttpResponse) -> String {
    let link = response.header("link").expect("a Link header");
    link.strip_prefix('<')
        .and_then(|l| l.split_once('>'))
        .map(|(url, _)| url.to_owned())
        .unwrap_or_else(|| panic!("a link: {link}"))
}

fn query(url: &str, name: &str) -> Option<String> {
    url.split_once('?')?
        .1
        .split('&')
        .find_map(|p| p.strip_prefix(&format!("{name}=")))
        .map(str::to_owned)
}

fn body(response: &HttpResponse) -> Value {
    serde_json::from_slice(&response.body).unwrap()
}

fn orgs(response: &HttpResponse) -> Vec<String> {
    body(response)["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["data"]["org"].as_str().unwrap().to_owned())
        .collect()
}

/// The URL of the second page of tasks after `start` (10 a page) for `auth`'s audience, as
/// the first page, from `start` signed with `sig`, links it. Its `since` is a position inside a
/// batch of the log.
async fn second_page(gateway: &Gateway, auth: &str, start: &str, sig: &str) -> String {
    let plain = get(
        gateway,
        auth,
        &format!("/v1/changes?since={start}&limit=10&entityCode=task&sig={sig}"),
    )
    .await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("cache-control"), Some("private, no-store"));
    assert_eq!(plain.header("x-accel-expires"), None, "no aud, not shared");
    let next = next(&plain);
    assert!(query(&next, "aud").is_some(), "an audience in {next}");
    assert!(query(&next, "sig").is_some(), "a signed position in {next}");
    next
}

const IMMUTABLE: &str = "private, max-age=31536000, immutable";
const BRIEF: &str = "private, max-age=1";

/// alice and carol (acme) share a closed page: the same bytes, cacheable forever, read from
/// the log once; bob (beta) presenting its URL is sent to his own audience's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_page_is_the_same_bytes_for_its_audience_and_no_one_else() {
    let (cluster, gateway, start, start_sig) = setup().await;
    let (alice, carol, bob) = (
        bearer("alice", "acme"),
        bearer("carol", "acme"),
        bearer("bob", "beta"),
    );
    let url = second_page(&gateway, &alice, &start, &start_sig).await;

    let first = get(&gateway, &alice, &url).await;
    assert_eq!(first.status, 200);
    // private for the browser and for any cache that does not check the audience; a year
    // for one that does.
    assert_eq!(first.header("cache-control"), Some(IMMUTABLE));
    assert_eq!(first.header("x-accel-expires"), Some("31536000"));
    // Another spelling of the same page is served, but not kept by the cache in front: its
    // variants must not push everyone's pages out.
    let variant = get(&gateway, &alice, &format!("{url}&x=1")).await;
    assert_eq!(variant.body, first.body);
    assert_eq!(variant.header("x-accel-expires"), None);
    // A wait is taken as 1, 2 or 5 times a power of ten: 7 s is a variant of 5 s's URL,
    // which links on with it and is kept.
    let waiting = get(&gateway, &alice, &format!("{url}&wait=7")).await;
    assert_eq!(waiting.body, first.body);
    assert_eq!(waiting.header("x-accel-expires"), None);
    assert_eq!(query(&next(&waiting), "wait").as_deref(), Some("5"));
    let five = get(&gateway, &alice, &format!("{url}&wait=5")).await;
    assert_eq!(five.header("x-accel-expires"), Some("31536000"));
    // Only a position a gateway linked is kept in front: the same page without the link's
    // signature, or with a made-up one, is served but not kept (else any consistent cursor
    // would be a page kept a year, and a reader could push everyone's pages out).
    let sig = query(&url, "sig").expect("a signed link");
    let unsigned = url.replace(&format!("&sig={sig}"), "");
    let spellings = [
        unsigned.clone(),
        url.replace(&sig, &"0".repeat(32)),
        url.replace(&sig, &sig.to_uppercase()),
    ];
    for made_up in spellings {
        let page = get(&gateway, &alice, &made_up).await;
        assert_eq!(page.body, first.body);
        assert_eq!(page.header("x-accel-expires"), None, "{made_up}");
        // Nor does a page from a position no gateway signed link on to a signed one: else
        // each made-up cursor would mint a signed position.
        assert_eq!(query(&next(&page), "sig"), None, "{made_up}");
    }
    let etag = first.header("etag").expect("an ETag").to_owned();
    // Changes 11 to 20 of the log, of which alice sees acme's.
    assert_eq!(orgs(&first), vec!["acme"; 5]);

    let reads = gateway.metric("sync_changes_pages_read_total").await;
    let again = get(&gateway, &carol, &url).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body, "the same bytes for the same URL");
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    assert_eq!(
        gateway.metric("sync_changes_pages_read_total").await,
        reads,
        "served from the cache"
    );
    let held = get_with(&gateway, &carol, &url, &[("If-None-Match", &etag)]).await;
    assert_eq!(held.status, 304);

    // bob, of beta, with alice's URL: redirected to his audience, never given the page.
    let swapped = get(&gateway, &bob, &url).await;
    assert_eq!(
        swapped.status,
        307,
        "{}",
        String::from_utf8_lossy(&swapped.body)
    );
    assert!(swapped.body.is_empty() || !swapped.body.starts_with(b"{\"changes\""));
    let his = swapped.header("location").expect("a Location").to_owned();
    assert_ne!(query(&his, "aud"), query(&url, "aud"));
    let own = get(&gateway, &bob, &his).await;
    assert_eq!(own.status, 200);
    assert_eq!(orgs(&own), vec!["beta"; 5]);
    // The redirect keeps a valid signature and signs nothing itself.
    assert_eq!(query(&his, "sig"), Some(sig));
    let redirected = get(&gateway, &bob, &unsigned).await;
    let location = redirected.header("location").expect("a Location");
    assert_eq!(query(location, "sig"), None, "{location}");

    // The third page ends where its batch of the log ends: closed too. Then the live edge,
    // empty: not kept (its next link may be itself).
    let third = get(&gateway, &alice, &next(&first)).await;
    assert_eq!(orgs(&third), vec!["acme"; 5]);
    assert_eq!(third.header("cache-control"), Some(IMMUTABLE));
    let edge = get(&gateway, &alice, &next(&third)).await;
    assert!(orgs(&edge).is_empty());
    assert_eq!(edge.header("cache-control"), Some("private, no-store"));
    // The first page, from a snapshot's cursor, is closed too, though its batch ends where
    // its read found the log: as first read, the same bytes once the live position moved
    // (read again there, it would end elsewhere and link to another chain of URLs).
    let aud = query(&url, "aud").unwrap();
    let from_start =
        format!("/v1/changes?since={start}&limit=10&entityCode=task&aud={aud}&sig={start_sig}");
    let first_read = get(&gateway, &alice, &from_start).await;
    assert_eq!(first_read.header("cache-control"), Some(IMMUTABLE));
    assert_eq!(first_read.header("x-accel-expires"), Some("31536000"));
    let read = gateway.metric("sync_changes_read_total").await;
    cluster.execute("INSERT INTO note VALUES (1)").await;
    while gateway.metric("sync_changes_read_total").await == read {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let again = get(&gateway, &alice, &from_start).await;
    assert_eq!(again.body, first_read.body);
    // A page that reached the live edge with changes in it is kept briefly.
    let to_the_edge = format!("/v1/changes?since={start}&limit=100&entityCode=task&aud={aud}");
    let to_the_edge = get(&gateway, &alice, &to_the_edge).await;
    assert_eq!(orgs(&to_the_edge), vec!["acme"; 15]);
    assert_eq!(to_the_edge.header("cache-control"), Some(BRIEF));
    assert_eq!(to_the_edge.header("x-accel-expires"), Some("1"));

    // A gateway not told that the cache in front checks audiences tells it to keep nothing:
    // nginx would honour X-Accel-Expires without any check.
    let unchecked = Gateway::start(&cluster, &[]).await;
    let page = get(&unchecked, &alice, &url).await;
    assert_eq!(page.header("cache-control"), Some(IMMUTABLE));
    assert_eq!(page.header("x-accel-expires"), None);
}

/// A page's URL names an audience from the claims and policies of when it was made: after
/// the claim changed, after the policy changed, with an expired token, or for a policy the
/// gateway cannot compile, it does not serve the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_audience_from_before_a_claim_or_policy_change_serves_nothing() {
    let (cluster, gateway, start, start_sig) = setup().await;
    let alice = bearer("alice", "acme");
    let url = second_page(&gateway, &alice, &start, &start_sig).await;
    assert_eq!(get(&gateway, &alice, &url).await.status, 200);

    // alice moved to beta: her token's claims say so, and the old URL is not hers.
    let moved = get(&gateway, &bearer("alice", "beta"), &url).await;
    assert_eq!(moved.status, 307);
    assert_ne!(
        query(moved.header("location").unwrap(), "aud"),
        query(&url, "aud")
    );

    // An expired token gets nothing.
    let expired = json!({"sub": "alice", "role": "app_user", "org": "acme",
                         "exp": pg_sync_tests::gateway::now() - 10});
    let expired = format!("Bearer {}", pg_sync_tests::gateway::sign(&expired, SECRET));
    assert_eq!(get(&gateway, &expired, &url).await.status, 401);

    // Another table's access changes: a new catalog epoch, but the task pages' audience is
    // what it was (every audience of the database went with any such change before).
    let epoch = gateway.metric("sync_access_epoch").await;
    cluster
        .execute("CREATE ROLE note_reader; GRANT SELECT ON note TO note_reader")
        .await;
    gateway.access_epoch_after(epoch).await;
    let unchanged = get(&gateway, &alice, &url).await;
    assert_eq!(unchanged.status, 200, "still alice's audience");
    assert_eq!(query(&next(&unchanged), "aud"), query(&url, "aud"));

    // The policy changes: every audience of the old policy is gone.
    let epoch = gateway.metric("sync_access_epoch").await;
    cluster
        .execute(
            "ALTER POLICY by_org ON task USING (org = current_setting('request.jwt.claims', \
             true)::jsonb ->> 'org' AND title IS NOT NULL)",
        )
        .await;
    gateway.access_epoch_after(epoch).await;
    let after = get(&gateway, &alice, &url).await;
    assert_eq!(after.status, 307);
    assert_ne!(
        query(after.header("location").unwrap(), "aud"),
        query(&url, "aud")
    );

    // A policy only the database can judge: no audience, and a URL naming one is redirected
    // to the reader's own, private, answer.
    let notes = get(
        &gateway,
        &alice,
        &format!("/v1/changes?since={start}&entityCode=note"),
    )
    .await;
    assert_eq!(notes.status, 200);
    assert_eq!(notes.header("cache-control"), Some("private, no-store"));
    assert_eq!(query(&next(&notes), "aud"), None);
    let aud = query(&url, "aud").unwrap();
    let forged = get(
        &gateway,
        &alice,
        &format!("/v1/changes?since={start}&entityCode=note&aud={aud}"),
    )
    .await;
    assert_eq!(forged.status, 307);
    assert_eq!(query(forged.header("location").unwrap(), "aud"), None);
}

/// With `--snapshot-share-for`, a whole entity's snapshot read for one user is served to
/// the others of their audience for that long, the same bytes, and its cursor leads each to
/// what was written since. Never to another audience, nor a snapshot of a few ids, nor one
/// of an entity only the database can judge, nor after a policy change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_is_shared_within_its_audience_and_no_further() {
    let cluster = Cluster::start().await;
    cluster.execute(SCHEMA).await;
    cluster
        .execute("INSERT INTO task SELECT g, CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'beta' END, 't' || g FROM generate_series(1, 30) g")
        .await;
    let gateway = Gateway::start(&cluster, &["--snapshot-share-for", "10min"]).await;
    let reads = || gateway.metric("sync_snapshots_read_total");
    // Kept once its reader's answer has ended: wait for the `n`th.
    let kept = |n: i64| {
        let gateway = &gateway;
        async move {
            tokio::time::timeout(PATIENCE, async {
                while gateway.metric("sync_snapshots_kept_total").await < n {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the snapshot kept in time")
        }
    };
    let snapshot = |sub: &'static str, org: &'static str, path: &'static str| {
        let gateway = &gateway;
        async move {
            let answer = get(gateway, &bearer(sub, org), &format!("/v1/snapshot/{path}")).await;
            assert_eq!(answer.status, 200, "{path} for {sub}");
            answer.body
        }
    };
    let orgs_of = |body: &[u8]| -> Vec<String> {
        let mut orgs: Vec<String> = body
            .split(|b| *b == b'\n')
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice::<Value>(l).unwrap()["org"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        orgs.dedup();
        orgs
    };

    let first = snapshot("alice", "acme", "task").await;
    assert_eq!(orgs_of(&first), ["acme"]);
    assert_eq!(
        first
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        16
    );
    kept(1).await;
    let read = reads().await;
    assert_eq!(
        snapshot("anna", "acme", "task").await,
        first,
        "shared by her audience"
    );
    assert_eq!(reads().await, read, "served without a read");

    // Another audience: its own read, its own rows.
    let beta = snapshot("bob", "beta", "task").await;
    assert_eq!(orgs_of(&beta), ["beta"]);
    assert_eq!(reads().await, read + 1);

    // A write after it: the shared snapshot does not show it, its cursor leads to it.
    cluster
        .execute("INSERT INTO task VALUES (32, 'acme', 'new')")
        .await;
    let again = snapshot("anna", "acme", "task").await;
    assert_eq!(again, first);
    let head: Value = serde_json::from_slice(again.split(|b| *b == b'\n').next().unwrap()).unwrap();
    let cursor = head["cursor"].as_str().unwrap();
    let anna = bearer("anna", "acme");
    let since = get(
        &gateway,
        &anna,
        &format!("/v1/changes?since={cursor}&entityCode=task&wait=5"),
    )
    .await;
    assert_eq!(since.status, 200);
    let ids: Vec<Value> = body(&since)["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["entityId"].clone())
        .collect();
    assert_eq!(ids, [json!("32")]);

    // Compressed once: a reader taking gzip gets it as kept, without a read.
    let read = reads().await;
    let gzip = get_with(
        &gateway,
        &anna,
        "/v1/snapshot/task",
        &[("Accept-Encoding", "gzip")],
    )
    .await;
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));
    assert_eq!(gzip.header("vary"), Some("accept-encoding"));
    let mut unzipped = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&gzip.body[..]),
        &mut unzipped,
    )
    .expect("a gzip stream");
    assert_eq!(unzipped, first);
    assert_eq!(reads().await, read);

    // A snapshot of a few ids, one of an entity the database judges, and one with a column
    // whose JSON a user's cast writes (as the reader: it may write what differs by reader):
    // read each time. Its twin with a text column is shared.
    cluster
        .execute(
            "CREATE TYPE mood AS ENUM ('calm');
             CREATE TABLE diary (id int PRIMARY KEY, mood mood);
             CREATE TABLE journal (id int PRIMARY KEY, mood text);
             INSERT INTO diary VALUES (1, 'calm');
             INSERT INTO journal VALUES (1, 'calm');
             SELECT sync.track('diary');
             SELECT sync.track('journal');",
        )
        .await;
    snapshot("anna", "acme", "diary").await;
    snapshot("anna", "acme", "journal").await;
    kept(3).await;
    let read = reads().await;
    for _ in 0..2 {
        snapshot("anna", "acme", "task?ids=2,4").await;
        snapshot("anna", "acme", "note").await;
        snapshot("anna", "acme", "diary").await;
        snapshot("anna", "acme", "journal").await;
    }
    assert_eq!(reads().await, read + 6);

    // A policy change: the snapshot of the old policy is nobody's.
    let epoch = gateway.metric("sync_access_epoch").await;
    cluster
        .execute(
            "ALTER POLICY by_org ON task USING (org = current_setting('request.jwt.claims', \
             true)::jsonb ->> 'org' AND id < 10)",
        )
        .await;
    gateway.access_epoch_after(epoch).await;
    let after = snapshot("anna", "acme", "task").await;
    assert_eq!(
        after
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        5,
        "ids 2, 4, 6, 8"
    );
    assert_eq!(reads().await, read + 7);
}

/// 100 readers of one audience asking for the same page at once cause one read of the log,
/// at a closed page and at the live edge alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_asking_for_one_page_at_once_read_the_log_once() {
    let (cluster, gateway, start, start_sig) = setup().await;
    let alice = bearer("alice", "acme");
    let url = second_page(&gateway, &alice, &start, &start_sig).await;
    let live = cluster.current_cursor().await;
    let aud = query(&url, "aud").unwrap();
    let edge = format!("/v1/changes?since={live}&limit=10&entityCode=task&aud={aud}");
    for url in [url, edge] {
        let before = gateway.metric("sync_changes_pages_read_total").await;
        let answers = futures_util::future::join_all((0..100).map(|i| {
            let (gateway, url) = (&gateway, &url);
            async move {
                let auth = bearer(&format!("reader{i}"), "acme");
                get(gateway, &auth, url).await
            }
        }))
        .await;
        assert!(answers
            .iter()
            .all(|a| a.status == 200 && a.body == answers[0].body));
        let reads = gateway.metric("sync_changes_pages_read_total").await - before;
        // One read; a second if the live position moved while they asked.
        assert!(reads <= 2, "{reads} reads of the log for {url}");
    }
}

/// A reader who starts shared reads, one for each entity's audience, and goes away at once
/// keeps no more of them going than their own cap allows: the rest are refused (503), and do
/// not hold the gateway's connections for those audiences. The log is locked meanwhile, so
/// that every read started waits and stays counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_reads_a_reader_starts_count_under_their_own_cap() {
    const ENTITIES: [&str; 4] = ["e1", "e2", "e3", "e4"];
    let cluster = Cluster::start().await;
    for entity in ENTITIES {
        cluster
            .execute(&format!(
                "CREATE TABLE {entity} (id int PRIMARY KEY); SELECT sync.track('{entity}');"
            ))
            .await;
    }
    let gateway = Gateway::start(&cluster, &["--max-queries-per-user", "1"]).await;
    let start = cluster.current_cursor().await;
    let mallory = bearer("mallory", "acme");
    let url = |entity: &str, limit: u32| {
        format!("/v1/changes?since={start}&limit={limit}&entityCode={entity}")
    };
    // Each entity's plan is read, and the gateway has reached `start`. (The reads below ask
    // for another limit, so that they are not these pages, kept.)
    for entity in ENTITIES {
        assert_eq!(get(&gateway, &mallory, &url(entity, 5)).await.status, 200);
    }
    let lock = cluster.connect().await;
    lock.batch_execute("BEGIN; LOCK TABLE sync.change_history IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut asks: futures_util::stream::FuturesUnordered<_> = ENTITIES
        .iter()
        .map(|entity| {
            let (gateway, auth, url) = (&gateway, &mallory, url(entity, 10));
            async move {
                let answer = get(gateway, auth, &url).await;
                (
                    answer.status,
                    String::from_utf8_lossy(&answer.body).into_owned(),
                )
            }
        })
        .collect();
    // While the log is locked, one read runs under mallory's one place; the others are
    // refused at once for that cap (not after a read of theirs gave up on the lock).
    let refused = tokio::time::timeout(pg_sync_tests::gateway::PATIENCE, async {
        let mut refused = Vec::new();
        while refused.len() < ENTITIES.len() - 1 {
            refused.push(asks.next().await.expect("an answer"));
        }
        refused
    })
    .await
    .expect("all but one answered while the log was locked");
    for (status, body) in &refused {
        assert_eq!(*status, 503, "{body}");
        assert!(
            body.contains("too many queries in progress for this user"),
            "{body}"
        );
    }
    lock.batch_execute("COMMIT").await.unwrap();
    let (status, body) = asks.next().await.expect("the last answer");
    assert_eq!(
        status, 200,
        "the one read ends once the log is free: {body}"
    );
}

/// `readers` users of acme, 50 at a time, each reading from `first(i)` at `port` and on
/// through `Link` until a page holds no change: per reader, the acme changes seen and each
/// page's `X-Cache-Status`.
async fn catch_up(
    port: u16,
    readers: usize,
    first: impl Fn(usize) -> String,
) -> Vec<(usize, Vec<String>)> {
    futures_util::stream::iter(0..readers)
        .map(|i| {
            let mut url = first(i);
            async move {
                let auth = bearer(&format!("reader{i}"), "acme");
                let (mut seen, mut statuses) = (0, Vec::new());
                loop {
                    let page = http_request(port, "GET", &url, &[("Authorization", &auth)], None)
                        .await
                        .unwrap();
                    assert_eq!(page.status, 200, "{}", String::from_utf8_lossy(&page.body));
                    statuses.push(page.header("x-cache-status").unwrap_or("-").to_owned());
                    let orgs = orgs(&page);
                    if orgs.is_empty() {
                        return (seen, statuses);
                    }
                    seen += orgs.iter().filter(|o| *o == "acme").count();
                    url = next(&page);
                }
            }
        })
        .buffer_unordered(50)
        .collect()
        .await
}

/// Through nginx, configured by docs/nginx.conf, before two gateways: 1,000 readers of one
/// audience catching up from one cursor, 50 at a time, cost the log a few reads, not one per
/// page; a reader of another audience presenting a cached page's URL is sent to their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_an_http_cache_a_thousand_readers_cost_the_log_a_few_reads() {
    let (cluster, a, start, start_sig) = setup().await;
    let b = Gateway::start(&cluster, &["--shared-cache"]).await;
    let nginx = Nginx::start(&[a.port, b.port]).await;
    let front = |auth: String, path: String| async move {
        http_request(nginx.port, "GET", &path, &[("Authorization", &auth)], None)
            .await
            .unwrap()
    };
    let reads = || async {
        a.metric("sync_changes_pages_read_total").await
            + b.metric("sync_changes_pages_read_total").await
    };
    // The first page's URL with the readers' audience, as a client has it from an answer.
    let first = format!("/v1/changes?since={start}&limit=10&entityCode=task");
    let aud = query(
        &next(&front(bearer("reader", "acme"), first.clone()).await),
        "aud",
    )
    .unwrap();
    let first = format!("{first}&aud={aud}&sig={start_sig}");
    let before = reads().await;
    let started = std::time::Instant::now();
    let readers = catch_up(nginx.port, 1000, |_| first.clone()).await;
    let elapsed = started.elapsed();
    let reads = reads().await - before;
    assert!(
        readers.iter().all(|(seen, _)| *seen == 15),
        "every reader has acme's 15 tasks"
    );
    let hits = readers
        .iter()
        .flat_map(|(_, s)| s)
        .filter(|s| *s == "HIT")
        .count();
    println!("1,000 readers through nginx: {reads} reads of the log, {hits} cache hits");
    // One chain of URLs: each page but the empty live edge is fetched from a gateway once.
    // The first page, from a cursor between batches, ends its batch where its read found
    // the log; read again at another live position it would link to a second chain (it
    // did: 2 misses a page, 22 reads), so it is closed, and kept, as first read. (Kept
    // briefly instead, as before, nginx fetched it again each second: 3 times here.)
    let depth = readers[0].1.len();
    for page in 0..depth - 1 {
        // Fetched: MISS, or EXPIRED when a kept copy's time ran out.
        let fetched = readers
            .iter()
            .filter(|(_, s)| s.get(page).is_some_and(|s| s != "HIT"))
            .count();
        assert_eq!(fetched, 1, "page {page} fetched {fetched} times");
    }
    // Reads grow with time, not readers: the rest are the empty live edge, which each
    // gateway shares for at most 2 s (`OPEN_LIFETIME`), so read again about every 2 s as
    // the live position moves (11-16 reads in all here, in 9 s; a slower machine takes
    // longer, hence the bound by the time taken); 1,000 readers reading alone read 4,000
    // pages.
    let live_edge = 2 * (elapsed.as_secs() as i64 / 2 + 3);
    assert!(
        reads <= depth as i64 + live_edge,
        "{reads} reads of the log in {elapsed:?}"
    );

    // bob (beta) with the URL of acme's second page: sent to his own, never served acme's.
    let acme = second_page(&a, &bearer("alice", "acme"), &start, &start_sig).await;
    assert_eq!(
        front(bearer("alice", "acme"), acme.clone()).await.status,
        200
    );
    let swapped = front(bearer("bob", "beta"), acme.clone()).await;
    assert_eq!(swapped.status, 307);
    let own = front(
        bearer("bob", "beta"),
        swapped.header("location").unwrap().to_owned(),
    )
    .await;
    assert_eq!(orgs(&own), vec!["beta"; 5]);
    let unsigned = http_request(nginx.port, "GET", &acme, &[], None)
        .await
        .unwrap();
    assert_eq!(unsigned.status, 401, "no token, no page");
    // A client that can only put its token in the URL: checked by it, and linked on with it.
    let tom = token(
        "tom",
        &[("role", json!("app_user")), ("org", json!("acme"))],
    );
    let in_url = format!("{acme}&token={tom}");
    let page = http_request(nginx.port, "GET", &in_url, &[], None)
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(query(&next(&page), "token"), Some(tom));
    // Not kept in front: each token would be another copy of the page (and nginx would keep
    // the token).
    let again = http_request(nginx.port, "GET", &in_url, &[], None)
        .await
        .unwrap();
    assert_eq!(again.body, page.body);
    assert_eq!(again.header("x-cache-status"), Some("MISS"));
}

/// The page benchmark (`make bench`, bench/page_bench.sh): readers of one audience (1,000)
/// catching up a log of 10,000 changes in pages of 1,000 from one cursor through nginx, beside
/// the same readers reading the same pages privately (a `clientId` makes every page one
/// reader's, read from the log) from the gateway, in the same run: seconds, and pages read
/// from the log. Appends a line to `$BENCH_OUT/results.jsonl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: make bench"]
async fn page_benchmark() {
    let number = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (changes, readers) = (number("PAGE_CHANGES", 10_000), number("PAGE_READERS", 1000));
    let cluster = Cluster::start().await;
    cluster.execute(SCHEMA).await;
    let gateway = Gateway::start(&cluster, &["--shared-cache"]).await;
    let (start, sig) = snapshot_start(&gateway).await;
    cluster
        .execute(&format!(
            "INSERT INTO task SELECT g, CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'beta' END, 't' || g
               FROM generate_series(1, {changes}) g"
        ))
        .await;
    let nginx = Nginx::start(&[gateway.port]).await;
    let first = format!("/v1/changes?since={start}&limit=1000&entityCode=task&sig={sig}");
    let mut figures = Vec::new();
    for (port, private) in [(nginx.port, false), (gateway.port, true)] {
        let before = gateway.metric("sync_changes_pages_read_total").await;
        let began = std::time::Instant::now();
        let seen = catch_up(port, readers, |i| match private {
            true => format!("{first}&clientId=r{i}"),
            false => first.clone(),
        })
        .await;
        let seconds = began.elapsed().as_secs_f64();
        assert!(seen.iter().all(|(n, _)| *n == changes / 2));
        let reads = gateway.metric("sync_changes_pages_read_total").await - before;
        let pages: usize = seen.iter().map(|(_, s)| s.len()).sum();
        figures.push(json!({"seconds": seconds, "reads": reads, "pages": pages}));
    }
    let line = json!({"mode": "pages", "via": null, "readers": readers, "changes": changes,
                      "cached": figures[0], "private": figures[1]});
    println!("[pages] {line}");
    if let Ok(out) = std::env::var("BENCH_OUT") {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{out}/results.jsonl"))
            .unwrap();
        writeln!(file, "{line}").unwrap();
    }
}
