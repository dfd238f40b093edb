//! The router's behaviour, without a database or sockets.

use super::*;
use crate::access::judge::{ChangeSight, JudgedPage};
use crate::access::limits::Cap;
use crate::deliver::command::{Connection, ReplayEvent, ReplayItem};
use crate::deliver::mirror::MirrorOp;
use crate::deliver::queue::{self, Queue};
use crate::model::change::{sample, Change};
use crate::model::filter::Op as FilterOp;
use crate::model::protocol::Mode;
use crate::model::subscription::{Shape, Target};
use serde_json::{json, Value};

struct Harness {
    router: Router,
    replays: mpsc::UnboundedReceiver<ReplayStart>,
    mirror: mpsc::UnboundedReceiver<MirrorOp>,
    metrics: Arc<Metrics>,
}

fn cursor(n: u64) -> Cursor {
    Cursor::from_db(format!("1.ab.{n}_{n}__{n}_{n}"))
}

fn harness() -> Harness {
    let (mirror, mirror_rx) = mpsc::unbounded_channel();
    let (replays_tx, replays) = mpsc::unbounded_channel();
    let metrics = Arc::new(Metrics::default());
    let outlets = Outlets {
        mirror,
        replays: replays_tx,
        position: watch::channel(None).0,
        metrics: metrics.clone(),
    };
    let limits = Limits {
        subscriptions: 100,
        subscriptions_per_user: 150,
        conditions: 4,
        in_values: 10,
        replays: 2,
        replay_buffer: 1000,
        mirror_backlog: Cap::new("subscription changes", 100, 10),
        awaits: 4,
    };
    let mut router = Router::new("g".into(), limits, outlets);
    router.handle(Command::Batch(Arc::new(batch(vec![], vec![], 10, true))));
    Harness {
        router,
        replays,
        mirror: mirror_rx,
        metrics,
    }
}

fn batch(
    changes: Vec<Change>,
    sights: Vec<Option<ChangeSight>>,
    end: u64,
    complete: bool,
) -> JudgedBatch {
    let verdicts = if sights.is_empty() {
        vec![Verdict::Seen(None); changes.len()]
    } else {
        sights
            .into_iter()
            .map(|s| Verdict::Seen(s.map(Arc::new)))
            .collect()
    };
    JudgedBatch {
        page: JudgedPage {
            changes: changes.into_iter().map(Arc::new).collect(),
            verdicts,
            refused: vec![],
            judged_rls: false,
        },
        end: cursor(end),
        complete,
        read_at: tokio::time::Instant::now(),
    }
}

fn connect(
    h: &mut Harness,
    id: ConnId,
    group: GroupId,
    queue_bytes: usize,
) -> (Queue, CancellationToken) {
    connect_as(h, id, group, queue_bytes, &format!("user{id}"))
}

fn connect_as(
    h: &mut Harness,
    id: ConnId,
    group: GroupId,
    queue_bytes: usize,
    sub: &str,
) -> (Queue, CancellationToken) {
    let (outbound, queue) = queue::channel(queue_bytes);
    let kick = CancellationToken::new();
    let user = Arc::new(UserContext {
        sub: sub.to_owned(),
        role: Some("app_user".into()),
        claims: "{}".into(),
        claims_json: json!({}),
    });
    h.router.handle(Command::Connect(Connection {
        id,
        user,
        group,
        client_id: None,
        queue: outbound,
        kick: kick.clone(),
    }));
    (queue, kick)
}

fn subscribe(h: &mut Harness, conn: ConnId, target: Target, since: Option<Cursor>) {
    h.router.handle(Command::Subscribe(SubscribeRequest {
        conn,
        subscription: Subscription {
            entity_code: "doc".into(),
            target,
            shape: Shape {
                mode: Mode::Delta,
                columns: None,
            },
        },
        since,
        reference: None,
        tracking: 1,
    }));
}

/// Everything queued for a connection so far.
async fn drain(queue: &mut Queue) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(Some((text, _))) =
        tokio::time::timeout(std::time::Duration::ZERO, queue.next()).await
    {
        out.push(serde_json::from_str(&text).unwrap());
    }
    out
}

/// (type, entity id, action) of each message, changes flattened.
fn shape(messages: &[Value]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for m in messages {
        let kind = m["type"].as_str().unwrap().to_owned();
        match m["payload"]["changes"].as_array() {
            Some(changes) => out.extend(changes.iter().map(|c| {
                let id = c["entityId"].as_str().unwrap().to_owned();
                (kind.clone(), id, c["action"].as_str().unwrap().to_owned())
            })),
            None => out.push((kind, String::new(), String::new())),
        }
    }
    out
}

fn insert(id: &str) -> Change {
    Change {
        id: id.parse().unwrap(),
        ..sample(Op::Insert, id, Some(json!({"id": id, "n": 1})), None)
    }
}

/// Routes a complete batch of `changes`, everyone seeing all, ending at `end`.
fn route(h: &mut Harness, changes: Vec<Change>, end: u64) {
    h.router
        .handle(Command::Batch(Arc::new(batch(changes, vec![], end, true))));
}

/// The replay task of connection 1's subscription `sub`: `changes` as the gap's one page,
/// then its end.
fn replay(h: &mut Harness, sub: SubId, changes: Vec<Change>) {
    let items = changes
        .into_iter()
        .map(|c| ReplayItem::Change(Arc::new(c), Verdict::Seen(None)))
        .collect();
    replay_parts(h, sub, vec![items]);
}

