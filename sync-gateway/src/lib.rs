//! sync-gateway: the server beside PostgreSQL that pushes pg_sync's change log to clients.
//!
//! A one-way pipeline; each stage owns its resources and talks to the next by a channel:
//!
//! ```text
//!  PostgreSQL ──NOTIFY──▶ feed::listen ─wake─▶ feed::reader ──pages──▶ access::visibility
//!                          (feed pool: reader, catalog, roles, mirror)   (visibility pool)
//!                                                                            │ judged batches,
//!  connections ──Connect/Subscribe/…─────────────────────────────────────────┤ commands in order
//!                                                                            ▼
//!  deliver::replay ──pages──▶ deliver::router (pure, no I/O) ──bounded queues──▶ connection writers
//!  (client pool)                   │  └─▶ deliver::mirror (sync.subscription)          │
//!                                  └─ live position ─▶ long-polls, ahead-cursor checks  ▼ sockets
//! http: changes (client pool); snapshot, write (authenticator pool: users' own queries, on a
//! login that reads nothing of the log); both capped per user and in total; admin: metrics, status
//! ```
//!
//! With `--read-url` the reads (the log, the catalog, policies, replays, long-polls,
//! snapshots) go to a hot standby and the writes to the primary (`pools`); the reader then
//! marks the log on the primary at each wake-up and waits for the standby to replay the mark
//! (`feed::replica`), and a client's cursor the standby has not replayed is waited for, a
//! bounded time (`deliver::reach`).
//!
//! `model` holds the plain types every stage shares. Nothing calls back up the pipeline, and
//! no client can make a stage before the router wait: client work has its own pool and caps
//! (`access::limits`), and a connection that does not read is closed by its own writer.

pub mod access;
mod backoff;
pub mod config;
pub mod deliver;
pub mod feed;
pub mod http;
pub mod metrics;
pub mod model;
pub mod pools;

#[cfg(test)]
mod fuzz;

use crate::access::auth::Verifier;
use crate::access::limits::WorkPools;
use crate::access::limits::{Cap, ClientWork, Turns};
use crate::access::plans::Plans;
use crate::access::roles::{Groups, Roles};
use crate::access::stage::Stage;
use crate::config::ServeArgs;
use crate::deliver::command::Command;
use crate::deliver::mirror::Mirror;
use crate::deliver::replay::{Replayer, SharedReads};
use crate::deliver::router::{Limits, Outlets, Router};
use crate::feed::catalog::Catalog;
use crate::feed::ingest::Ingest;
use crate::feed::reader::Reader;
use crate::feed::replica::Replica;
use crate::metrics::Metrics;
use crate::model::cursor::Cursor;
use crate::pools::Pools;
use axum::serve::ListenerExt;
use deadpool_postgres::Pool;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
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

/// Settings the connections and endpoints read.
pub struct RuntimeConfig {
    pub send_queue_bytes: usize,
    pub send_timeout: Duration,
    pub ping_interval: Duration,
    /// Clients of a stopping gateway reconnect at random within this window.
    pub reconnect_window: Duration,
    /// How long a client's cursor the live stream has not reached is waited for.
    pub behind_patience: Duration,
    pub snapshot_idle_timeout: Duration,
    pub snapshot_max_duration: Duration,
    pub cors_origins: Vec<String>,
    pub static_dir: Option<PathBuf>,
    /// The HTTP cache in front checks audiences (`--shared-cache`).
    pub shared_cache: bool,
}

/// What clients hold, capped, and how fast they may come.
pub struct Caps {
    /// New WebSocket connections per second, per user and in total.
    pub admissions: access::limits::Admissions,
    pub connections: Arc<Cap>,
    pub snapshots: Arc<Cap>,
    /// Snapshots sent from memory (`http::shared_snapshots`).
    pub shared_snapshots: Arc<Cap>,
    pub long_polls: Arc<Cap>,
}

