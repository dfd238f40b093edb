//! What a visibility change costs a user: joining a project of `--rows` tasks behind a
//! compiled membership policy, until the user's copy holds them (and leaving, until it holds
//! none). The gateway tells the user's socket to refetch (RESYNC `access_changed`) and the
//! client takes a snapshot; the reference is that snapshot alone, of the same rows. The
//! membership's own commit (its round trip, a WAL flush) is part of the time, and is
//! reported apart too, as is the time until the RESYNC arrived. Meanwhile the other
//! connections, members of another project, follow the same tasks: the RESYNCs they get
//! are counted, since a write of the user's membership should concern the user alone.

use super::{connect, database, http_get, next_message, percentiles, token, Common, Socket};
use anyhow::{bail, Result};
use futures_util::SinkExt;
use serde_json::{json, Value};
use std::time::Instant;
use tokio_tungstenite::tungstenite::Message;

pub(super) async fn enter(c: Common) -> Result<Value> {
    // Connection 0's token names the role the policy applies to.
    let c = Common {
        rls_claim_sets: c.rls_claim_sets.max(1),
        ..c
    };
    let db = database(&c.database_url).await?;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS bench_task; DROP TABLE IF EXISTS bench_project_member;
         DO $$ BEGIN CREATE ROLE bench_user NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         CREATE TABLE bench_project_member (project_id int, user_id text, PRIMARY KEY (project_id, user_id));
         CREATE TABLE bench_task (id int PRIMARY KEY, project_id int NOT NULL, pad text);
         INSERT INTO bench_task SELECT g, 1 + g % 2, repeat('x', 40) FROM generate_series(1, {}) g;
         GRANT SELECT ON bench_task, bench_project_member TO bench_user;
         ALTER TABLE bench_task ENABLE ROW LEVEL SECURITY;
         CREATE POLICY member ON bench_task USING (EXISTS (
             SELECT 1 FROM bench_project_member m WHERE m.project_id = bench_task.project_id
                AND m.user_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));
         INSERT INTO bench_project_member SELECT 2, 'user' || i FROM generate_series(1, {}) i;
         SELECT sync.track('bench_task');",
        c.rows * 2,
        c.connections.saturating_sub(1)
    ))
    .await?;
    let mut bystanders = Vec::new();
    for i in 1..c.connections {
        let url = format!("ws://{}/ws/sync?token={}", c.gateway, token(&c, i));
        let mut socket = connect(&url).await?;
        subscribe(&mut socket).await?;
        bystanders.push(tokio::spawn(resyncs_before_a_change(socket)));
    }
    let auth = token(&c, 0);
    let url = format!("ws://{}/ws/sync?token={auth}", c.gateway);
    let mut socket = connect(&url).await?;
    let (mut enter, mut leave, mut alone) = (vec![], vec![], vec![]);
    let (mut commit, mut told) = (vec![], vec![]);
    for _ in 0..c.rounds {
        subscribe(&mut socket).await?;
        let start = Instant::now();
        db.batch_execute("INSERT INTO bench_project_member VALUES (1, 'user0')")
            .await?;
        commit.push(start.elapsed().as_micros() as u64);
        refetch_asked(&mut socket).await?;
        told.push(start.elapsed().as_micros() as u64);
        expect_rows(&c, &auth, c.rows).await?;
        enter.push(start.elapsed().as_micros() as u64);

        let start = Instant::now();
        expect_rows(&c, &auth, c.rows).await?;
        alone.push(start.elapsed().as_micros() as u64);

        subscribe(&mut socket).await?;
        let start = Instant::now();
        db.batch_execute("DELETE FROM bench_project_member WHERE user_id = 'user0'")
            .await?;
        refetch_asked(&mut socket).await?;
        expect_rows(&c, &auth, 0).await?;
        leave.push(start.elapsed().as_micros() as u64);
    }
    // A task of the bystanders' project changes: each socket's messages follow the log's
    // order, so every RESYNC a bystander was sent came before it.
    db.batch_execute("UPDATE bench_task SET pad = 'changed' WHERE project_id = 2 AND id = 1")
        .await?;
    let mut bystander_resyncs = 0;
    for counted in bystanders {
        bystander_resyncs += counted.await??;
    }
    Ok(json!({
        "mode": "enter", "rows": c.rows, "rounds": c.rounds,
        "bystanders": c.connections.saturating_sub(1),
        "bystander_resyncs": bystander_resyncs,
        "enter": percentiles(enter), "leave": percentiles(leave), "snapshot": percentiles(alone),
        "commit": percentiles(commit), "resync": percentiles(told),
    }))
}

/// Subscribes to the tasks (again, after a refetch), until SUBSCRIBED.
async fn subscribe(socket: &mut Socket) -> Result<()> {
    let subscribe =
        json!({"type": "SUBSCRIBE", "payload": {"entityCode": "bench_task", "mode": "delta"}});
    socket.send(Message::text(subscribe.to_string())).await?;
    until(socket, "SUBSCRIBED").await
}

/// The RESYNCs a socket receives before its first change.
async fn resyncs_before_a_change(mut socket: Socket) -> Result<usize> {
    let mut resyncs = 0;
    loop {
        let value = next_message(&mut socket).await?;
        match value["type"].as_str() {
            Some("RESYNC") => resyncs += 1,
            Some("DELTA") => return Ok(resyncs),
            Some("ERROR") => bail!("unexpected: {value}"),
            _ => {}
        }
    }
}

/// Waits for the RESYNC that a membership change sends.
async fn refetch_asked(socket: &mut Socket) -> Result<()> {
    until(socket, "RESYNC").await
}

async fn until(socket: &mut Socket, kind: &str) -> Result<()> {
    loop {
        let value = next_message(socket).await?;
        match value["type"].as_str() {
            Some(t) if t == kind => return Ok(()),
            Some("ERROR") => bail!("unexpected: {value}"),
            _ => {}
        }
    }
}

/// `GET /v1/snapshot/bench_task` as the user: it must hold `rows` rows.
async fn expect_rows(c: &Common, auth: &str, rows: usize) -> Result<()> {
    let (_, _, body) = http_get(&c.gateway, "/v1/snapshot/bench_task", Some(auth)).await?;
    let text = String::from_utf8_lossy(&body);
    let held = text.matches("\"pad\"").count();
    if held != rows {
        bail!("the snapshot held {held} rows, not {rows}");
    }
    Ok(())
}
