//! Test harness for pg_sync's end-to-end tests: a throwaway PostgreSQL cluster with the
//! extension preloaded, small helpers to talk to it, and (in `gateway`) a real gateway
//! process with WebSocket and HTTP clients.
//!
//! The cluster runs as the `postgres` user (PostgreSQL refuses root) on a free port, with its
//! data and socket in a fresh directory (in memory when `/dev/shm` has room), and is stopped
//! and deleted when the [`Cluster`] is dropped, also when the test panics. Its data directory
//! is a copy of a template made once per installed extension (see `template`). The
//! extension's files must be installed first (`make test` runs `cargo pgrx install`).

pub mod gateway;
pub mod nginx;
pub mod workload;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, GenericClient, NoTls, Notification};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The gateway's login role in the tests.
pub const GATEWAY_ROLE: &str = "sync_gateway";
/// The test gateways' authenticator: the login users' own queries run on, which may read
/// nothing of the log.
pub const AUTHENTICATOR_ROLE: &str = "sync_authenticator";
/// The role tokens name (`--default-role` of the test gateways).
pub const APP_ROLE: &str = "app_user";

const ROLES: &str = "
    CREATE ROLE sync_gateway LOGIN NOSUPERUSER NOBYPASSRLS;
    SELECT sync.grant_gateway('sync_gateway');
    CREATE ROLE sync_authenticator LOGIN NOINHERIT;
    SELECT sync.grant_authenticator('sync_authenticator');
    CREATE ROLE app_user NOLOGIN;
    GRANT app_user TO sync_gateway, sync_authenticator;
    ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
        GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO app_user;
    ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
        GRANT USAGE, SELECT ON SEQUENCES TO app_user;";

/// A running PostgreSQL cluster, stopped on drop.
pub struct Cluster {
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    /// Starts a cluster with `wal_level=logical` and pg_sync preloaded, creates the
    /// extension in the `postgres` database, and the roles of README's "Setting up a
    /// database": the gateway's login role [`GATEWAY_ROLE`] (no superuser, no BYPASSRLS) and
    /// the role tokens name, [`APP_ROLE`], which may read and write every table the
    /// superuser `postgres` creates in `public`.
    pub async fn start() -> Cluster {
        Self::start_with(&[]).await
    }

    /// As [`Cluster::start`], with extra `-c name=value` settings.
    pub async fn start_with(settings: &[&str]) -> Cluster {
        let template = template().await;
        let mut cluster = Cluster {
            dir: new_dir("test"),
            port: free_port(),
        };
        run(
            "cp",
            &[
                "-a",
                template.to_str().unwrap(),
                cluster.data().to_str().unwrap(),
            ],
        );
        cluster.start_on_a_free_port(settings);
        cluster
    }

    /// A new cluster made with initdb, with the extension and the roles (what the tests'
    /// clusters copy).
    async fn initdb(dir: PathBuf) -> Cluster {
        let mut cluster = Cluster {
            dir,
            port: free_port(),
        };
        as_postgres(&[
            &format!("{PG_BIN}/initdb"),
            "-D",
            cluster.data().to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        cluster.start_on_a_free_port(&[]);
        cluster.execute("CREATE EXTENSION pg_sync").await;
        cluster.execute(ROLES).await;
        cluster
    }

    fn start_on_a_free_port(&mut self, settings: &[&str]) {
        // Another process may bind the free port between its pick and the server's start (a
        // CI run failed so): a new port, a few times.
        for attempt in 1.. {
            match self.try_pg_ctl_start(settings) {
                Ok(()) => return,
                Err(e) if attempt < 3 && e.contains("Address already in use") => {
                    self.port = free_port();
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn pg_ctl_start(&self, settings: &[&str]) {
        self.try_pg_ctl_start(settings)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the server; Err with pg_ctl's output and the server's log when it did not.
    fn try_pg_ctl_start(&self, settings: &[&str]) -> Result<(), String> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c wal_level=logical -c max_replication_slots=10 \
             -c shared_preload_libraries=pg_sync -c fsync=off",
            self.port,
            self.dir.display()
        );
        if allows_plugin_setting() {
            // This build of PostgreSQL lists the output plugins it allows (wal2json for WAL
            // capture is not among them by default).
            options.push_str(" -c output_plugin_libraries=pgoutput,test_decoding,wal2json");
        }
        for s in settings {
            options.push_str(&format!(" -c {s}"));
        }
        let log = self.dir.join("log");
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl"), "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-o", &options, "start"])
            .output()
            .map_err(|e| format!("runuser: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "pg_ctl start failed:\n{}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        ))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for a database of this cluster, as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        self.url_as("postgres", database)
    }

    /// A connection string for a database of this cluster, as `user`.
    pub fn url_as(&self, user: &str, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={database}",
            self.port
        )
    }

    /// A new connection to the `postgres` database.
    pub async fn connect(&self) -> Client {
        self.connect_to("postgres").await
    }

    pub async fn connect_to(&self, database: &str) -> Client {
        self.connect_as("postgres", database).await
    }

    /// A new connection as `user` (a LOGIN role; the cluster trusts local connections).
    pub async fn connect_as(&self, user: &str, database: &str) -> Client {
        let (client, connection) = tokio_postgres::connect(&self.url_as(user, database), NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        client
    }

    /// A connection whose notifications arrive on the returned channel.
    pub async fn connect_listening(&self) -> (Client, mpsc::UnboundedReceiver<Notification>) {
        let (client, mut connection) = tokio_postgres::connect(&self.url("postgres"), NoTls)
            .await
            .expect("connect");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // tokio-postgres hands out notifications only to whoever polls the connection.
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n);
                }
            }
        });
        (client, rx)
    }