/// What the endpoints and connections share.
pub struct AppState {
    pub verifier: Verifier,
    pub roles: Arc<Roles>,
    pub groups: Groups,
    pub catalog: Arc<Catalog>,
    pub plans: Arc<Plans>,
    pub work: Arc<ClientWork>,
    /// Commands to the router, through the visibility stage.
    pub control: mpsc::Sender<Command>,
    /// Where the live stream stands; changes as batches are routed ("the log moved").
    pub position: watch::Receiver<Option<Cursor>>,
    pub config: RuntimeConfig,
    pub caps: Caps,
    /// `/v1/changes` pages shared within an audience.
    pub pages: http::pages::Pages,
    /// Whole-entity snapshots shared within an audience.
    pub snapshots: http::shared_snapshots::SharedSnapshots,
    /// Signs the positions pages are linked from.
    pub page_links: http::links::PageLinks,
    pub metrics: Arc<Metrics>,
    pub gateway_id: String,
    pub ready: Arc<AtomicBool>,
    pub next_connection: AtomicU64,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Auth(#[from] access::auth::AuthError),
    #[error("--page-link-secret is empty: anyone could sign page links with it")]
    EmptyPageLinkSecret,
    #[error("bad --database-url, --read-url or --authenticator-url: {0}")]
    DatabaseUrl(tokio_postgres::Error),
    #[error("cannot build a connection pool: {0}")]
    Pool(#[from] deadpool_postgres::BuildError),
    #[error("cannot connect to the database: {0}")]
    Connect(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("--read-url is not a copy of --database-url's database (their logs differ)")]
    NotAReplica,
    #[error(transparent)]
    Roles(#[from] access::roles::RolesError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Server(std::io::Error),
}

/// Subscription rows waiting to be written to `sync.subscription`, in total and per user (a
/// few hundred bytes each): one SUBSCRIBE of a connection's 10,000 ids fits a user's share.
const MIRROR_BACKLOG: usize = 200_000;
const MIRROR_BACKLOG_PER_USER: usize = 20_000;

/// Serves until `shutdown` is cancelled, then closes every connection (1001), waits for
/// them, and removes this gateway's subscriptions.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> Result<(), ServeError> {
    let verifier = Verifier::new(&args.auth)?;
    let page_links = match (&args.page_link_secret, &args.auth.jwt_secret) {
        (Some(secret), _) if secret.is_empty() => return Err(ServeError::EmptyPageLinkSecret),
        (Some(secret), _) | (None, Some(secret)) => http::links::PageLinks::new(secret.as_bytes()),
        (None, None) => http::links::PageLinks::of_this_process(),
    };
    let pools = Pools::new(&args)?;
    if pools.replica {
        pools.check_replica().await?;
        // Roles::check below checks the login of --read-url; this, --database-url's.
        let primary = pools.primary.get().await?;
        access::roles::check_login(&primary, args.insecure_superuser).await?;
    }
    let authenticator = match &args.authenticator_url {
        Some(_) => Some(
            pools
                .user_writes
                .get()
                .await?
                .query_one("SELECT current_user::text", &[])
                .await
                .map_err(access::roles::RolesError::from)?
                .get::<_, String>(0),
        ),
        None => None,
    };
    let roles = Arc::new(
        Roles::check(
            &**pools.feed.get().await?,
            authenticator,
            args.default_role.clone(),
            args.allowed_roles(),
            args.insecure_superuser,
        )
        .await?,
    );
    tokio::spawn(refresh_roles(
        roles.clone(),
        pools.feed.clone(),
        shutdown.clone(),
    ));
    let gateway_id = args
        .gateway_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let catalog = Arc::new(Catalog::new(
        pools.feed.clone(),
        pools.primary.clone(),
        args.allowed_roles(),
    ));
    let plans = Arc::new(Plans::default());
    let metrics = Arc::new(Metrics::default());
    let work = Arc::new(ClientWork::new(
        WorkPools {
            reads: pools.clients.clone(),
            on_primary: pools.clients_on_primary.clone(),
            user_reads: pools.user_reads.clone(),
            user_writes: pools.user_writes.clone(),
            replica: pools.replica,
        },
        args.caps.max_queries_per_user,
    ));

    let (control_tx, control_rx) = mpsc::channel(1024);
    let (feed_tx, feed_rx) = mpsc::channel(2);
    let (router_tx, router_rx) = mpsc::channel(64);
    let (replay_events_tx, replay_events_rx) = mpsc::channel(64);
    let (mirror_tx, mirror_rx) = mpsc::unbounded_channel();
    let (replays_tx, replays_rx) = mpsc::unbounded_channel();
    let (position_tx, position_rx) = watch::channel(None);
    let ready = Arc::new(AtomicBool::new(false));
    let tracker = TaskTracker::new();

    let mirror = Mirror {
        pool: pools.primary.clone(),
        gateway_id: gateway_id.clone(),
        heartbeat: args.heartbeat(),
    };
    let mirror_task = tokio::spawn(mirror.run(mirror_rx, shutdown.clone()));
    let limits = Limits {
        subscriptions: args.max_subscriptions,
        subscriptions_per_user: args.max_subscriptions_per_user,
        conditions: args.caps.max_filter_conditions,
        in_values: args.caps.max_filter_values,
        replays: args.caps.max_replays_per_connection,
        replay_buffer: 100_000,
        awaits: 64,
        mirror_backlog: Cap::new(
            "subscription changes",
            MIRROR_BACKLOG,
            MIRROR_BACKLOG_PER_USER,
        ),
    };
    let outlets = Outlets {
        mirror: mirror_tx,
        replays: replays_tx,
        position: position_tx,
        metrics: metrics.clone(),
    };
    let router_task = tokio::spawn(
        Router::new(gateway_id.clone(), limits, outlets).run(router_rx, replay_events_rx),
    );
    let stage = Stage {
        pool: pools.visibility.clone(),
        catalog: catalog.clone(),
        plans: plans.clone(),
        metrics: metrics.clone(),
    };
    tokio::spawn(stage.run(control_rx, feed_rx, router_tx));
    let replayer = Replayer {
        per_user: Cap::new("replays", usize::MAX, args.caps.max_replays_per_user),
        turns: Turns::new(
            "replays",
            args.caps.max_replays,
            args.caps.max_replays_waiting,
            args.caps.replay_wait,
        ),
        work: work.clone(),
        plans: plans.clone(),
        catalog: catalog.clone(),
        events: replay_events_tx,
        reads: SharedReads::default(),
        metrics: metrics.clone(),
    };
    tokio::spawn(replayer.run(replays_rx, shutdown.clone()));
    let wake = Arc::new(Notify::new());
    let primary_config =
        tokio_postgres::Config::from_str(&args.database_url).map_err(ServeError::DatabaseUrl)?;
    tokio::spawn(feed::listen::listen(
        primary_config,
        wake.clone(),
        shutdown.clone(),
    ));
    let replica = pools.replica.then(|| Replica {
        primary: pools.primary.clone(),
        metrics: metrics.clone(),
    });
    if let Some(replica) = replica.clone() {
        tokio::spawn(replica.keep_marking(shutdown.clone()));
    }
    let reader = Reader {
        pool: pools.feed.clone(),
        replica,
        catalog: catalog.clone(),
        wake,
        poll_interval: args.poll_interval(),
        next: feed_tx,
        ready: ready.clone(),
    };
    let reader_task = tokio::spawn(reader.run(shutdown.clone()));
    if args.wal_ingest {
        let ingest = Ingest {
            pool: pools.ingest.clone(),
            interval: args.wal_ingest_interval(),
        };
        tokio::spawn(ingest.run(shutdown.clone()));
    }

    let caps = &args.caps;
    let state = Arc::new(AppState {
        verifier,
        roles,
        groups: Groups::default(),
        catalog,
        plans,
        work,
        control: control_tx,
        position: position_rx,
        config: RuntimeConfig {
            send_queue_bytes: args.send_queue_bytes,
            send_timeout: args.send_timeout,
            ping_interval: args.ping_interval(),
            reconnect_window: args.reconnect_window,
            behind_patience: args.behind_patience,
            snapshot_idle_timeout: caps.snapshot_idle_timeout,
            snapshot_max_duration: caps.snapshot_max_duration,
            cors_origins: args.cors_origins.clone(),
            static_dir: args.static_dir.clone(),
            shared_cache: args.shared_cache,
        },
        pages: http::pages::Pages::new(args.page_cache_mb << 20),
        snapshots: http::shared_snapshots::SharedSnapshots::new(
            args.snapshot_share_for,
            args.page_cache_mb << 20,
        ),
        page_links,
        caps: Caps {
            admissions: access::limits::Admissions::new(
                caps.max_admissions_per_second,
                caps.max_admissions_per_user_per_second,
            ),
            connections: Cap::new(
                "connections",
                caps.max_connections,
                caps.max_connections_per_user,
            ),
            snapshots: Cap::new("snapshots", caps.max_snapshots, caps.max_snapshots_per_user),
            shared_snapshots: Cap::new(
                "shared snapshots",
                caps.max_shared_snapshots,
                caps.max_snapshots_per_user,
            ),
            long_polls: Cap::new(
                "long-polls",
                caps.max_long_polls,
                caps.max_long_polls_per_user,
            ),
        },
        metrics,
        gateway_id: gateway_id.clone(),
        ready,
        next_connection: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    });
    let bind = |address| async move {
        tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| ServeError::Listen { address, source })
    };
    let listener = bind(args.listen).await?;
    let admin_listener = bind(args.admin_listen).await?;
    tracing::info!(address = %args.listen, admin = %args.admin_listen, gateway_id, "serving");
    let admin = axum::serve(admin_listener, http::admin_app(state.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    // Without TCP_NODELAY a small frame (a RESYNC, one change) waits, behind one the client
    // has not acknowledged yet, for its delayed ACK: 40 ms on Linux.
    let listener = listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    let public = axum::serve(listener, http::app(state.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let (public, admin) = tokio::join!(public, admin);
    public.and(admin).map_err(ServeError::Server)?;

    // The connections close themselves on `shutdown`; wait for them to unsubscribe.
    tracker.close();
    tracker.wait().await;
    let _ = reader_task.await;
    drop(state);
    let _ = router_task.await;
    let _ = mirror_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Re-reads which allowed roles are safe to act as (a role made superuser or BYPASSRLS since
/// the start is refused from then on), and whether roles changed.
/// How long the gateway acts on roles it could not read again.
const ROLES_MAX_AGE: Duration = Duration::from_secs(10);

async fn refresh_roles(roles: Arc<Roles>, pool: Pool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let refreshed = match pool.get().await {
            Ok(client) => {
                match tokio::time::timeout(ROLES_MAX_AGE / 2, roles.refresh(&client)).await {
                    Ok(read) => read.map_err(|e| ErrorChain(&e).to_string()),
                    Err(_) => Err("no answer in time".to_owned()),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = refreshed {
            tracing::warn!(error = %e, "re-reading the allowed roles failed");
            roles.expire_if_stale(ROLES_MAX_AGE);
        }
    }
}
