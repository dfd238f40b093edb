//! The command line: `sync-gateway serve` and `sync-gateway token`. Every flag of `serve` is
//! also an environment variable (SPEC 2.1).

use clap::{ArgAction, Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "sync-gateway",
    version,
    about = "pg_sync's gateway: pushes PostgreSQL changes to WebSocket clients"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve WebSocket clients from the database's change log.
    Serve(Box<ServeArgs>),
    /// Print a development token signed with the configured HS256 secret.
    Token(TokenArgs),
}

#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// PostgreSQL connection string of the database with the pg_sync extension.
    #[arg(long, env = "SYNC_DATABASE_URL")]
    pub database_url: String,

    /// Connection string of the authenticator: the login that users' own queries (snapshots,
    /// writes) run on, under their role. It must be able to read nothing of the log, since a
    /// table owner's code in those queries can RESET ROLE to it (README: Setting up a
    /// database). Without it they run on --database-url's login, and a warning is logged.
    #[arg(long, env = "SYNC_AUTHENTICATOR_URL")]
    pub authenticator_url: Option<String>,

    /// A streaming hot standby of --database-url to read from (SPEC 2.7): the log, the catalog,
    /// policies, replays, `/v1/changes` and snapshots are read there; writes, the subscription
    /// mirror, heartbeats, access notes, ticks and WAL ingest go to --database-url. The
    /// gateway's login is this URL's; users' own queries run on the authenticator's login
    /// and password (--authenticator-url) at this URL's host, port and database.
    #[arg(long, env = "SYNC_READ_URL")]
    pub read_url: Option<String>,

    /// Address to listen on for WebSocket and HTTP clients.
    #[arg(long, env = "SYNC_LISTEN", default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,

    /// Address for operators: `/metrics` and `/v1/status` are served here, not on --listen.
    #[arg(long, env = "SYNC_ADMIN_LISTEN", default_value = "127.0.0.1:8788")]
    pub admin_listen: SocketAddr,

    #[command(flatten)]
    pub auth: AuthArgs,

    /// Role the gateway acts as for a token without a `role` claim. Without it (and
    /// without a claim), every request that reads or writes a table is refused.
    #[arg(long, env = "SYNC_DEFAULT_ROLE")]
    pub default_role: Option<String>,

    /// Roles a token's `role` claim may name, comma-separated (default: --default-role
    /// alone). `none`, the gateway's login role, superusers and BYPASSRLS roles are never
    /// allowed: the gateway refuses to start when the list holds one.
    #[arg(long, env = "SYNC_ALLOWED_ROLES", value_delimiter = ',')]
    pub allowed_roles: Vec<String>,

    /// Run even though the login role is a superuser or has BYPASSRLS, which bypasses
    /// row-level security for every user. For development only: a loud warning is logged.
    #[arg(long, env = "SYNC_INSECURE_SUPERUSER", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub insecure_superuser: bool,

    /// Drive sync.ingest_wal for WAL-captured tables while holding the ingest lock (one
    /// gateway at a time does).
    #[arg(long, env = "SYNC_WAL_INGEST", default_value_t = true, action = ArgAction::Set)]
    pub wal_ingest: bool,

    /// How often the ingesting gateway looks for new WAL when the slot was drained (ms).
    #[arg(long, env = "SYNC_WAL_INGEST_INTERVAL_MS", default_value_t = 200)]
    pub wal_ingest_interval_ms: u64,

    /// Read the log at least this often when no NOTIFY arrives (milliseconds).
    #[arg(long, env = "SYNC_POLL_INTERVAL_MS", default_value_t = 1000)]
    pub poll_interval_ms: u64,

    /// Subscriptions one connection may hold.
    #[arg(long, env = "SYNC_MAX_SUBSCRIPTIONS", default_value_t = 10_000)]
    pub max_subscriptions: usize,

    /// Subscriptions one user may hold over all its connections: routing a change walks
    /// them on the one router task that serves everyone.
    #[arg(
        long,
        env = "SYNC_MAX_SUBSCRIPTIONS_PER_USER",
        default_value_t = 20_000
    )]
    pub max_subscriptions_per_user: usize,

    /// Bytes queued for one connection before it counts as too slow and is closed (4008);
    /// it resumes from its cursor.
    #[arg(long, env = "SYNC_SEND_QUEUE_BYTES", default_value_t = 4 << 20)]
    pub send_queue_bytes: usize,

    /// Seconds between server pings; a connection that has not answered the previous ping by
    /// the next one is closed.
    #[arg(long, env = "SYNC_PING_INTERVAL_SECS", default_value_t = 30)]
    pub ping_interval_secs: u64,

    /// How long one message to a client may take to be sent; a client that does not read it
    /// in time is closed (4008) and resumes from its cursor.
    #[arg(long, env = "SYNC_SEND_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub send_timeout: Duration,

    /// On SIGTERM, each client is told to reconnect after a random delay within this window
    /// (RECONNECT `afterMs`), so that they do not all come back at once.
    #[arg(long, env = "SYNC_RECONNECT_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    pub reconnect_window: Duration,

    /// How long a client whose cursor the database has reached but this gateway's live
    /// stream has not (a standby still replaying) waits before it is told to come back
    /// (RECONNECT `behind` on the socket, 503 with `Retry-After` over HTTP).
    #[arg(long, env = "SYNC_BEHIND_PATIENCE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub behind_patience: Duration,

    /// The HTTP cache in front checks every request's audience (as `docs/nginx.conf` does):
    /// pages an audience shares then say how long that cache may keep them
    /// (`X-Accel-Expires`). Off by default: nginx honours that header even where nothing
    /// checks the audience, and would share pages with anyone who has their URL.
    #[arg(long, env = "SYNC_SHARED_CACHE")]
    pub shared_cache: bool,

    /// Signs the links between `/v1/changes` pages, so that a cache in front keeps a closed
    /// page only at a position a gateway linked (`http::links`). Every gateway behind one
    /// cache needs the same. Default: derived from `--jwt-secret`; with a public key and no
    /// secret here, each process signs its own links, and a page linked by another gateway
    /// is served but not kept in front.
    #[arg(long, env = "SYNC_PAGE_LINK_SECRET", hide_env_values = true)]
    pub page_link_secret: Option<String>,

    /// Megabytes of `/v1/changes` pages an audience shares, kept in memory (`http::pages`),
    /// and as many of the snapshots it shares (`http::shared_snapshots`).
    #[arg(long, env = "SYNC_PAGE_CACHE_MB", default_value_t = 64)]
    pub page_cache_mb: u64,

    /// How long a whole entity's snapshot is served to others of its audience after its
    /// read, for cold starts of many clients at once (`http::shared_snapshots`). Such a
    /// snapshot may not show a write committed meanwhile, not even the reader's own: it
    /// arrives after it, from the snapshot's cursor. Off (0) by default: a snapshot is read
    /// for each request.
    #[arg(long, env = "SYNC_SNAPSHOT_SHARE_FOR", default_value = "0s", value_parser = humantime::parse_duration)]
    pub snapshot_share_for: Duration,

    /// Serve the files of this folder at `/` (the demo app of `make run`). Off by default.
    #[arg(long, env = "SYNC_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,

    /// Browser origins allowed to call `/v1/*` (CORS), comma-separated. None by default.
    #[arg(long, env = "SYNC_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    #[command(flatten)]
    pub pools: PoolArgs,

    #[command(flatten)]
    pub caps: CapArgs,

    /// Name of this gateway in sync.subscription and sync.gateway (default: a random id).
    #[arg(long, env = "SYNC_GATEWAY_ID")]
    pub gateway_id: Option<String>,

    /// Seconds between heartbeats in sync.gateway; a gateway silent for six of them is dead
    /// and its subscriptions are removed by the others.
    #[arg(long, env = "SYNC_HEARTBEAT_SECS", default_value_t = 5)]
    pub heartbeat_secs: u64,
}