/// The replay task of connection 1's subscription `sub`: `parts` handed on one by one, then
/// its end.
fn replay_parts(h: &mut Harness, sub: SubId, parts: Vec<Vec<ReplayItem>>) {
    for items in parts {
        h.router.handle(Command::Replay(ReplayEvent::Page {
            conn: 1,
            sub,
            items,
            queued: tokio::sync::oneshot::channel().0,
        }));
    }
    h.router
        .handle(Command::Replay(ReplayEvent::Done { conn: 1, sub }));
}

/// Routes a full page of `changes` that ends inside a transaction, at `end`.
fn route_cut(h: &mut Harness, changes: Vec<Change>, end: u64) {
    h.router
        .handle(Command::Batch(Arc::new(batch(changes, vec![], end, false))));
}

/// A filter of one condition on the column `team`.
fn team_filter(op: FilterOp, value: Value) -> Target {
    let condition = crate::model::filter::Condition {
        column: "team".into(),
        op,
        value: Some(value),
    };
    Target::Rows(Some(vec![condition]))
}

fn triple(kind: &str, id: &str, action: &str) -> (String, String, String) {
    (kind.into(), id.into(), action.into())
}

#[tokio::test]
async fn a_live_subscription_gets_what_follows_and_nothing_after_unsubscribing() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), None);
    let subscribed = drain(&mut q).await;
    assert_eq!(subscribed[0]["payload"]["cursor"], cursor(10).as_str());
    route(&mut h, vec![insert("1")], 11);
    assert_eq!(
        shape(&drain(&mut q).await),
        [triple("DELTA", "1", "CREATE")]
    );
    assert_eq!(h.metrics.subscriptions.get(), 1);
    h.router.handle(Command::Unsubscribe {
        conn: 1,
        entity_code: "doc".into(),
        entity_ids: None,
    });
    route(&mut h, vec![insert("2")], 12);
    assert!(drain(&mut q).await.is_empty());
    assert_eq!(h.metrics.subscriptions.get(), 0);
}

#[tokio::test]
async fn a_replay_comes_first_then_synced_then_what_was_held_back() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), Some(cursor(5)));
    let start = h.replays.try_recv().expect("a replay to run");
    assert_eq!(
        (start.since.clone(), start.until.clone()),
        (cursor(5), cursor(10))
    );
    // A live change while the replay runs waits.
    route(&mut h, vec![insert("9")], 11);
    assert_eq!(shape(&drain(&mut q).await), [triple("SUBSCRIBED", "", "")]);
    replay(&mut h, start.sub, vec![insert("6"), insert("7")]);
    assert_eq!(
        shape(&drain(&mut q).await),
        [
            triple("DELTA", "6", "CREATE"),
            triple("DELTA", "7", "CREATE"),
            triple("SYNCED", "", ""),
            triple("DELTA", "9", "CREATE"),
        ]
    );
    // Live from here on.
    route(&mut h, vec![insert("10")], 12);
    assert_eq!(
        shape(&drain(&mut q).await),
        [triple("DELTA", "10", "CREATE")]
    );
}

#[tokio::test]
async fn a_replay_waits_for_the_end_of_a_drain_to_know_where_it_ends() {
    let mut h = harness();
    let (_q, _) = connect(&mut h, 1, 1, 1 << 20);
    h.router.handle(Command::Batch(Arc::new(batch(
        vec![insert("1")],
        vec![],
        11,
        false,
    ))));
    subscribe(&mut h, 1, Target::Rows(None), Some(cursor(5)));
    assert!(
        h.replays.try_recv().is_err(),
        "not in the middle of a drain"
    );
    route(&mut h, vec![insert("2")], 12);
    assert_eq!(h.replays.try_recv().expect("after it").until, cursor(12));
}

#[tokio::test]
async fn a_connection_over_its_queue_is_closed_and_freed_at_once() {
    let mut h = harness();
    let (_slow, kick) = connect(&mut h, 1, 1, 300);
    let (mut fast, _) = connect(&mut h, 2, 1, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), None);
    subscribe(&mut h, 2, Target::Rows(None), None);
    drain(&mut fast).await;
    for n in 0..5 {
        let changes = (0..5).map(|i| insert(&(n * 10 + i).to_string())).collect();
        h.router.handle(Command::Batch(Arc::new(batch(
            changes,
            vec![],
            20 + n,
            true,
        ))));
    }
    assert!(kick.is_cancelled());
    assert_eq!(
        h.metrics.subscriptions.get(),
        1,
        "the slow one's subscription went"
    );
    assert_eq!(
        shape(&drain(&mut fast).await).len(),
        25,
        "the other got everything"
    );
}

