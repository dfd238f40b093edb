//! Acting as a user in the database, the PostgREST way: each query run for a user sets, for
//! its transaction only, the role (the token's `role` claim, else `--default-role`) and
//! `request.jwt.claims` (every claim as JSON), so row-level-security policies read
//! `current_setting('request.jwt.claims', true)::jsonb`. The gateway's login role must be a
//! member of those roles and must not bypass RLS itself (not a superuser, not BYPASSRLS).
//!
//! Which roles a token may name is decided here (`Roles`, SPEC 2.2): only the allowed ones,
//! never `none`, the login role, a superuser or a BYPASSRLS role, checked at start and again
//! every few seconds (a role altered since is refused from then on). Nothing runs as the
//! login role on a user's behalf: a user without a role reads and writes no table.
//!
//! Also here: which versions of rows a user may see, for delivering changes of tables with
//! RLS enabled.

use super::auth::Claims;
use crate::feed::catalog::{quote, Entity};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use tokio_postgres::{Client, Transaction};

/// Who a query runs as.
#[derive(Clone, Debug, PartialEq)]
pub struct UserContext {
    pub sub: String,
    /// An allowed role; None when the token names none and there is no default role: such a
    /// user reads and writes no table.
    pub role: Option<String>,
    /// The token's claims as JSON text, as policies read them.
    pub claims: String,
    /// The same, parsed, for policies evaluated in the gateway.
    pub claims_json: Value,
}

/// Users that see the same rows: same role, same claims. Groups are what row-level security
/// is judged for, once per group, not per subscriber.
pub type GroupId = u32;

/// A group's role and claims (as text).
type GroupKey = (Option<String>, String);

fn group_key(user: &UserContext) -> GroupKey {
    (user.role.clone(), user.claims.clone())
}

/// Gives users of one role and claims one group id, for as long as one of them is connected.
#[derive(Default)]
pub struct Groups {
    ids: Mutex<GroupIds>,
}

/// The last id given, and per group its id and its users.
type GroupIds = (GroupId, HashMap<GroupKey, (GroupId, usize)>);

impl Groups {
    /// The group of `user`, held until `release`.
    pub fn join(&self, user: &UserContext) -> GroupId {
        let mut ids = self.ids.lock().expect("groups lock");
        let (next, map) = &mut *ids;
        let entry = map.entry(group_key(user)).or_insert_with(|| {
            *next += 1;
            (*next, 0)
        });
        entry.1 += 1;
        entry.0
    }

    pub fn release(&self, user: &UserContext) {
        let mut ids = self.ids.lock().expect("groups lock");
        let key = group_key(user);
        if let Some(entry) = ids.1.get_mut(&key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                ids.1.remove(&key);
            }
        }
    }
}

/// The roles tokens may name.
pub struct Roles {
    /// The login users' queries run on (--authenticator-url, else the gateway's own).
    authenticator: String,
    /// Whether it is a login of its own, whose reach is checked at every refresh.
    separate_authenticator: bool,
    default: Option<String>,
    /// --allowed-roles.
    configured: Vec<String>,
    /// The configured roles that are safe to act as now.
    usable: RwLock<HashSet<String>>,
    /// When the roles were last read.
    refreshed_at: Mutex<std::time::Instant>,
}

/// Why a token's role is refused.
#[derive(Debug, thiserror::Error)]
#[error("the role {0:?} is not one this gateway acts as")]
pub struct RoleNotAllowed(pub String);

/// Why the gateway must not start with its login role and roles.
#[derive(Debug, thiserror::Error)]
pub enum RolesError {
    #[error(
        "the login role {0} is a superuser or has BYPASSRLS, which bypasses row-level \
         security for every user; log in as a role without (see README: Setting up a \
         database), or pass --insecure-superuser for development"
    )]
    PrivilegedLogin(String),
    #[error(
        "--allowed-roles/--default-role: {0} cannot be acted as: it must exist, be neither \
         `none`, a login role of the gateway, a superuser nor BYPASSRLS, and both the login \
         role and the authenticator must be members of it (GRANT {0} TO <login role>, \
         <authenticator>)"
    )]
    Unusable(String),
    #[error(
        "the authenticator {authenticator} can become {reaches}, which {what}: code of a table's \
         owner in a user's query could use it (see README: Setting up a database; \
         sync.grant_authenticator grants what it needs)"
    )]
    AuthenticatorTooPowerful {
        authenticator: String,
        reaches: String,
        what: String,
    },
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// The configured roles that are safe to act as, as the database says now: the gateway's login
/// ($2 the authenticator) must be a member, for judging policies as the role.
const USABLE_ROLES_SQL: &str = "
SELECT r.rolname::text FROM pg_catalog.pg_roles r
 WHERE r.rolname = ANY ($1::text[]) AND r.rolname NOT IN (current_user, $2)
   AND NOT r.rolsuper AND NOT r.rolbypassrls
   AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')
   AND pg_catalog.pg_has_role($2, r.oid, 'MEMBER')";

