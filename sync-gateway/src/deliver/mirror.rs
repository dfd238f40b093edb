//! The gateway's mirror in the database: its connections' subscriptions in
//! `sync.subscription` and its heartbeat in `sync.gateway`.
//!
//! Writes are batched: the router hands over operations without waiting, and this task
//! applies whatever has queued up in one transaction, in order. What may queue is bounded:
//! each added row holds a place of the router's `mirror_backlog` cap until it is written, and
//! removals follow additions. The heartbeat is a task of its own, so that no backlog delays
//! it (a gateway whose heartbeat goes stale is taken for dead by the others); every beat it
//! also removes the rows of gateways whose heartbeat went stale (they died without cleaning
//! up).

use crate::access::limits::Held;
use crate::backoff::Backoff;
use crate::model::protocol::Mode;
use deadpool_postgres::Pool;
use serde_json::Value;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One row of `sync.subscription`.
#[derive(Debug, Clone)]
pub struct SubscriptionRow {
    pub connection_id: String,
    pub user_id: String,
    pub entity_code: String,
    pub entity_id: Option<String>,
    pub filter: Option<Value>,
    pub mode: Mode,
}

#[derive(Debug)]
pub enum MirrorOp {
    /// Rows to insert, and their places in the backlog, given back once written.
    Add(Vec<SubscriptionRow>, Held),
    RemoveIds {
        connection_id: String,
        entity_code: String,
        entity_ids: Vec<String>,
    },
    RemoveEntity {
        connection_id: String,
        entity_code: String,
    },
    /// A whole-entity (or filtered) subscription's row.
    RemoveRows {
        connection_id: String,
        entity_code: String,
        filter: Option<Value>,
    },
    RemoveConnection(String),
}

/// Operations applied in one transaction at most.
const BATCH: usize = 1000;

pub struct Mirror {
    pub pool: Pool,
    pub gateway_id: String,
    pub heartbeat: Duration,
}

impl Mirror {
    /// Applies operations until `shutdown`, then removes this gateway's rows.
    pub async fn run(
        self,
        mut ops: mpsc::UnboundedReceiver<MirrorOp>,
        shutdown: CancellationToken,
    ) {
        let this = std::sync::Arc::new(self);
        let beating = shutdown.child_token();
        let heartbeat = tokio::spawn(this.clone().beat_until(beating.clone()));
        let mut pending = Vec::new();
        loop {
            tokio::select! {
                received = ops.recv_many(&mut pending, BATCH) => {
                    if received == 0 {
                        break;
                    }
                    this.retrying(|| this.apply(&pending), &shutdown).await;
                    pending.clear();
                },
                _ = shutdown.cancelled() => break,
            }
        }
        // Stop beating first: a beat after leaving would put this gateway back.
        beating.cancel();
        let _ = heartbeat.await;
        if let Err(e) = this.leave().await {
            tracing::warn!(error = %crate::ErrorChain(&e), "could not remove this gateway's subscriptions");
        }
    }

    /// Retries a write until it succeeds or the gateway stops: the mirror must not lose
    /// an operation while the database is briefly away.
    async fn retrying<F, Fut>(&self, mut write: F, shutdown: &CancellationToken)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), MirrorError>>,
    {
        let mut backoff = Backoff::default();
        while let Err(e) = write().await {
            tracing::warn!(error = %crate::ErrorChain(&e), "writing subscriptions failed; retrying");
            if !backoff.wait(shutdown).await {
                return;
            }
        }
    }

    async fn apply(&self, ops: &[MirrorOp]) -> Result<(), MirrorError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        for op in ops {
            match op {
                MirrorOp::Add(rows, _) => {
                    let column = |f: fn(&SubscriptionRow) -> Option<String>| {
                        rows.iter().map(f).collect::<Vec<_>>()
                    };
                    let filters: Vec<Option<Value>> =
                        rows.iter().map(|r| r.filter.clone()).collect();
                    tx.execute(
                        "INSERT INTO sync.subscription
                              (connection_id, user_id, entity_code, entity_id, filter, mode, gateway_id)
                         SELECT c, u, e, i, f, m, $7
                           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[])
                                AS r(c, u, e, i, f, m)",
                        &[
                            &column(|r| Some(r.connection_id.clone())),
                            &column(|r| Some(r.user_id.clone())),
                            &column(|r| Some(r.entity_code.clone())),
                            &column(|r| r.entity_id.clone()),
                            &filters,
                            &column(|r| Some(match r.mode {
                                Mode::Delta => "delta".to_owned(),
                                Mode::Invalidate => "invalidate".to_owned(),
                            })),
                            &self.gateway_id,
                        ],
                    )
                    .await?;
                }
                MirrorOp::RemoveIds {
                    connection_id,
                    entity_code,
                    entity_ids,
                } => {
                    tx.execute(
                        "DELETE FROM sync.subscription
                          WHERE connection_id = $1 AND entity_code = $2 AND entity_id = ANY ($3)",
                        &[connection_id, entity_code, entity_ids],
                    )
                    .await?;
                }
                MirrorOp::RemoveEntity {
                    connection_id,
                    entity_code,
                } => {
                    tx.execute(
                        "DELETE FROM sync.subscription WHERE connection_id = $1 AND entity_code = $2",
                        &[connection_id, entity_code],
                    )
                    .await?;
                }
                MirrorOp::RemoveRows {
                    connection_id,
                    entity_code,
                    filter,
                } => {
                    tx.execute(
                        "DELETE FROM sync.subscription
                          WHERE connection_id = $1 AND entity_code = $2 AND entity_id IS NULL
                            AND filter IS NOT DISTINCT FROM $3",
                        &[connection_id, entity_code, filter],
                    )
                    .await?;
                }
                MirrorOp::RemoveConnection(connection_id) => {
                    tx.execute(
                        "DELETE FROM sync.subscription WHERE connection_id = $1",
                        &[connection_id],
                    )
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn beat_until(self: std::sync::Arc<Self>, stop: CancellationToken) {
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        while stop.run_until_cancelled(heartbeat.tick()).await.is_some() {
            if let Err(e) = self.beat().await {
                tracing::warn!(error = %crate::ErrorChain(&e), "heartbeat failed");
            }
        }
    }

    async fn beat(&self) -> Result<(), MirrorError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO sync.gateway (gateway_id) VALUES ($1)
                 ON CONFLICT (gateway_id) DO UPDATE SET heartbeat_at = now()",
                &[&self.gateway_id],
            )
            .await?;
        // A gateway that missed several heartbeats is dead: its connections are gone.
        let stale = (self.heartbeat * 6).as_secs_f64();
        client
            .execute(
                "WITH dead AS (DELETE FROM sync.gateway
                                WHERE heartbeat_at < now() - make_interval(secs => $1)
                                RETURNING gateway_id)
                 DELETE FROM sync.subscription WHERE gateway_id IN (SELECT gateway_id FROM dead)",
                &[&stale],
            )
            .await?;
        Ok(())
    }

    async fn leave(&self) -> Result<(), MirrorError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "DELETE FROM sync.subscription WHERE gateway_id = $1",
                &[&self.gateway_id],
            )
            .await?;
        client
            .execute(
                "DELETE FROM sync.gateway WHERE gateway_id = $1",
                &[&self.gateway_id],
            )
            .await?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}