#[tokio::test]
async fn each_group_sees_a_change_as_row_level_security_judged_it() {
    let mut h = harness();
    let (mut leaving, _) = connect(&mut h, 1, 1, 1 << 20);
    let (mut entering, _) = connect(&mut h, 2, 2, 1 << 20);
    let (mut outside, _) = connect(&mut h, 3, 3, 1 << 20);
    let (mut by_id, _) = connect(&mut h, 4, 3, 1 << 20);
    for conn in 1..=3 {
        subscribe(&mut h, conn, Target::Rows(None), None);
    }
    subscribe(&mut h, 4, Target::Ids(["5".to_owned()].into()), None);
    for q in [&mut leaving, &mut entering, &mut outside, &mut by_id] {
        drain(q).await;
    }
    let moved = Change {
        id: 5,
        ..sample(
            Op::Update,
            "5",
            Some(json!({"id": 5, "owner": "two"})),
            Some(json!({"id": 5, "owner": "one"})),
        )
    };
    let sight = ChangeSight {
        before: vec![1],
        after: vec![2],
    };
    h.router.handle(Command::Batch(Arc::new(batch(
        vec![moved],
        vec![Some(sight)],
        11,
        true,
    ))));
    assert_eq!(
        shape(&drain(&mut leaving).await),
        [triple("DELTA", "5", "DELETE")]
    );
    let entered = drain(&mut entering).await;
    assert_eq!(shape(&entered), [triple("DELTA", "5", "CREATE")]);
    assert_eq!(entered[0]["payload"]["changes"][0]["data"]["owner"], "two");
    assert!(drain(&mut outside).await.is_empty());
    assert!(
        drain(&mut by_id).await.is_empty(),
        "naming an id shows nothing of it"
    );
}

/// An empty batch ending at `end` that refuses `group` the entity `doc`.
fn refusal(group: GroupId, end: u64, complete: bool) -> Command {
    let mut refused = batch(vec![], vec![], end, complete);
    let why = "no read access to doc".to_owned();
    refused.page.refused.push(("doc".into(), group, why));
    Command::Batch(Arc::new(refused))
}

#[tokio::test]
async fn a_group_refused_loses_its_subscriptions_with_forbidden() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 7, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), None);
    drain(&mut q).await;
    h.router.handle(refusal(7, 11, true));
    let messages = drain(&mut q).await;
    assert_eq!(messages[0]["payload"]["code"], "forbidden");
    route(&mut h, vec![insert("1")], 12);
    assert!(drain(&mut q).await.is_empty());
    assert_eq!(h.metrics.subscriptions.get(), 0);
}

/// A group refused while its SUBSCRIBE waits for the drain's end: the request goes with
/// ERROR forbidden. Fails when `refuse` passes over the deferred requests: made at the
/// drain's end, the subscription got changes the stage judged for nobody.
#[tokio::test]
async fn a_group_refused_while_its_subscription_is_deferred_never_gets_it() {
    let mut h = harness();
    let mut q = deferred_subscriber(&mut h, 7).await;
    h.router.handle(refusal(7, 11, false));
    let messages = drain(&mut q).await;
    assert_eq!(shape(&messages), [triple("ERROR", "", "")]);
    assert_eq!(messages[0]["payload"]["code"], "forbidden");
    never_subscribed(&mut h, &mut q, 12).await;
}

/// Filters with an `eq` or `in` condition are filed by its values (`index::EntityIndex`):
/// each still gets the rows that enter, stay in and leave it, found by the row before and
/// after, whatever type the client wrote the value as; one filed by nothing (`gt`) is
/// visited for every change; an unsubscribed one, for none.
#[tokio::test]
async fn filters_filed_by_value_get_the_rows_entering_staying_in_and_leaving_them() {
    let mut h = harness();
    let targets = [
        team_filter(FilterOp::Eq, json!("7")),
        team_filter(FilterOp::In, json!([7, 8])),
        team_filter(FilterOp::Gt, json!(6)),
        team_filter(FilterOp::Eq, json!(9)),
        team_filter(FilterOp::Eq, json!(7)),
    ];
    let mut queues = Vec::new();
    for (conn, target) in (1..).zip(targets) {
        let (mut q, _) = connect(&mut h, conn, 1, 1 << 20);
        subscribe(&mut h, conn, target, None);
        drain(&mut q).await;
        queues.push(q);
    }
    h.router.handle(Command::Unsubscribe {
        conn: 5,
        entity_code: "doc".into(),
        entity_ids: None,
    });
    let row = |team: Option<i64>| team.map(|t| json!({"id": "1", "team": t}));
    let change = |id, op, before, after| Change {
        id,
        ..sample(op, "1", row(after), row(before))
    };
    route(&mut h, vec![change(1, Op::Insert, None, Some(7))], 11);
    route(&mut h, vec![change(2, Op::Update, Some(7), Some(7))], 12);
    route(&mut h, vec![change(3, Op::Update, Some(7), Some(9))], 13);
    route(&mut h, vec![change(4, Op::Delete, Some(9), None)], 14);
    let mut got = Vec::new();
    for q in &mut queues {
        let actions = shape(&drain(q).await).into_iter().map(|(_, _, a)| a);
        got.push(actions.collect::<Vec<_>>());
    }
    let [created, updated, deleted] = ["CREATE", "UPDATE", "DELETE"].map(String::from);
    assert_eq!(
        got,
        [
            vec![created.clone(), updated.clone(), deleted.clone()],
            vec![created.clone(), updated.clone(), deleted.clone()],
            vec![
                created.clone(),
                updated.clone(),
                updated.clone(),
                deleted.clone()
            ],
            vec![created, deleted],
            vec![],
        ]
    );
}