    /// Runs SQL on a fresh connection, panicking on error.
    /// `sync.current_cursor()` of a new connection: where the log stands now.
    pub async fn current_cursor(&self) -> String {
        self.connect()
            .await
            .query_one("SELECT sync.current_cursor()", &[])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn execute(&self, sql: &str) {
        self.connect()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", error_text(&e)));
    }

    /// A streaming hot standby of this cluster (`pg_basebackup -R -X stream`), started on a
    /// port of its own with the same settings (pg_sync preloaded too), stopped on drop. The
    /// backup asks for an immediate checkpoint (`-c fast`): the default, spread one took
    /// 20 s of each standby test's 24.
    pub async fn standby(&self) -> Cluster {
        let standby = Cluster {
            dir: new_dir("standby"),
            port: free_port(),
        };
        as_postgres(&[
            &format!("{PG_BIN}/pg_basebackup"),
            "-D",
            standby.data().to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "-d",
            &format!("host=127.0.0.1 port={} user=postgres", self.port),
        ]);
        standby.pg_ctl_start(&["hot_standby=on", "hot_standby_feedback=on"]);
        standby
    }

    /// Waits until this standby has replayed everything `primary` wrote so far.
    pub async fn caught_up_with(&self, primary: &Cluster) {
        let lsn: String = primary
            .connect()
            .await
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let replayed = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn";
        self.wait_until(replayed, &[&lsn], "the standby did not catch up")
            .await;
    }

    /// Waits until `sql`, one boolean, answers true here; panics with `what` after PATIENCE.
    pub async fn wait_until(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &str,
    ) {
        let client = self.connect().await;
        let deadline = tokio::time::Instant::now() + gateway::PATIENCE;
        while !client
            .query_one(sql, params)
            .await
            .unwrap()
            .get::<_, bool>(0)
        {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Stops the server the way a crash would, then starts it again.
    pub fn restart_immediate(&self) {
        self.pg_ctl_stop("immediate");
        self.pg_ctl_start(&[]);
    }

    /// Waits until the `pg_sync` replication slot exists (a gateway makes it on its first
    /// ingest); panics after PATIENCE.
    pub async fn wait_for_slot(&self) {
        let exists = "SELECT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = 'pg_sync')";
        self.wait_until(exists, &[], "no pg_sync slot").await;
    }

    /// Stops the server in immediate mode and leaves it down (see [`Cluster::start_again`]).
    pub fn stop_immediate(&self) {
        self.pg_ctl_stop("immediate");
    }

    /// Starts a stopped server again, on the same port.
    pub fn start_again(&self) {
        self.pg_ctl_start(&[]);
    }

    fn pg_ctl_stop(&self, mode: &str) {
        as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            self.data().to_str().unwrap(),
            "-m",
            mode,
            "-w",
            "stop",
        ]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl")])
            .args([
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the test clusters live: `PG_SYNC_TEST_DIR`, else `/dev/shm` when it has room, else
/// the system's temporary directory. In memory, initdb took 0.34 s where it took 0.94 s on
/// this machine's disk, and copying a cluster 0.04 s where it took 0.6 s.
fn clusters_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PG_SYNC_TEST_DIR") {
            return dir.into();
        }
        let shm = PathBuf::from("/dev/shm");
        let free_mib = Command::new("df")
            .args(["--output=avail", "-BM"])
            .arg(&shm)
            .output()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.lines()
                    .nth(1)?
                    .trim()
                    .trim_end_matches('M')
                    .parse::<u64>()
                    .ok()
            });
        if free_mib.is_some_and(|mib| mib >= 4096) {
            shm
        } else {
            std::env::temp_dir()
        }
    })
    .clone()
}