impl ServeArgs {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(10))
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs.max(1))
    }

    pub fn wal_ingest_interval(&self) -> Duration {
        Duration::from_millis(self.wal_ingest_interval_ms.max(10))
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs.max(1))
    }

    /// The roles tokens may name: --allowed-roles, else --default-role alone.
    pub fn allowed_roles(&self) -> Vec<String> {
        if self.allowed_roles.is_empty() {
            self.default_role.iter().cloned().collect()
        } else {
            self.allowed_roles.clone()
        }
    }
}

/// Database connections, per concern (SPEC 2.4): client-driven work never takes the feed's.
#[derive(Clone, Debug, Args)]
pub struct PoolArgs {
    /// Connections for the feed: the log reader, the catalog, roles, the subscription mirror.
    #[arg(long, env = "SYNC_FEED_POOL_SIZE", default_value_t = 4)]
    pub feed_pool_size: usize,

    /// Connections for judging row-level security of the live stream in the database (for
    /// policies that do not compile).
    #[arg(long, env = "SYNC_VISIBILITY_POOL_SIZE", default_value_t = 2)]
    pub visibility_pool_size: usize,

    /// Connections for clients' work: snapshots, replays, long-polls, writes, admissions.
    #[arg(long, env = "SYNC_CLIENT_POOL_SIZE", default_value_t = 16)]
    pub client_pool_size: usize,