/// A filed filter is found by each key of each image of a change (here the row before and
/// after, and the value's text and number): a subscription replaying its gap still holds the
/// change once, and gets it once after SYNCED.
#[tokio::test]
async fn a_replaying_filed_filter_holds_a_live_change_once() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(
        &mut h,
        1,
        team_filter(FilterOp::Eq, json!("7")),
        Some(cursor(5)),
    );
    let start = h.replays.try_recv().expect("a replay to run");
    drain(&mut q).await;
    let row = json!({"id": "1", "team": "7"});
    let update = Change {
        id: 11,
        ..sample(Op::Update, "1", Some(row.clone()), Some(row))
    };
    route(&mut h, vec![update], 11);
    replay(&mut h, start.sub, vec![]);
    assert_eq!(
        shape(&drain(&mut q).await),
        [triple("SYNCED", "", ""), triple("DELTA", "1", "UPDATE")]
    );
}

/// A refreshed token that puts the connection in another group moves its filed filters with
/// it: a change only the new group may see reaches it (left filed under the old group, the
/// filter would never be visited for it), and one only the old group may see does not.
#[tokio::test]
async fn a_filed_filter_follows_its_connection_into_another_group() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, team_filter(FilterOp::Eq, json!(7)), None);
    drain(&mut q).await;
    h.router.handle(Command::Reauth {
        conn: 1,
        user: Arc::new(UserContext {
            sub: "user1".into(),
            role: Some("app_user".into()),
            claims: r#"{"team":"b"}"#.into(),
            claims_json: json!({"team": "b"}),
        }),
        group: 2,
    });
    let seen_by = |id: i64, group: GroupId| {
        let row = json!({"id": id.to_string(), "team": 7});
        let change = Change {
            id,
            ..sample(Op::Insert, &id.to_string(), Some(row), None)
        };
        let sight = ChangeSight {
            before: vec![],
            after: vec![group],
        };
        batch(vec![change], vec![Some(sight)], 10 + id as u64, true)
    };
    h.router.handle(Command::Batch(Arc::new(seen_by(1, 2))));
    h.router.handle(Command::Batch(Arc::new(seen_by(2, 1))));
    assert_eq!(
        shape(&drain(&mut q).await),
        [triple("DELTA", "1", "CREATE")]
    );
}

#[tokio::test]
async fn filters_are_bounded_per_user_and_replays_per_connection() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    let condition = |n: i64| crate::model::filter::Condition {
        column: "n".into(),
        op: FilterOp::In,
        value: Some(json!((0..n).collect::<Vec<_>>())),
    };
    let (mut other, _) = connect_as(&mut h, 2, 1, 1 << 20, "user1");
    subscribe(&mut h, 1, Target::Rows(Some(vec![condition(6)])), None);
    // The same user's other connection shares the budget.
    subscribe(&mut h, 2, Target::Rows(Some(vec![condition(6)])), None);
    assert_eq!(
        drain(&mut other).await[0]["payload"]["code"],
        "too_many_subscriptions"
    );
    subscribe(&mut h, 1, Target::Rows(None), Some(cursor(1)));
    subscribe(&mut h, 1, ids(&["a"]), Some(cursor(2)));
    subscribe(&mut h, 1, ids(&["b"]), Some(cursor(3)));
    let answers: Vec<String> = drain(&mut q)
        .await
        .iter()
        .map(|m| {
            m["payload"]["code"]
                .as_str()
                .unwrap_or(m["type"].as_str().unwrap())
                .to_owned()
        })
        .collect();
    assert_eq!(
        answers,
        [
            "SUBSCRIBED",
            "SUBSCRIBED",
            "SUBSCRIBED",
            "too_many_subscriptions"
        ]
    );
}

/// The mirror's operations so far, as (kind, rows or ids) pairs; added rows' backlog
/// places are given back, as the mirror does once it wrote them.
fn mirrored(h: &mut Harness) -> Vec<(&'static str, usize)> {
    let mut out = Vec::new();
    while let Ok(op) = h.mirror.try_recv() {
        out.push(match op {
            MirrorOp::Add(rows, _) => ("add", rows.len()),
            MirrorOp::RemoveIds { entity_ids, .. } => ("remove ids", entity_ids.len()),
            MirrorOp::RemoveEntity { .. } => ("remove entity", 0),
            MirrorOp::RemoveRows { .. } => ("remove rows", 0),
            MirrorOp::RemoveConnection(_) => ("remove connection", 0),
        });
    }
    out
}

fn ids(ids: &[&str]) -> Target {
    Target::Ids(ids.iter().map(|i| i.to_string()).collect())
}

#[tokio::test]
async fn the_same_subscription_again_replaces_the_one_held() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    for _ in 0..3 {
        subscribe(&mut h, 1, Target::Rows(None), None);
    }
    assert_eq!(h.metrics.subscriptions.get(), 1);
    route(&mut h, vec![insert("1")], 11);
    let messages = drain(&mut q).await;
    assert_eq!(
        shape(&messages[3..]),
        [triple("DELTA", "1", "CREATE")],
        "one DELTA, not three"
    );
    assert_eq!(
        mirrored(&mut h),
        [
            ("add", 1),
            ("remove rows", 0),
            ("add", 1),
            ("remove rows", 0),
            ("add", 1)
        ]
    );
}