/// A new empty directory for a cluster, owned by the postgres user.
fn new_dir(kind: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = clusters_dir().join(format!("pg_sync_{kind}_{}_{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    run("chown", &["postgres:postgres", dir.to_str().unwrap()]);
    dir
}

/// The data directory every test cluster starts as a copy of: made by initdb, with the
/// extension and the roles, once for the installed extension (its files' sizes and times name
/// it) and kept beside the clusters for the next test binaries; a new one replaces the
/// others. A copy costs a tenth of an initdb, which was most of a short test's time.
async fn template() -> &'static std::path::Path {
    static TEMPLATE: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            let base = clusters_dir();
            let name = format!("pg_sync_template_{:016x}", installed_extension());
            let kept = base.join(&name);
            if !kept.join("data/PG_VERSION").exists() {
                let _ = std::fs::remove_dir_all(&kept);
                sweep_the_dead(&base);
                let made = Cluster::initdb(new_dir("new_template")).await;
                made.pg_ctl_stop("fast");
                for old in std::fs::read_dir(&base).unwrap().flatten() {
                    let old_name = old.file_name().to_string_lossy().into_owned();
                    if old_name.starts_with("pg_sync_template_") && old_name != name {
                        let _ = std::fs::remove_dir_all(old.path());
                    }
                }
                // Another test binary may have made it meanwhile: then this one goes (on drop).
                let _ = std::fs::rename(&made.dir, &kept);
            }
            kept.join("data")
        })
        .await
}

/// Stops and deletes the clusters of test processes that are gone (killed before their
/// clusters' drop ran): in /dev/shm they hold memory.
fn sweep_the_dead(base: &std::path::Path) {
    for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = ["test", "standby", "new_template"]
            .iter()
            .find_map(|kind| name.strip_prefix(&format!("pg_sync_{kind}_")))
        else {
            continue;
        };
        let pid = rest.split('_').next().unwrap_or_default();
        if pid.is_empty() || std::path::Path::new("/proc").join(pid).exists() {
            continue;
        }
        let dead = Cluster {
            dir: entry.path(),
            port: 0,
        };
        drop(dead); // stops its server, if any, and deletes it
    }
}

/// A digest of the installed extension's files, and of this file (which makes the
/// template): a change of either makes a new template.
fn installed_extension() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut files: Vec<PathBuf> = std::fs::read_dir("/usr/share/postgresql/15/extension")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pg_sync")
        })
        .collect();
    files.push(format!("{PG_BIN}/../lib/pg_sync.so").into());
    files.sort();
    let mut hasher = std::hash::DefaultHasher::new();
    include_str!("lib.rs").hash(&mut hasher);
    for file in files {
        let meta = std::fs::metadata(&file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        (file, meta.len(), meta.modified().unwrap()).hash(&mut hasher);
    }
    hasher.finish()
}

/// Whether the server has the `output_plugin_libraries` setting (Debian's builds do).
fn allows_plugin_setting() -> bool {
    static KNOWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KNOWN.get_or_init(|| {
        let out = Command::new(format!("{PG_BIN}/postgres"))
            .arg("--describe-config")
            .output();
        out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("output_plugin_libraries"))
    })
}

