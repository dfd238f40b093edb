//! Bounds on the work clients cause (SPEC 2.4): so that nothing one client does can delay
//! another, client-driven work never touches the feed's connections (it has a pool of its
//! own, `clients`), takes a database connection only for the time of a query, and is capped
//! in total and per user. A request over a cap is refused at once (503 with `Retry-After`,
//! or ERROR `internal` on the socket), never queued without end; a wait for a pooled
//! connection ends at the pool's wait timeout the same way, and so does a wait for a turn
//! (`Turns`, for replays).

use deadpool_postgres::{Object, Pool, PoolError};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why work was refused: the client should come back after `retry_after`.
#[derive(Debug, thiserror::Error)]
pub enum Busy {
    #[error("too many {what} in progress for this user; retry later")]
    UserCap { what: &'static str },
    #[error("too many {what} in progress; retry later")]
    GlobalCap { what: &'static str },
    #[error("no database connection became free in time; retry later")]
    Pool(#[from] PoolError),
    #[error("the database did not answer ({0}); retry later")]
    Database(String),
}

impl Busy {
    /// When to come back.
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// A cap of things in progress, in total and per user, taken without waiting.
#[derive(Debug)]
pub struct Cap {
    what: &'static str,
    total: usize,
    per_user: usize,
    counts: Mutex<(usize, HashMap<String, usize>)>,
}

/// How fast new connections are admitted: per user first, then in total, so that a user
/// who floods spends their own bucket and not everyone's.
pub struct Admissions {
    per_user: governor::DefaultKeyedRateLimiter<String>,
    total: governor::DefaultDirectRateLimiter,
    /// When the per-user buckets were last swept.
    swept: Mutex<Instant>,
}

/// Users remembered by the per-user buckets before those full again are forgotten.
const ADMITTED_USERS: usize = 10_000;

/// How often at most the per-user buckets are swept. A sweep visits every user: done at each
/// admission while more than `ADMITTED_USERS` were admitted within a bucket's refill time (a
/// reconnect storm), admitting 100,000 users took 4.4 s of one core under the lock.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Admissions {
    pub fn new(total: NonZeroU32, per_user: NonZeroU32) -> Admissions {
        Admissions {
            per_user: governor::RateLimiter::keyed(governor::Quota::per_second(per_user)),
            total: governor::RateLimiter::direct(governor::Quota::per_second(total)),
            swept: Mutex::new(Instant::now()),
        }
    }

    /// Whether `user` may open a connection now; else how long until it may come back.
    pub fn admit(&self, user: &str) -> Result<(), Duration> {
        let now = || governor::clock::Clock::now(&governor::clock::DefaultClock::default());
        if self.per_user.len() > ADMITTED_USERS && sweep_due(&self.swept, Instant::now()) {
            self.per_user.retain_recent();
        }
        self.per_user
            .check_key(&user.to_owned())
            .map_err(|refused| refused.wait_time_from(now()))?;
        self.total
            .check()
            .map_err(|refused| refused.wait_time_from(now()))
    }
}

/// Whether a sweep last done at `swept` is due again at `now`; if so, it counts as done now.
fn sweep_due(swept: &Mutex<Instant>, now: Instant) -> bool {
    let mut swept = swept.lock().expect("sweep lock");
    if now.duration_since(*swept) < SWEEP_EVERY {
        return false;
    }
    *swept = now;
    true
}

/// Places in total given in turn: over the cap, work waits for a place, first come first
/// served, up to `patience`, then is refused; with `waiting` already waiting, it is refused
/// at once. For work whose clients all come at once and would ask again at once: the
/// replays of a reconnect storm. Refused at once, 10,000 clients resubscribing every 200 ms
/// were so many refusals (and cursor checks) that in 90 s fewer than 4,000 replays ran. The
/// per-user bound stays a `Cap`, taken first.
pub struct Turns {
    what: &'static str,
    places: Arc<Semaphore>,
    /// Places and room to wait for one, together.
    queue: Arc<Semaphore>,
    patience: Duration,
}

/// A place given in turn, and its place in the queue; both given back on drop.
pub struct Turn {
    _queued: OwnedSemaphorePermit,
    _place: OwnedSemaphorePermit,
}

impl Turns {
    pub fn new(what: &'static str, total: usize, waiting: usize, patience: Duration) -> Turns {
        let total = total.min(Semaphore::MAX_PERMITS);
        Turns {
            what,
            places: Arc::new(Semaphore::new(total)),
            queue: Arc::new(Semaphore::new(
                total.saturating_add(waiting).min(Semaphore::MAX_PERMITS),
            )),
            patience,
        }
    }

    /// A place, once it is this caller's turn; Busy when too many wait already, or when the
    /// turn did not come in time.
    pub async fn wait(&self) -> Result<Turn, Busy> {
        let busy = || Busy::GlobalCap { what: self.what };
        let queued = self.queue.clone().try_acquire_owned().map_err(|_| busy())?;
        match tokio::time::timeout(self.patience, self.places.clone().acquire_owned()).await {
            Ok(Ok(place)) => Ok(Turn {
                _queued: queued,
                _place: place,
            }),
            // Never closed.
            Ok(Err(_)) | Err(_) => Err(busy()),
        }
    }
}

/// Places of a cap, given back on drop.
#[derive(Debug)]
pub struct Held {
    cap: Arc<Cap>,
    user: String,
    places: usize,
}

impl Cap {
    pub fn new(what: &'static str, total: usize, per_user: usize) -> Arc<Cap> {
        Arc::new(Cap {
            what,
            total,
            per_user,
            counts: Mutex::default(),
        })
    }

    pub fn take(self: &Arc<Self>, user: &str) -> Result<Held, Busy> {
        self.take_n(user, 1)
    }

    /// `places` places at once (things of different sizes: rows, say).
    pub fn take_n(self: &Arc<Self>, user: &str, places: usize) -> Result<Held, Busy> {
        let mut counts = self.counts.lock().expect("cap lock");
        let (total, users) = &mut *counts;
        if *total + places > self.total {
            return Err(Busy::GlobalCap { what: self.what });
        }
        let mine = users.get(user).copied().unwrap_or(0);
        if mine + places > self.per_user {
            return Err(Busy::UserCap { what: self.what });
        }
        users.insert(user.to_owned(), mine + places);
        *total += places;
        Ok(Held {
            cap: self.clone(),
            user: user.to_owned(),
            places,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.cap.counts.lock().expect("cap lock");
        let (total, users) = &mut *counts;
        *total -= self.places;
        if let Some(mine) = users.get_mut(&self.user) {
            *mine -= self.places;
            if *mine == 0 {
                users.remove(&self.user);
            }
        }
    }
}

/// Database work for clients, at most `per_user` connections at once for one user: the
/// gateway's own queries for them (reading the log, compiling policies) on the clients' pools,
/// and their own queries (snapshots, writes), which run a table owner's code, on the
/// authenticator's pools, whose login can read nothing of the log. Reads go where the
/// gateway reads (a standby with --read-url), writes to the primary (`crate::pools`).
pub struct ClientWork {
    pools: WorkPools,
    queries: Arc<Cap>,
}

/// The pools of `ClientWork` (see `crate::pools::Pools`).
pub struct WorkPools {
    pub reads: Pool,
    pub on_primary: Pool,
    pub user_reads: Pool,
    pub user_writes: Pool,
    /// Whether `reads` and `user_reads` are on a standby.
    pub replica: bool,
}

/// A connection for one client's query, and its place under the caps.
pub struct Work {
    pub client: Object,
    held: Held,
}

/// A connection of the authenticator for one user's queries. A table owner's code ran on it
/// and may have changed session settings (`sync.client_id`, which tags the next writes, or
/// `search_path`), taken advisory locks or prepared statements (under the names the client
/// library will use next), which the next user's query must not inherit: given back only
/// after they are reset, released and deallocated, and dropped from the pool when that
/// fails or takes too long. The user's place under the caps is held until then: the
/// connection is busy until the cleaning ran.
pub struct UserWork {
    client: Option<(Object, Held)>,
}

/// `DISCARD ALL`, which cannot run in a transaction block, as its parts.
const CLEAN_SESSION: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; \
    DEALLOCATE ALL; UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD PLANS; \
    DISCARD TEMP; DISCARD SEQUENCES";

/// How long the cleaning may take (it waits for what still runs on the connection).
const CLEAN_PATIENCE: Duration = Duration::from_secs(10);

impl std::ops::Deref for UserWork {
    type Target = Object;
    fn deref(&self) -> &Object {
        &self.client.as_ref().expect("held until dropped").0
    }
}

impl std::ops::DerefMut for UserWork {
    fn deref_mut(&mut self) -> &mut Object {
        &mut self.client.as_mut().expect("held until dropped").0
    }
}

impl Drop for UserWork {
    fn drop(&mut self) {
        if let Some((client, held)) = self.client.take() {
            tokio::spawn(async move {
                let cleaned =
                    tokio::time::timeout(CLEAN_PATIENCE, client.batch_execute(CLEAN_SESSION)).await;
                if matches!(cleaned, Ok(Ok(()))) {
                    client.clear_type_cache();
                } else {
                    let _ = client
                        .cancel_token()
                        .cancel_query(tokio_postgres::NoTls)
                        .await;
                    let _ = Object::take(client);
                }
                drop(held);
            });
        }
    }
}

impl ClientWork {
    /// The global bound is the pool itself, whose wait is bounded; the count keeps one user
    /// from taking all of it.
    pub fn new(pools: WorkPools, per_user: usize) -> ClientWork {
        ClientWork {
            pools,
            queries: Cap::new("queries", usize::MAX, per_user),
        }
    }

    /// A connection for the gateway's work for `user`, or why not (at once, or after the
    /// pool's wait). No code of the user or of a table's owner may run on it.
    pub async fn start(&self, user: &str) -> Result<Work, Busy> {
        self.take(&self.pools.reads, user).await
    }

    /// As `start`, on the primary.
    pub async fn start_on_primary(&self, user: &str) -> Result<Work, Busy> {
        self.take(&self.pools.on_primary, user).await
    }

    /// A connection of the authenticator for `user`'s own queries (see `roles::act_as`) that
    /// only read, cleaned when it is given back.
    pub async fn as_user(&self, user: &str) -> Result<UserWork, Busy> {
        self.user_work(&self.pools.user_reads, user).await
    }

    /// As `as_user`, on the primary: for writes, and reads a standby cannot serve.
    pub async fn as_user_on_primary(&self, user: &str) -> Result<UserWork, Busy> {
        self.user_work(&self.pools.user_writes, user).await
    }

    async fn user_work(&self, pool: &Pool, user: &str) -> Result<UserWork, Busy> {
        let work = self.take(pool, user).await?;
        Ok(UserWork {
            client: Some((work.client, work.held)),
        })
    }

    /// A place under `user`'s query cap, without a connection: held by work that `user`
    /// started for others too (a shared read), so that it counts as theirs.
    pub fn hold(&self, user: &str) -> Result<Held, Busy> {
        self.queries.take(user)
    }

    async fn take(&self, pool: &Pool, user: &str) -> Result<Work, Busy> {
        let held = self.queries.take(user)?;
        let client = pool.get().await?;
        Ok(Work { client, held })
    }

    /// Whether reads go to a standby (`--read-url`).
    pub fn reads_replica(&self) -> bool {
        self.pools.replica
    }

    /// The gateway's pool on the primary, for work of no user (the operators' status).
    pub fn primary(&self) -> &Pool {
        &self.pools.on_primary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_user_and_in_total_and_free_on_drop() {
        let cap = Cap::new("things", 3, 2);
        let a1 = cap.take("alice").unwrap();
        let _a2 = cap.take("alice").unwrap();
        assert!(matches!(cap.take("alice"), Err(Busy::UserCap { .. })));
        let _b1 = cap.take("bob").unwrap();
        assert!(matches!(cap.take("carol"), Err(Busy::GlobalCap { .. })));
        drop(a1);
        let _c1 = cap.take("carol").expect("the place a1 freed");
        assert!(matches!(cap.take("alice"), Err(Busy::GlobalCap { .. })));
    }

    #[test]
    fn places_taken_at_once_count_as_many() {
        let cap = Cap::new("rows", 10, 6);
        assert!(matches!(cap.take_n("alice", 7), Err(Busy::UserCap { .. })));
        let a = cap.take_n("alice", 6).unwrap();
        let _b = cap.take_n("bob", 4).unwrap();
        assert!(matches!(cap.take("bob"), Err(Busy::GlobalCap { .. })));
        drop(a);
        let _b2 = cap.take_n("bob", 2).expect("alice's six are free again");
    }

    #[test]
    fn the_users_are_swept_at_most_once_a_second() {
        let start = Instant::now();
        let swept = Mutex::new(start);
        assert!(!sweep_due(&swept, start + Duration::from_millis(999)));
        assert!(sweep_due(&swept, start + SWEEP_EVERY));
        assert!(!sweep_due(
            &swept,
            start + SWEEP_EVERY + Duration::from_millis(500)
        ));
        assert!(sweep_due(&swept, start + 2 * SWEEP_EVERY));
    }

    /// Over the places, work waits and gets them in the order it came; a wait past the
    /// patience is refused.
    #[tokio::test]
    async fn turns_are_given_in_order_and_a_long_wait_is_refused() {
        let turns = Arc::new(Turns::new("things", 1, 3, Duration::from_secs(60)));
        let first = turns.wait().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..3 {
            let (turns, tx) = (turns.clone(), tx.clone());
            tokio::spawn(async move {
                let _place = turns.wait().await.unwrap();
                tx.send(n).unwrap();
            });
            // Each is waiting before the next comes.
            tokio::task::yield_now().await;
        }
        drop(first);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, [0, 1, 2]);

        let impatient = Turns::new("things", 1, 1, Duration::from_millis(50));
        let _held = impatient.wait().await.unwrap();
        assert!(matches!(
            impatient.wait().await,
            Err(Busy::GlobalCap { .. })
        ));

        // One place, one waiting: a third is refused at once, whatever the patience.
        let full = Arc::new(Turns::new("things", 1, 1, Duration::from_secs(3600)));
        let _running = full.wait().await.unwrap();
        let waiter = tokio::spawn({
            let full = full.clone();
            async move { full.wait().await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert!(matches!(full.wait().await, Err(Busy::GlobalCap { .. })));
        waiter.abort();
    }
}