#[tokio::test]
async fn what_is_not_held_is_not_written_to_the_mirror() {
    let mut h = harness();
    let (_q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, ids(&["a", "b"]), None);
    for _ in 0..100 {
        h.router.handle(Command::Unsubscribe {
            conn: 1,
            entity_code: "other".into(),
            entity_ids: None,
        });
        h.router.handle(Command::Unsubscribe {
            conn: 1,
            entity_code: "doc".into(),
            entity_ids: Some(vec!["zz".into()]),
        });
    }
    h.router.handle(Command::Unsubscribe {
        conn: 1,
        entity_code: "doc".into(),
        entity_ids: Some(vec!["a".into(), "zz".into()]),
    });
    assert_eq!(mirrored(&mut h), [("add", 2), ("remove ids", 1)]);
    // Connections that never subscribed come and go without a write.
    for id in 2..100 {
        let _ = connect(&mut h, id, 1, 1 << 20);
        h.router.handle(Command::Disconnect(id));
    }
    h.router.handle(Command::Disconnect(1));
    assert_eq!(mirrored(&mut h), [("remove connection", 0)]);
}

#[tokio::test]
async fn subscribing_faster_than_the_mirror_writes_is_refused_for_that_user_alone() {
    let mut h = harness();
    let (mut churner, _) = connect_as(&mut h, 1, 1, 1 << 20, "mallory");
    let (mut other, _) = connect_as(&mut h, 2, 1, 1 << 20, "bob");
    // Ten rows per user may wait (the harness's cap); nothing is written meanwhile.
    subscribe(&mut h, 1, ids(&["a", "b", "c", "d", "e", "f"]), None);
    subscribe(&mut h, 1, ids(&["g", "h", "i", "j", "k"]), None);
    let refused = drain(&mut churner).await;
    assert_eq!(refused[1]["type"], "ERROR", "{refused:?}");
    assert_eq!(refused[1]["payload"]["code"], "internal");
    subscribe(&mut h, 2, ids(&["a", "b", "c"]), None);
    assert_eq!(drain(&mut other).await[0]["type"], "SUBSCRIBED");
    // Once the mirror wrote the waiting rows, the churner may go on.
    let _ = mirrored(&mut h);
    subscribe(&mut h, 1, ids(&["g", "h", "i", "j", "k"]), None);
    assert_eq!(drain(&mut churner).await[0]["type"], "SUBSCRIBED");
}

#[tokio::test]
async fn a_subscription_that_ends_stops_its_replay() {
    let mut h = harness();
    let (_q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), Some(cursor(5)));
    let start = h.replays.try_recv().expect("a replay to run");
    assert!(!start.cancel.is_cancelled());
    h.router.handle(Command::Unsubscribe {
        conn: 1,
        entity_code: "doc".into(),
        entity_ids: None,
    });
    assert!(start.cancel.is_cancelled());
}

#[tokio::test]
async fn a_refused_replacement_keeps_the_subscription_it_would_replace() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    let ten = ids(&["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]);
    subscribe(&mut h, 1, ten.clone(), None);
    // Its ten rows still wait for the mirror: the same again is over the user's backlog.
    subscribe(&mut h, 1, ten, None);
    let answers = drain(&mut q).await;
    assert_eq!(answers[1]["payload"]["code"], "internal", "{answers:?}");
    route(&mut h, vec![insert("1")], 11);
    assert_eq!(
        shape(&drain(&mut q).await),
        [triple("DELTA", "1", "CREATE")]
    );
    assert_eq!(mirrored(&mut h), [("add", 10)]);
}

#[tokio::test]
async fn subscriptions_are_bounded_per_user_over_its_connections() {
    let mut h = harness();
    // Room in the mirror's backlog: that is not what refuses below.
    h.router.limits.mirror_backlog = Cap::new("subscription changes", 1000, 1000);
    let (mut first, _) = connect_as(&mut h, 1, 1, 1 << 20, "mallory");
    let (mut second, _) = connect_as(&mut h, 2, 1, 1 << 20, "mallory");
    let (mut other, _) = connect_as(&mut h, 3, 1, 1 << 20, "bob");
    let hundred: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    let sixty: Vec<String> = (100..160).map(|i| i.to_string()).collect();
    subscribe(
        &mut h,
        1,
        Target::Ids(hundred.iter().cloned().collect()),
        None,
    );
    subscribe(
        &mut h,
        2,
        Target::Ids(sixty.iter().cloned().collect()),
        None,
    );
    subscribe(&mut h, 3, Target::Ids(sixty.into_iter().collect()), None);
    assert_eq!(drain(&mut first).await[0]["type"], "SUBSCRIBED");
    assert_eq!(
        drain(&mut second).await[0]["payload"]["code"],
        "too_many_subscriptions"
    );
    assert_eq!(drain(&mut other).await[0]["type"], "SUBSCRIBED");
}

/// A change of `doc` row `id` in a transaction that ends with it when `tx_end`.
fn in_tx(id: &str, tx_end: bool) -> Change {
    Change {
        tx_end,
        ..insert(id)
    }
}

/// `(first entity id, txEnd)` of each change message ("" for one of no changes).
fn tx_marks(messages: &[Value]) -> Vec<(String, bool)> {
    messages
        .iter()
        .filter(|m| m["type"] == "DELTA")
        .map(|m| {
            let first = m["payload"]["changes"][0]["entityId"].as_str();
            (
                first.unwrap_or("").to_owned(),
                m["payload"]["txEnd"] == true,
            )
        })
        .collect()
}

#[tokio::test]
async fn the_message_ending_a_transaction_says_so_even_when_its_last_change_is_someone_elses() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, ids(&["1", "2", "4"]), None);
    drain(&mut q).await;
    // Transactions [1, 2, 3] and [4, 5]: this connection sees 1, 2 and 4, not 3 or 5.
    route(
        &mut h,
        vec![
            in_tx("1", false),
            in_tx("2", false),
            in_tx("3", true),
            in_tx("4", false),
            in_tx("5", true),
        ],
        11,
    );
    let messages = drain(&mut q).await;
    assert_eq!(
        tx_marks(&messages),
        [("1".to_owned(), true)],
        "one message holding both transactions, ending the second"
    );
    let changes =
        messages.iter().find(|m| m["type"] == "DELTA").unwrap()["payload"]["changes"].clone();
    assert_eq!(changes.as_array().unwrap().len(), 3, "{changes}");
    // A run that goes on past an end into a transaction cut by a full page does not end.
    route_cut(&mut h, vec![in_tx("1", true), in_tx("2", false)], 12);
    route(&mut h, vec![in_tx("4", true)], 13);
    assert_eq!(
        tx_marks(&drain(&mut q).await),
        [("1".to_owned(), false), ("4".to_owned(), true)]
    );
    // A transaction cut by a full page ends in the next batch.
    route_cut(&mut h, vec![in_tx("1", false)], 14);
    route(&mut h, vec![in_tx("2", true)], 15);
    assert_eq!(
        tx_marks(&drain(&mut q).await),
        [("1".to_owned(), false), ("2".to_owned(), true)]
    );
    // When the next batch holds nothing of it for this connection, a message of no changes
    // ends it, at the position after the transaction's last change.
    route_cut(&mut h, vec![in_tx("1", false)], 16);
    route(&mut h, vec![in_tx("3", true)], 17);
    let messages = drain(&mut q).await;
    assert_eq!(
        tx_marks(&messages),
        [("1".to_owned(), false), ("".to_owned(), true)]
    );
    assert_eq!(
        messages[1]["payload"]["cursor"],
        in_tx("3", true).cursor.as_str()
    );
}