/// A role the authenticator ($1) is or can SET ROLE to that would let a table owner's code in
/// a user's query read or change what is not the user's: the log (or the replication slot
/// behind it), pg_sync's tables, the server itself, or rows past row-level security; and
/// why. None is the answer wanted.
const AUTHENTICATOR_REACH_SQL: &str = "
SELECT r.rolname::text, c.why
  FROM pg_catalog.pg_roles r
 CROSS JOIN LATERAL (VALUES
   (1, r.rolsuper OR r.rolbypassrls, 'bypasses row-level security'),
   (2, r.rolreplication, 'may read the replication slot'),
   (3, r.rolcreaterole, 'may grant itself other roles'),
   (4, r.rolname IN ('pg_execute_server_program', 'pg_read_server_files', 'pg_write_server_files'),
    'may run programs or read files on the server'),
   (5, r.oid = (SELECT d.datdba FROM pg_catalog.pg_database d
              WHERE d.datname = pg_catalog.current_database()), 'owns the database'),
   (6, pg_catalog.has_any_column_privilege(r.oid, 'sync.change_history', 'SELECT, INSERT, UPDATE')
    OR pg_catalog.has_table_privilege(r.oid, 'sync.change_history', 'DELETE, TRUNCATE')
    OR pg_catalog.has_function_privilege(r.oid, 'sync.changes_since(text, integer, text)', 'EXECUTE')
    OR pg_catalog.has_function_privilege(r.oid, 'sync._changes_page(text, integer, text)', 'EXECUTE')
    OR pg_catalog.has_function_privilege(r.oid, 'sync.prune(interval)', 'EXECUTE'),
    'may read or change the change log'),
   (7, pg_catalog.has_any_column_privilege(r.oid, 'sync.subscription', 'SELECT, INSERT, UPDATE')
    OR pg_catalog.has_any_column_privilege(r.oid, 'sync.applied_mutation', 'SELECT, UPDATE')
    OR pg_catalog.has_any_column_privilege(r.oid, 'sync.state', 'INSERT, UPDATE')
    OR pg_catalog.has_any_column_privilege(r.oid, 'sync.tracked', 'INSERT, UPDATE')
    OR pg_catalog.has_any_column_privilege(r.oid, 'sync.gateway', 'INSERT, UPDATE')
    OR pg_catalog.has_table_privilege(r.oid, 'sync.subscription', 'DELETE, TRUNCATE')
    OR pg_catalog.has_table_privilege(r.oid, 'sync.applied_mutation', 'DELETE, TRUNCATE')
    OR pg_catalog.has_table_privilege(r.oid, 'sync.state', 'DELETE, TRUNCATE')
    OR pg_catalog.has_table_privilege(r.oid, 'sync.tracked', 'DELETE, TRUNCATE')
    OR pg_catalog.has_table_privilege(r.oid, 'sync.gateway', 'DELETE, TRUNCATE'),
    'may read or change pg_sync''s tables'),
   (8, pg_catalog.has_schema_privilege(r.oid, 'sync_lock', 'USAGE')
    OR pg_catalog.has_function_privilege(r.oid, 'sync._log_read_lock()', 'EXECUTE')
    OR pg_catalog.has_function_privilege(r.oid, 'sync.ingest_wal(integer)', 'EXECUTE')
    OR pg_catalog.has_function_privilege(r.oid, 'sync.create_wal_slot()', 'EXECUTE')
    OR pg_catalog.has_function_privilege(r.oid, 'sync.track(regclass, text, text, text[])', 'EXECUTE')
    OR pg_catalog.has_function_privilege(r.oid, 'sync.untrack(regclass)', 'EXECUTE'),
    'may take pg_sync''s locks or change what it tracks')
 ) AS c(n, bad, why)
 WHERE pg_catalog.pg_has_role($1, r.oid, 'MEMBER') AND c.bad
 ORDER BY r.rolname, c.n LIMIT 1";

impl Roles {
    /// Checks the login role, the authenticator (None: users' queries run on the login
    /// role) and the configured roles: an error refuses to start.
    pub async fn check(
        client: &Client,
        authenticator: Option<String>,
        default: Option<String>,
        configured: Vec<String>,
        insecure_superuser: bool,
    ) -> Result<Roles, RolesError> {
        let login = check_login(client, insecure_superuser).await?;
        let separate_authenticator = authenticator.is_some();
        let authenticator = match authenticator {
            Some(authenticator) => {
                if let Some(too_powerful) = too_powerful(client, &authenticator).await? {
                    return Err(too_powerful);
                }
                authenticator
            }
            None => {
                tracing::warn!(
                    login,
                    "users' queries run on the gateway's login role (no --authenticator-url): \
                     code of a table's owner in them can RESET ROLE and read the whole log"
                );
                login.clone()
            }
        };
        let roles = Roles {
            authenticator,
            separate_authenticator,
            default,
            configured,
            usable: RwLock::default(),
            refreshed_at: Mutex::new(std::time::Instant::now()),
        };
        roles.refresh(client).await?;
        let usable = roles.usable.read().expect("roles lock").clone();
        if let Some(bad) = roles.configured.iter().find(|r| !usable.contains(*r)) {
            return Err(RolesError::Unusable(bad.clone()));
        }
        Ok(roles)
    }

