//! The gateway's database connections: a pool per concern (SPEC 2.4), each on the server its
//! work needs (SPEC 2.7). Without `--read-url` every pool is on the primary. With it, what
//! only reads goes to the hot standby (the log, the catalog, policies, replays,
//! `/v1/changes`, snapshots, roles), and what writes or listens stays on the primary (the
//! subscription mirror, heartbeats, access notes, ticks, WAL ingest, users' writes). So when
//! the standby is promoted (or the primary is lost) the reads go on.

use crate::config::ServeArgs;
use crate::ServeError;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::{Config, NoTls};

pub struct Pools {
    /// The feed's writes on the primary: the subscription mirror, heartbeats, access notes,
    /// ticks. (The feed's pool itself without --read-url.)
    pub primary: Pool,
    /// The reader's log, the catalog and the roles.
    pub feed: Pool,
    /// Judging row-level security of the live stream (table owners' policies run here).
    pub visibility: Pool,
    /// Clients' work as the gateway: replays, long-polls, admissions, cursor checks.
    pub clients: Pool,
    /// Clients' work as the gateway that must reach the primary: whether it has reached a
    /// client's cursor, ingesting WAL for a snapshot. (`clients` without --read-url.)
    pub clients_on_primary: Pool,
    /// Users' own queries that read (snapshots), on the authenticator's login.
    pub user_reads: Pool,
    /// Users' writes, on the authenticator's login, on the primary.
    pub user_writes: Pool,
    /// The WAL ingest loop.
    pub ingest: Pool,
    /// Whether reads go to a standby.
    pub replica: bool,
}

impl Pools {
    pub fn new(args: &ServeArgs) -> Result<Pools, ServeError> {
        let p = &args.pools;
        let parse = |url: &str| Config::from_str(url).map_err(ServeError::DatabaseUrl);
        let primary = parse(&args.database_url)?;
        let read = match &args.read_url {
            Some(url) => parse(url)?,
            None => primary.clone(),
        };
        // Users' queries: on the authenticator, else (insecure, see Roles::check) on the
        // gateway's login; on a standby, the authenticator's login at the standby's address.
        let (user_writes, user_reads) = match &args.authenticator_url {
            Some(url) => {
                let authenticator = parse(url)?;
                let at_read = match args.read_url {
                    Some(_) => login_of(&read, &authenticator),
                    None => authenticator.clone(),
                };
                (authenticator, at_read)
            }
            None => (primary.clone(), read.clone()),
        };
        // Both run table owners' policies (sync.visible: the live stream; replays and
        // long-polls): no statement there outlives --policy-timeout. No user's statement
        // outlives the longest snapshot (a write waiting on a lock, a table owner's slow
        // trigger), so none holds a connection for good.
        let policies = timed(&read, p.policy_timeout);
        let users = args.caps.snapshot_max_duration;
        let feed = pool(read.clone(), p.feed_pool_size, p.pool_wait)?;
        let clients = pool(policies.clone(), p.client_pool_size, p.pool_wait)?;
        let user_writes = pool(timed(&user_writes, users), p.client_pool_size, p.pool_wait)?;
        let replica = args.read_url.is_some();
        Ok(Pools {
            primary: match replica {
                true => pool(primary.clone(), p.feed_pool_size, p.pool_wait)?,
                false => feed.clone(),
            },
            feed,
            visibility: pool(policies, p.visibility_pool_size, p.pool_wait)?,
            clients_on_primary: match replica {
                true => pool(
                    primary.clone(),
                    (p.client_pool_size / 4).max(2),
                    p.pool_wait,
                )?,
                false => clients.clone(),
            },
            clients,
            user_reads: match replica {
                true => pool(timed(&user_reads, users), p.client_pool_size, p.pool_wait)?,
                false => user_writes.clone(),
            },
            user_writes,
            ingest: pool(primary, 1, p.pool_wait)?,
            replica,
        })
    }

    /// Refuses a --read-url that is not a copy of --database-url's database (its log has
    /// another generation): cursors of one would be expired or wrong on the other.
    pub async fn check_replica(&self) -> Result<(), ServeError> {
        const GENERATION: &str = "SELECT generation FROM sync.state";
        let primary: String = self
            .primary
            .get()
            .await?
            .query_one(GENERATION, &[])
            .await?
            .get(0);
        let read: String = self
            .feed
            .get()
            .await?
            .query_one(GENERATION, &[])
            .await?
            .get(0);
        if primary != read {
            return Err(ServeError::NotAReplica);
        }
        Ok(())
    }
}

/// `server`'s address and database with `login`'s user and password.
fn login_of(server: &Config, login: &Config) -> Config {
    let mut config = server.clone();
    if let Some(user) = login.get_user() {
        config.user(user);
    }
    if let Some(password) = login.get_password() {
        config.password(password);
    }
    config
}

/// `config` with a statement timeout.
fn timed(config: &Config, timeout: Duration) -> Config {
    let mut config = config.clone();
    config.options(format!("-c statement_timeout={}", timeout.as_millis()));
    config
}

/// A pool of `size` connections whose waits end after `wait`.
fn pool(
    config: Config,
    size: usize,
    wait: Duration,
) -> Result<Pool, deadpool_postgres::BuildError> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .timeouts(Timeouts {
            wait: Some(wait),
            create: Some(wait),
            recycle: Some(wait),
        })
        .runtime(Runtime::Tokio1)
        .build()
}