    /// How long work waits for a pooled connection before it is refused (503, Retry-After).
    #[arg(long, env = "SYNC_POOL_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub pool_wait: Duration,

    /// Longest a statement of the visibility pool may run (a slow policy fails its group).
    #[arg(long, env = "SYNC_POLICY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub policy_timeout: Duration,
}

/// Caps on what clients may hold at once (SPEC 2.4). Over one, a request is refused at once
/// (but for `--max-replays`, under which replays wait their turn, boundedly).
#[derive(Clone, Debug, Args)]
pub struct CapArgs {
    /// WebSocket connections in total.
    #[arg(long, env = "SYNC_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,

    /// New WebSocket connections admitted per second, in total, in bursts of up to a second's
    /// worth; beyond, 503 with `Retry-After`. What spreads a storm of reconnections (a
    /// gateway restarted, a network back) over time instead of over the database.
    #[arg(long, env = "SYNC_MAX_ADMISSIONS_PER_SECOND", default_value = "2000")]
    pub max_admissions_per_second: std::num::NonZeroU32,

    /// New WebSocket connections of one user (`sub`) admitted per second, in bursts of up
    /// to a second's worth; beyond, 503 with `Retry-After`. Checked before the total, so
    /// that one user cannot spend everyone's admissions.
    #[arg(
        long,
        env = "SYNC_MAX_ADMISSIONS_PER_USER_PER_SECOND",
        default_value = "10"
    )]
    pub max_admissions_per_user_per_second: std::num::NonZeroU32,

    /// WebSocket connections of one user (`sub`).
    #[arg(long, env = "SYNC_MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    pub max_connections_per_user: usize,

    /// Database queries of one user in flight at once (snapshots, replay pages, reads,
    /// writes).
    #[arg(long, env = "SYNC_MAX_QUERIES_PER_USER", default_value_t = 4)]
    pub max_queries_per_user: usize,

    /// Snapshots streaming at once, in total.
    #[arg(long, env = "SYNC_MAX_SNAPSHOTS", default_value_t = 8)]
    pub max_snapshots: usize,

    /// Snapshots of one user streaming at once.
    #[arg(long, env = "SYNC_MAX_SNAPSHOTS_PER_USER", default_value_t = 2)]
    pub max_snapshots_per_user: usize,

    /// Snapshots sent from memory at once (`--snapshot-share-for`), in total; per user,
    /// `--max-snapshots-per-user`. They hold no database connection (and were compressed once,
    /// when kept), but each holds a socket and a task while its reader takes it.
    #[arg(long, env = "SYNC_MAX_SHARED_SNAPSHOTS", default_value_t = 1000)]
    pub max_shared_snapshots: usize,

    /// A snapshot's client must take each line within this, or the snapshot ends.
    #[arg(long, env = "SYNC_SNAPSHOT_IDLE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub snapshot_idle_timeout: Duration,

    /// A snapshot ends after this, whatever its size.
    #[arg(long, env = "SYNC_SNAPSHOT_MAX_DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub snapshot_max_duration: Duration,

    /// `/v1/changes` requests in progress (waiting ones included), in total.
    #[arg(long, env = "SYNC_MAX_LONG_POLLS", default_value_t = 10_000)]
    pub max_long_polls: usize,

    /// `/v1/changes` requests of one user in progress.
    #[arg(long, env = "SYNC_MAX_LONG_POLLS_PER_USER", default_value_t = 8)]
    pub max_long_polls_per_user: usize,

    /// Replays one connection runs at once (SUBSCRIBE with `since`).
    #[arg(long, env = "SYNC_MAX_REPLAYS_PER_CONNECTION", default_value_t = 4)]
    pub max_replays_per_connection: usize,

    /// Replays running at once, in total: each reads the log a page at a time and holds up
    /// to two pages in memory. Over it, a replay waits its turn (first come, first served)
    /// up to `--replay-wait`.
    #[arg(long, env = "SYNC_MAX_REPLAYS", default_value_t = 64)]
    pub max_replays: usize,

    /// Replays waiting for their turn under `--max-replays`, in total. Over it, a SUBSCRIBE
    /// with `since` ends with ERROR `internal` at once. A waiting replay holds back its
    /// subscription's live changes (an entry each, up to 100,000, then the connection is
    /// closed as too slow).
    #[arg(long, env = "SYNC_MAX_REPLAYS_WAITING", default_value_t = 10_000)]
    pub max_replays_waiting: usize,

    /// How long a replay waits for its turn under `--max-replays` before its SUBSCRIBE ends
    /// with ERROR `internal` (retry later).
    #[arg(long, env = "SYNC_REPLAY_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub replay_wait: Duration,

    /// Replays of one user at once, waiting or running (all its connections). Over it, a
    /// SUBSCRIBE with `since` ends with ERROR `internal` at once.
    #[arg(long, env = "SYNC_MAX_REPLAYS_PER_USER", default_value_t = 8)]
    pub max_replays_per_user: usize,

    /// Filter conditions over all subscriptions of one user (all its connections).
    #[arg(long, env = "SYNC_MAX_FILTER_CONDITIONS", default_value_t = 256)]
    pub max_filter_conditions: usize,

    /// Values listed by `in` conditions over all subscriptions of one user.
    #[arg(long, env = "SYNC_MAX_FILTER_VALUES", default_value_t = 10_000)]
    pub max_filter_values: usize,
}

/// How tokens are checked. Exactly one of the two keys; its algorithm is the only one accepted.
#[derive(Clone, Debug, Args)]
pub struct AuthArgs {
    /// HS256 secret.
    #[arg(long, env = "SYNC_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Path to a PEM public key (RS256 for RSA, ES256 for P-256).
    #[arg(long, env = "SYNC_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Required `aud` claim (not checked when unset).
    #[arg(long, env = "SYNC_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim (not checked when unset).
    #[arg(long, env = "SYNC_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// HS256 secret to sign with.
    #[arg(long, env = "SYNC_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,

    /// The user id (`sub`).
    #[arg(long)]
    pub sub: String,

    /// PostgreSQL role for row visibility (`role`).
    #[arg(long)]
    pub role: Option<String>,

    /// Lifetime, e.g. 30s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// Audience (`aud`).
    #[arg(long, env = "SYNC_JWT_AUDIENCE")]
    pub aud: Option<String>,

    /// More claims, as key=value (repeatable).
    #[arg(long = "claim", value_parser = parse_claim)]
    pub claims: Vec<(String, String)>,
}

fn parse_claim(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("a claim is key=value, not {text:?}"))?;
    Ok((key.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