/// A connection that stops following an entity in the middle of a transaction larger than
/// a page, and follows it again before the transaction ends, is not told the end of a
/// transaction its new subscription saw no part of.
#[tokio::test]
async fn an_unsubscribed_entity_is_told_no_end_of_a_transaction_under_way() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, ids(&["1"]), None);
    drain(&mut q).await;
    route_cut(&mut h, vec![in_tx("1", false)], 12);
    assert_eq!(tx_marks(&drain(&mut q).await), [("1".to_owned(), false)]);
    h.router.handle(Command::Unsubscribe {
        conn: 1,
        entity_code: "doc".into(),
        entity_ids: None,
    });
    subscribe(&mut h, 1, ids(&["4"]), None);
    route(&mut h, vec![in_tx("3", true)], 13);
    let messages = drain(&mut q).await;
    assert!(
        messages.iter().all(|m| m["type"] != "DELTA"),
        "{messages:?}"
    );
}

/// A transaction larger than a page, held back from a replay that ends between its pages:
/// what was held goes out then, but the transaction ends only with its last page.
#[tokio::test]
async fn a_replay_ending_inside_a_transaction_leaves_it_open() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), Some(cursor(5)));
    let start = h.replays.try_recv().expect("a replay to run");
    route_cut(&mut h, vec![in_tx("11", false)], 11);
    let six = Arc::new(in_tx("6", true));
    let items = vec![
        ReplayItem::Change(six.clone(), Verdict::Seen(None)),
        ReplayItem::TxEnd(six),
    ];
    replay_parts(&mut h, start.sub, vec![items]);
    route(&mut h, vec![in_tx("12", true)], 12);
    assert_eq!(
        tx_marks(&drain(&mut q).await),
        [
            ("6".to_owned(), true),
            ("11".to_owned(), false),
            ("12".to_owned(), true)
        ]
    );
}

/// As above, when the transaction's last page holds nothing for the connection.
#[tokio::test]
async fn a_replay_ending_inside_a_transaction_has_its_end_told_alone() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, ids(&["11"]), Some(cursor(5)));
    let start = h.replays.try_recv().expect("a replay to run");
    route_cut(&mut h, vec![in_tx("11", false)], 11);
    replay(&mut h, start.sub, vec![]);
    route(&mut h, vec![in_tx("12", true)], 12);
    assert_eq!(
        tx_marks(&drain(&mut q).await),
        [("11".to_owned(), false), ("".to_owned(), true)]
    );
}

/// A replay hands its changes on in parts: a part whose changes of a transaction are all
/// someone else's still tells where the transaction that an earlier part began ends.
#[tokio::test]
async fn a_replay_part_of_none_of_a_transactions_changes_still_ends_it() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, ids(&["6"]), Some(cursor(5)));
    let start = h.replays.try_recv().expect("a replay to run");
    let seven = Arc::new(in_tx("7", true));
    let parts = [
        vec![ReplayItem::Change(
            Arc::new(in_tx("6", false)),
            Verdict::Seen(None),
        )],
        vec![
            ReplayItem::Change(seven.clone(), Verdict::Seen(None)),
            ReplayItem::TxEnd(seven),
        ],
    ];
    replay_parts(&mut h, start.sub, parts.into());
    assert_eq!(
        tx_marks(&drain(&mut q).await),
        [("6".to_owned(), false), ("".to_owned(), true)]
    );
}