/// A port that can be bound now, below the kernel's range of ephemeral ports (32768 up on
/// Linux). A port from that range, free when picked, can become the local end of some
/// outgoing connection while a test has its server down, and the server started again on it
/// fails with "Address already in use" (a browser scenario's gateway restart did, on CI).
/// Ports are handed out in turn from a start that differs per process, each checked free.
pub fn free_port() -> u16 {
    const LOW: usize = 20_000;
    const SPAN: usize = 12_000;
    static NEXT: std::sync::OnceLock<AtomicUsize> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize);
        AtomicUsize::new(std::process::id() as usize * 7919 + nanos)
    });
    loop {
        let port = (LOW + next.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn as_postgres(args: &[&str]) {
    let mut all = vec!["-u", "postgres", "--"];
    all.extend_from_slice(args);
    run("runuser", &all);
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One change as `sync.changes_since` returns it, with the columns the tests look at.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub id: i64,
    pub op: String,
    pub entity_code: String,
    pub entity_id: Option<String>,
    pub data: Option<String>,
    pub changed_columns: Option<Vec<String>>,
    pub client_id: Option<String>,
    pub txid: String,
    pub cursor: String,
}

/// Reads one page after `cursor`.
pub async fn changes_since(
    client: &impl GenericClient,
    cursor: Option<&str>,
    max_rows: i32,
) -> Result<Vec<Change>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, op, entity_code, entity_id, data::text, changed_columns, client_id, \
                    txid::text, cursor FROM sync.changes_since($1, $2)",
            &[&cursor, &max_rows],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Change {
            id: r.get(0),
            op: r.get(1),
            entity_code: r.get(2),
            entity_id: r.get(3),
            data: r.get(4),
            changed_columns: r.get(5),
            client_id: r.get(6),
            txid: r.get(7),
            cursor: r.get(8),
        })
        .collect())
}

/// Reads every change after `cursor` in pages of `page`, returning them and the cursor to
/// continue from (the last change's, or the reading transaction's snapshot when the log
/// ends, so that an idle reader's cursor moves on too).
pub async fn drain(
    client: &mut Client,
    cursor: Option<String>,
    page: i32,
) -> (Vec<Change>, String) {
    let mut all = Vec::new();
    let mut cursor = cursor;
    loop {
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .unwrap();
        let rows = changes_since(&tx, cursor.as_deref(), page).await.unwrap();
        let done = rows.len() < page as usize;
        if done {
            // Everything the snapshot sees has been read: its cursor is where to go on,
            // unless the cursor read from is ahead of it (a standby behind the cursor's
            // primary).
            let last = rows.last().map(|c| c.cursor.clone()).or(cursor);
            let now: String = tx
                .query_one(
                    "SELECT CASE WHEN $1::text IS NULL OR sync.cursor_reached(c, $1)
                                 THEN c ELSE $1 END
                       FROM sync.current_cursor() c",
                    &[&last],
                )
                .await
                .unwrap()
                .get(0);
            tx.commit().await.unwrap();
            all.extend(rows);
            return (all, now);
        }
        tx.commit().await.unwrap();
        cursor = rows.last().map(|c| c.cursor.clone());
        all.extend(rows);
    }
}

/// The first column of every row `sql` returns.
pub async fn column<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    client: &Client,
    sql: &str,
) -> Vec<T> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", error_text(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A database error's message with its SQLSTATE (tokio-postgres's own text is "db error").
pub fn error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// The SQLSTATE of a database error, for asserting on error classes.
pub fn sqlstate(error: &tokio_postgres::Error) -> String {
    error
        .code()
        .map(|c| c.code().to_owned())
        .unwrap_or_default()
}

/// A cursor ahead of the database: `cursor` (at a batch boundary) with every number of its
/// mark moved on by `by`.
pub fn future_cursor(cursor: &str, by: u64) -> String {
    let (head, mark) = cursor.rsplit_once('.').unwrap();
    let moved: Vec<String> = mark
        .split('_')
        .map(|n| {
            n.parse::<u64>()
                .map_or(n.to_owned(), |n| (n + by).to_string())
        })
        .collect();
    format!("{head}.{}", moved.join("_"))
}

/// A random seed, or `PG_SYNC_SEED`'s, printed so a failing run can be repeated.
pub fn seed() -> u64 {
    let seed = std::env::var("PG_SYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    eprintln!("seed {seed} (rerun with PG_SYNC_SEED={seed})");
    seed
}

/// A small deterministic generator (xorshift), so a failing run can be repeated from its seed.
pub struct Rng(pub u64);

impl Rng {
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
