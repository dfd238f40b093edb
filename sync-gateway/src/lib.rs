//! sync-gateway: the server beside PostgreSQL that pushes pg_sync's change log to clients.
//!
//! Data flows through the modules in this order:
//! - `reader` wakes on NOTIFY (or polls), reads the log once for the whole gateway (`log`)
//!   and hands batches to
//! - `router`, one task that owns every subscription and turns each change into messages
//!   for the connections that see it;
//! - `session` is one WebSocket connection: it checks the client's messages (`protocol`,
//!   `filter`, against `catalog`) and writes what the router queues;
//! - `replay` serves SUBSCRIBE with `since` from the log up to the live position;
//! - `ingest` drives WAL capture (`sync.ingest_wal`) on one gateway at a time;
//! - `store` mirrors subscriptions into `sync.subscription` and heartbeats;
//! - `access` runs queries as the user (role and claims) for row-level security;
//! - `http` holds the endpoints, with `snapshot`, `changes` and `write` for clients without
//!   sockets; `metrics` counts; `auth` checks tokens, `config` is the command line.

pub mod access;
pub mod auth;
pub mod catalog;
pub mod changes;
pub mod config;
pub mod filter;
pub mod http;
pub mod ingest;
pub mod log;
pub mod metrics;
pub mod outbound;
pub mod outbox;
pub mod protocol;
pub mod reader;
pub mod replay;
pub mod router;
pub mod session;
pub mod snapshot;
pub mod store;
pub mod write;

#[cfg(test)]
mod fuzz;

use crate::access::Roles;
use crate::auth::Verifier;
use crate::catalog::Catalog;
use crate::config::ServeArgs;
use crate::metrics::Metrics;
use crate::router::{Database, Router};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shows an error with its causes (tokio-postgres keeps the interesting part in `source`).
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// What the endpoints and sessions share.
pub struct AppState {
    pub pool: Pool,
    pub verifier: Verifier,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub roles: Arc<Roles>,
    pub gateway_id: String,
    /// Where the live stream stands; changes as batches are routed (long-polls wait on it).
    pub position: watch::Receiver<String>,
    pub router: mpsc::Sender<router::Command>,
    pub ready: Arc<AtomicBool>,
    pub next_connection: AtomicU64,
    pub send_queue_bytes: usize,
    pub ping_interval: Duration,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("bad --database-url: {0}")]
    DatabaseUrl(tokio_postgres::Error),
    #[error("cannot build the connection pool: {0}")]
    Pool(#[from] deadpool_postgres::BuildError),
    #[error("cannot connect to the database: {0}")]
    Connect(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Roles(#[from] access::RolesError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Server(std::io::Error),
}

/// Serves until `shutdown` is cancelled, then closes every connection (1001), waits for
/// them, and removes this gateway's subscriptions.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> Result<(), ServeError> {
    let verifier = Verifier::new(&args.auth)?;
    let pg_config =
        tokio_postgres::Config::from_str(&args.database_url).map_err(ServeError::DatabaseUrl)?;
    let manager = Manager::from_config(
        pg_config.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(16).build()?;
    let roles = Arc::new(
        Roles::check(
            &**pool.get().await?,
            args.default_role.clone(),
            args.allowed_roles(),
            args.insecure_superuser,
        )
        .await?,
    );
    tokio::spawn(refresh_roles(roles.clone(), pool.clone(), shutdown.clone()));
    let gateway_id = args
        .gateway_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());

    let (router_tx, router_rx) = mpsc::channel(1024);
    let (batch_tx, batch_rx) = mpsc::channel(2);
    let (store_tx, store_rx) = mpsc::unbounded_channel();
    let (replay_tx, replay_rx) = mpsc::unbounded_channel();
    let (position_tx, position_rx) = watch::channel(String::new());
    let ready = Arc::new(AtomicBool::new(false));
    let tracker = TaskTracker::new();

    let store = store::Store {
        pool: pool.clone(),
        gateway_id: gateway_id.clone(),
        heartbeat: args.heartbeat(),
    };
    let store_task = tokio::spawn(store.run(store_rx, shutdown.clone()));
    let catalog = Arc::new(Catalog::new(pool.clone()));
    tokio::spawn(catalog.clone().refresh(shutdown.clone()));
    let metrics = Arc::new(Metrics::default());
    let database = Database {
        pool: pool.clone(),
        catalog: catalog.clone(),
        metrics: metrics.clone(),
    };
    let router = Router::new(
        database,
        gateway_id.clone(),
        args.max_subscriptions,
        position_tx,
        store_tx,
        replay_tx,
    );
    let router_task = tokio::spawn(router.run(router_rx, batch_rx));
    let replayer = replay::Replayer {
        pool: pool.clone(),
        catalog: catalog.clone(),
        router: router_tx.clone(),
        position: position_rx.clone(),
    };
    tokio::spawn(replayer.run(replay_rx, shutdown.clone()));
    let reader = reader::Reader {
        pool: pool.clone(),
        listen_config: pg_config,
        poll_interval: args.poll_interval(),
        router: batch_tx,
        ready: ready.clone(),
    };
    let reader_task = tokio::spawn(reader.run(shutdown.clone()));
    if args.wal_ingest {
        let ingest = ingest::Ingest {
            pool: pool.clone(),
            interval: args.wal_ingest_interval(),
        };
        tokio::spawn(ingest.run(shutdown.clone()));
    }

    let state = Arc::new(AppState {
        pool: pool.clone(),
        verifier,
        catalog,
        metrics,
        roles,
        gateway_id: gateway_id.clone(),
        position: position_rx,
        router: router_tx,
        ready,
        next_connection: AtomicU64::new(1),
        send_queue_bytes: args.send_queue_bytes,
        ping_interval: args.ping_interval(),
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Listen {
            address: args.listen,
            source,
        })?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .map_err(|source| ServeError::Listen {
            address: args.admin_listen,
            source,
        })?;
    tracing::info!(address = %args.listen, admin = %args.admin_listen, gateway_id, "serving");
    let admin = axum::serve(admin_listener, http::admin_app(state.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let public = axum::serve(listener, http::app(state.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let (public, admin) = tokio::join!(public, admin);
    public.and(admin).map_err(ServeError::Server)?;

    // The sessions close themselves on `shutdown`; wait for them to unsubscribe.
    tracker.close();
    tracker.wait().await;
    let _ = reader_task.await;
    drop(state);
    let _ = router_task.await;
    let _ = store_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Re-reads which allowed roles are safe to act as (a role made superuser or BYPASSRLS since
/// the start is refused from then on).
async fn refresh_roles(roles: Arc<Roles>, pool: Pool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let refreshed = match pool.get().await {
            Ok(client) => roles
                .refresh(&client)
                .await
                .map_err(|e| ErrorChain(&e).to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = refreshed {
            tracing::warn!(error = %e, "re-reading the allowed roles failed");
        }
    }
}