#[tokio::test]
async fn an_await_is_answered_once_the_stream_has_passed_its_cursor() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    let ahead = cursor(12);
    h.router.handle(Command::Await {
        conn: 1,
        cursor: ahead.clone(),
        reference: Some("w1".into()),
    });
    h.router.handle(Command::Await {
        conn: 1,
        cursor: cursor(10),
        reference: Some("w0".into()),
    });
    let reached = drain(&mut q).await;
    assert_eq!(reached.len(), 1, "{reached:?}");
    assert_eq!(reached[0]["type"], "REACHED");
    assert_eq!(reached[0]["payload"]["ref"], "w0");
    route(&mut h, vec![insert("1")], 11);
    assert!(drain(&mut q).await.is_empty(), "not at 12 yet");
    route(&mut h, vec![], 12);
    let reached = drain(&mut q).await;
    assert_eq!(reached[0]["payload"]["ref"], "w1", "{reached:?}");
    // A cursor of another log never will be.
    h.router.handle(Command::Await {
        conn: 1,
        cursor: Cursor::from_db("1.cd.1_1__1_1".into()),
        reference: Some("w2".into()),
    });
    let refused = drain(&mut q).await;
    assert_eq!(refused[0]["payload"]["code"], "bad_request", "{refused:?}");
}

#[tokio::test]
async fn an_await_waits_for_a_replay_to_finish() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), Some(cursor(5)));
    let start = h.replays.recv().await.unwrap();
    h.router.handle(Command::Await {
        conn: 1,
        cursor: cursor(10),
        reference: None,
    });
    assert_eq!(drain(&mut q).await.len(), 1, "SUBSCRIBED only");
    h.router.handle(Command::Replay(ReplayEvent::Done {
        conn: 1,
        sub: start.sub,
    }));
    let kinds: Vec<Value> = drain(&mut q)
        .await
        .iter()
        .map(|m| m["type"].clone())
        .collect();
    assert_eq!(kinds, ["SYNCED", "REACHED"]);
}

#[tokio::test]
async fn subscribers_of_a_replaced_entity_refetch_and_their_subscriptions_end() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), None);
    drain(&mut q).await;
    h.router.handle(Command::Replaced(vec!["doc".into()]));
    let resync = drain(&mut q).await;
    assert_eq!(resync[0]["type"], "RESYNC");
    assert_eq!(resync[0]["payload"]["reason"], "entity_changed");
    route(&mut h, vec![insert("1")], 11);
    assert!(drain(&mut q).await.is_empty(), "the subscription ended");
    // A change written under another tracking, seen live: the same.
    subscribe(&mut h, 1, Target::Rows(None), None);
    drain(&mut q).await;
    let mut stale = batch(vec![insert("2")], vec![], 12, true);
    stale.page.verdicts = vec![Verdict::Refetch(ResyncReason::EntityChanged)];
    h.router.handle(Command::Batch(Arc::new(stale)));
    let resync = drain(&mut q).await;
    assert_eq!(resync.len(), 1, "{resync:?}");
    assert_eq!(resync[0]["payload"]["reason"], "entity_changed");
    route(&mut h, vec![insert("3")], 13);
    assert!(drain(&mut q).await.is_empty(), "the subscription ended");
}

/// A subscription waiting for the end of a drain when its entity is replaced was checked
/// against the old table: it ends with RESYNC too, and is never made. Fails when `replaced`
/// passes over the deferred requests (the client was served an untracked entity as live).
#[tokio::test]
async fn a_subscription_deferred_when_its_entity_is_replaced_refetches() {
    let mut h = harness();
    let mut q = deferred_subscriber(&mut h, 1).await;
    h.router.handle(Command::Replaced(vec!["doc".into()]));
    let resync = drain(&mut q).await;
    assert_eq!(shape(&resync), [triple("RESYNC", "", "")]);
    assert_eq!(resync[0]["payload"]["reason"], "entity_changed");
    never_subscribed(&mut h, &mut q, 11).await;
}

/// Connection 1, of `group`, with a SUBSCRIBE of every row from cursor 5 that waits for the
/// end of the drain under way (cursor 10).
async fn deferred_subscriber(h: &mut Harness, group: GroupId) -> Queue {
    let (mut q, _) = connect(h, 1, group, 1 << 20);
    route_cut(h, vec![insert("1")], 10);
    subscribe(h, 1, Target::Rows(None), Some(cursor(5)));
    assert!(
        drain(&mut q).await.is_empty(),
        "deferred to the drain's end"
    );
    q
}

/// Once the drain ends at `end`, connection 1 was never subscribed: sent and replayed nothing.
async fn never_subscribed(h: &mut Harness, q: &mut Queue, end: u64) {
    route(h, vec![insert("2")], end);
    assert!(drain(q).await.is_empty(), "never subscribed");
    assert!(h.replays.try_recv().is_err(), "nothing replayed");
}