    /// Reads again which configured roles are safe to act as. (Whether what they may read
    /// changed is the catalog's access fingerprint.)
    pub async fn refresh(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let rows = client
            .query(USABLE_ROLES_SQL, &[&self.configured, &self.authenticator])
            .await?;
        let mut usable: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        if self.separate_authenticator {
            if let Some(too_powerful) = too_powerful(client, &self.authenticator).await? {
                // Granted since the start: act as nobody until it is revoked.
                tracing::error!(error = %too_powerful, "refusing every user");
                usable.clear();
            }
        }
        *self.usable.write().expect("roles lock") = usable;
        *self.refreshed_at.lock().expect("roles lock") = std::time::Instant::now();
        Ok(())
    }

    /// Acts as nobody once the roles could not be read for `max_age`: a grant made meanwhile
    /// (a role altered to bypass RLS, a right on the log) must not go unseen for long.
    pub fn expire_if_stale(&self, max_age: std::time::Duration) {
        if self.refreshed_at.lock().expect("roles lock").elapsed() > max_age {
            let mut usable = self.usable.write().expect("roles lock");
            if !usable.is_empty() {
                tracing::error!("the roles could not be read for {max_age:?}: refusing every user");
                usable.clear();
            }
        }
    }

    /// Whom a token's holder acts as: its `role` claim, which must be allowed, else the
    /// default role, else no role at all.
    pub fn user(&self, claims: &Claims) -> Result<UserContext, RoleNotAllowed> {
        let role = match claims.role.as_ref().or(self.default.as_ref()) {
            None => None,
            Some(role) if self.usable.read().expect("roles lock").contains(role) => {
                Some(role.clone())
            }
            Some(role) => return Err(RoleNotAllowed(role.clone())),
        };
        Ok(UserContext {
            sub: claims.sub.clone(),
            role,
            claims: Value::Object(claims.all.clone()).to_string(),
            claims_json: Value::Object(claims.all.clone()),
        })
    }
}

/// Why `authenticator` must not be used, if it or a role it can become can read the log or
/// the subscriptions, or bypasses row-level security.
async fn too_powerful(
    client: &Client,
    authenticator: &str,
) -> Result<Option<RolesError>, tokio_postgres::Error> {
    let reach = client
        .query_opt(AUTHENTICATOR_REACH_SQL, &[&authenticator])
        .await?;
    Ok(reach.map(|row| RolesError::AuthenticatorTooPowerful {
        authenticator: authenticator.to_owned(),
        reaches: row.get(0),
        what: row.get(1),
    }))
}

/// From here on in `tx`, queries run as `user`. (What must run as the gateway, such as reading
/// the log's cursor, runs before.) A user without a role is refused before getting here.
pub async fn act_as(tx: &Transaction<'_>, user: &UserContext) -> Result<(), tokio_postgres::Error> {
    let role = user
        .role
        .as_deref()
        .expect("users without a role act as nobody");
    tx.execute(
        "SELECT pg_catalog.set_config('request.jwt.claims', $1, true),
                pg_catalog.set_config('role', $2, true)",
        &[&user.claims, &role],
    )
    .await?;
    Ok(())
}

/// Locks `entity`'s table in `mode` as `user`'s role (so its privileges decide, as for the
/// query that follows), as the first statements of `tx`: before its snapshot is taken, so
/// that no ALTER, re-track or replacement of the table can commit between the snapshot and
/// the query, and `Entity::check_sql` then tells whether the entity is still the one the
/// query was built for. Runs no code of the table's owner.
pub async fn lock_as(
    tx: &Transaction<'_>,
    user: &UserContext,
    entity: &Entity,
    mode: LockMode,
) -> Result<(), tokio_postgres::Error> {
    let role = user
        .role
        .as_deref()
        .expect("users without a role act as nobody");
    let mode = match mode {
        LockMode::Read => "ACCESS SHARE",
        LockMode::Write => "ROW EXCLUSIVE",
    };
    // SET and LOCK take no snapshot; the role is an allowed role's name, quoted.
    tx.batch_execute(&format!(
        "SET LOCAL ROLE {}; LOCK TABLE {} IN {mode} MODE; RESET ROLE",
        quote(role),
        entity.table
    ))
    .await
}

/// How `lock_as` locks a table: as a query reading it, or one writing it.
#[derive(Clone, Copy, Debug)]
pub enum LockMode {
    Read,
    Write,
}

/// The login of `client`, refused when it is a superuser or BYPASSRLS (unless insecure):
/// row-level security would not hold for anyone.
pub async fn check_login(client: &Client, insecure_superuser: bool) -> Result<String, RolesError> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper OR rolbypassrls FROM pg_catalog.pg_roles
              WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (login, privileged): (String, bool) = (row.get(0), row.get(1));
    if privileged {
        if !insecure_superuser {
            return Err(RolesError::PrivilegedLogin(login));
        }
        tracing::warn!(
            login,
            "INSECURE: the login role bypasses row-level security (--insecure-superuser); \
             every user can read every row"
        );
    }
    Ok(login)
}