/// A connection defers no more SUBSCRIBEs than it may replay (2 here): the next is refused
/// at once (an attacker's flood during a drain would hold memory until its end, and make
/// each refusal and replacement scan it); the same one again takes its twin's place; a
/// disconnection drops what waits.
#[tokio::test]
async fn a_connection_defers_no_more_subscriptions_than_it_may_replay() {
    let mut h = harness();
    let mut q = deferred_subscriber(&mut h, 1).await;
    subscribe(&mut h, 1, Target::Rows(None), Some(cursor(6)));
    let ids = |id: &str| Target::Ids([id.to_owned()].into_iter().collect());
    subscribe(&mut h, 1, ids("2"), Some(cursor(5)));
    assert!(drain(&mut q).await.is_empty());
    subscribe(&mut h, 1, ids("3"), Some(cursor(5)));
    let refused = drain(&mut q).await;
    assert_eq!(
        refused[0]["payload"]["code"], "too_many_subscriptions",
        "{refused:?}"
    );
    assert_eq!(h.router.deferred[&1].len(), 2);
    let twin = &h.router.deferred[&1][0];
    assert_eq!(
        twin.since,
        Some(cursor(6)),
        "the later twin in the earlier's place"
    );
    h.router.handle(Command::Disconnect(1));
    assert!(!h.router.deferred.contains_key(&1));
}

/// An UNSUBSCRIBE that follows a SUBSCRIBE deferred to the drain's end ends it too: made at
/// the drain's end as it was, the subscription outlived the UNSUBSCRIBE and got the entity's
/// changes. One of some ids leaves the others.
#[tokio::test]
async fn an_unsubscribe_after_a_deferred_subscribe_ends_it() {
    let mut h = harness();
    let mut q = deferred_subscriber(&mut h, 1).await;
    let ids = Target::Ids(["2", "3"].map(String::from).into_iter().collect());
    subscribe(&mut h, 1, ids, Some(cursor(5)));
    let unsubscribe = |ids: Option<&str>| Command::Unsubscribe {
        conn: 1,
        entity_code: "doc".into(),
        entity_ids: ids.map(|id| vec![id.to_owned()]),
    };
    h.router.handle(unsubscribe(Some("2")));
    let left = h.router.deferred[&1].len();
    assert_eq!(left, 2, "an UNSUBSCRIBE of ids leaves a filter");
    h.router.handle(unsubscribe(Some("3")));
    let left = h.router.deferred[&1].len();
    assert_eq!(left, 1, "its last id gone, the subscription goes");
    h.router.handle(unsubscribe(None));
    never_subscribed(&mut h, &mut q, 11).await;
}

#[tokio::test]
async fn a_resync_met_live_during_a_replay_follows_the_replays_older_changes() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), Some(cursor(5)));
    let start = h.replays.try_recv().expect("a replay to run");
    let mut access = insert("11");
    access.op = Op::Access;
    route(&mut h, vec![access], 11);
    assert_eq!(shape(&drain(&mut q).await), [triple("SUBSCRIBED", "", "")]);
    replay(&mut h, start.sub, vec![insert("6")]);
    assert_eq!(
        shape(&drain(&mut q).await),
        [
            triple("DELTA", "6", "CREATE"),
            triple("SYNCED", "", ""),
            triple("RESYNC", "", ""),
        ]
    );
}

#[tokio::test]
async fn many_access_changes_in_one_read_make_one_refetch() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), None);
    drain(&mut q).await;
    let access = |n: &str| Change {
        op: Op::Access,
        ..insert(n)
    };
    // 100 statements on a membership table, then a change, then one more.
    let mut changes: Vec<Change> = (1..=100).map(|n| access(&n.to_string())).collect();
    changes.push(insert("101"));
    changes.push(access("102"));
    route(&mut h, changes, 11);
    let kinds: Vec<String> = shape(&drain(&mut q).await)
        .into_iter()
        .map(|(kind, _, _)| kind)
        .collect();
    assert_eq!(kinds, ["RESYNC", "DELTA", "RESYNC"]);
}

/// A refreshed token that puts the connection in another group (other claims or role) ends
/// the replays under way, which judge the gap for the old token: RESYNC `access_changed`, and
/// nothing more of the gap. One that keeps the group lets them go on.
#[tokio::test]
async fn a_refreshed_token_of_another_group_ends_the_replays_judged_for_the_old_one() {
    let mut h = harness();
    let (mut q, _) = connect(&mut h, 1, 1, 1 << 20);
    subscribe(&mut h, 1, Target::Rows(None), Some(cursor(5)));
    let start = h.replays.try_recv().expect("a replay to run");
    drain(&mut q).await;
    let token = |claims: Value| {
        Arc::new(UserContext {
            sub: "user1".into(),
            role: Some("app_user".into()),
            claims: claims.to_string(),
            claims_json: claims,
        })
    };
    h.router.handle(Command::Reauth {
        conn: 1,
        user: token(json!({})),
        group: 1,
    });
    assert!(drain(&mut q).await.is_empty() && !start.cancel.is_cancelled());
    h.router.handle(Command::Reauth {
        conn: 1,
        user: token(json!({"team": "b"})),
        group: 2,
    });
    let messages = drain(&mut q).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0]["type"], "RESYNC");
    assert_eq!(messages[0]["payload"]["reason"], "access_changed");
    assert!(start.cancel.is_cancelled(), "the replay task stops");
    replay(&mut h, start.sub, vec![insert("6")]);
    assert!(drain(&mut q).await.is_empty(), "nothing of the gap after");
}
