//! Acting as a user in the database, the PostgREST way: each query run for a user sets, for
//! its transaction only, the role (the token's `role` claim, else `--default-role`) and
//! `request.jwt.claims` (every claim as JSON), so row-level-security policies read
//! `current_setting('request.jwt.claims', true)::jsonb`. The gateway's login role must be a
//! member of those roles and must not bypass RLS itself (not a superuser, not BYPASSRLS,
//! not the tables' owner).
//!
//! Which roles a token may name is decided here (`Roles`, SPEC 2.2): only the allowed ones,
//! never `none`, the login role, a superuser or a BYPASSRLS role, checked at start and again
//! every few seconds (a role altered since is refused from then on). Nothing runs as the
//! login role on a user's behalf: a user without a role reads and writes no table.
//!
//! Also here: which versions of rows a user may see, for delivering changes of tables with
//! RLS enabled.

use crate::auth::Claims;
use crate::catalog::{Catalog, Entity};
use crate::log::{Change, Op};
use deadpool_postgres::Pool;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use tokio_postgres::{Client, IsolationLevel, SimpleQueryMessage, Transaction};

/// Who a query runs as.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserContext {
    pub sub: String,
    /// An allowed role; None when the token names none and there is no default role: such a
    /// user reads and writes no table.
    pub role: Option<String>,
    /// The token's claims as JSON text.
    pub claims: String,
}

impl UserContext {
    /// Users that see the same rows: same role, same claims.
    pub fn group(&self) -> (Option<String>, String) {
        (self.role.clone(), self.claims.clone())
    }
}

/// The roles tokens may name.
pub struct Roles {
    default: Option<String>,
    /// --allowed-roles.
    configured: Vec<String>,
    /// The configured roles that are safe to act as now.
    usable: RwLock<HashSet<String>>,
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
         `none`, the login role, a superuser nor BYPASSRLS, and the login role must be a \
         member of it (GRANT {0} TO <login role>)"
    )]
    Unusable(String),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// The configured roles that are safe to act as, as the database says now.
const USABLE_ROLES_SQL: &str = "
SELECT r.rolname::text FROM pg_catalog.pg_roles r
 WHERE r.rolname = ANY ($1::text[]) AND r.rolname <> current_user
   AND NOT r.rolsuper AND NOT r.rolbypassrls
   AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')";

impl Roles {
    /// Checks the login role and the configured roles: an error refuses to start.
    pub async fn check(
        client: &Client,
        default: Option<String>,
        configured: Vec<String>,
        insecure_superuser: bool,
    ) -> Result<Roles, RolesError> {
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
        let roles = Roles {
            default,
            configured,
            usable: RwLock::default(),
        };
        roles.refresh(client).await?;
        let usable = roles.usable.read().expect("roles lock").clone();
        if let Some(bad) = roles.configured.iter().find(|r| !usable.contains(*r)) {
            return Err(RolesError::Unusable(bad.clone()));
        }
        Ok(roles)
    }

    /// Reads again which configured roles are safe to act as.
    pub async fn refresh(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let rows = client.query(USABLE_ROLES_SQL, &[&self.configured]).await?;
        let usable: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        *self.usable.write().expect("roles lock") = usable;
        Ok(())
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
        })
    }
}

/// Starts a transaction in which queries run as `user`.
pub async fn begin_as<'a>(
    client: &'a mut Client,
    user: &UserContext,
    isolation: IsolationLevel,
    read_only: bool,
) -> Result<Transaction<'a>, tokio_postgres::Error> {
    let tx = client
        .build_transaction()
        .isolation_level(isolation)
        .read_only(read_only)
        .start()
        .await?;
    act_as(&tx, user).await?;
    Ok(tx)
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

/// Whether `user`'s role may read the entity's table at all (its SELECT privilege).
pub async fn can_read(
    client: &Client,
    user: &UserContext,
    entity: &Entity,
) -> Result<bool, tokio_postgres::Error> {
    let Some(role) = &user.role else {
        return Ok(false);
    };
    let row = client
        .query_one(
            "SELECT pg_catalog.has_table_privilege($1::text, $2::text::regclass, 'SELECT')",
            &[role, &entity.table],
        )
        .await?;
    Ok(row.get(0))
}

/// Why a user may not read an entity at all.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is not a tracked entity")]
    Unknown(String),
    #[error("reading {0} needs a role, and the token names none (and there is no default role)")]
    NoRole(String),
    #[error("no read access to {0}")]
    NoPrivilege(String),
    /// The catalog or the database could not answer.
    #[error("{0}")]
    Failed(String),
}

/// The entity `code`, if `user` may read it (subscribing, snapshots): tracked, its table
/// readable by the user's role, and, with row-level security, a role to check rows as.
pub async fn readable_entity(
    catalog: &Catalog,
    pool: &Pool,
    user: &UserContext,
    code: &str,
) -> Result<Arc<Entity>, Refusal> {
    let entity = catalog
        .entity(code)
        .await
        .map_err(|e| Refusal::Failed(crate::ErrorChain(&e).to_string()))?
        .ok_or_else(|| Refusal::Unknown(code.to_owned()))?;
    if user.role.is_none() {
        return Err(Refusal::NoRole(entity.code.clone()));
    }
    let client = pool
        .get()
        .await
        .map_err(|e| Refusal::Failed(e.to_string()))?;
    match can_read(&client, user, &entity).await {
        Ok(true) => Ok(entity),
        Ok(false) => Err(Refusal::NoPrivilege(entity.code.clone())),
        Err(e) => Err(Refusal::Failed(crate::ErrorChain(&e).to_string())),
    }
}

/// The current rows, by entity id, among `ids`, that `user` may see.
pub async fn visible_rows(
    client: &Client,
    entity: &Entity,
    user: &UserContext,
    ids: &[String],
) -> Result<HashMap<String, Map<String, Value>>, tokio_postgres::Error> {
    // One round trip, in order: the statements go as one simple query, with the values as
    // dollar-quoted literals (no escaping to get wrong). Checks run per group and batch,
    // and the five round trips of a parameterised transaction were most of their time.
    let role = literal(
        user.role
            .as_deref()
            .expect("users without a role see no rows"),
    );
    let sql = format!(
        "BEGIN READ ONLY;
         SELECT pg_catalog.set_config('request.jwt.claims', {claims}, true), pg_catalog.set_config('role', {role}, true);
         SELECT {id}, (to_jsonb(t.*) - {hidden}::text[])::text FROM {table} t WHERE {key};
         COMMIT;",
        claims = literal(&user.claims),
        id = entity.id_sql(),
        hidden = text_array(&entity.hidden),
        table = entity.table,
        key = entity.key_in_sql_literal(&text_array(ids)),
    );
    let messages = match client.simple_query(&sql).await {
        Ok(messages) => messages,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    };
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row)
                if row.columns().len() == 2 && row.columns()[0].name() != "set_config" =>
            {
                let id = row.get(0)?.to_owned();
                match serde_json::from_str(row.get(1)?) {
                    Ok(Value::Object(data)) => Some((id, data)),
                    _ => None,
                }
            }
            _ => None,
        })
        .collect())
}

/// A SQL string literal of any text, dollar-quoted with a tag the text does not contain.
pub fn literal(text: &str) -> String {
    // The literal ends at the first `$tag$` after the opening one: it must be the last.
    let mut tag = String::from("q");
    while format!("{text}${tag}$").find(&format!("${tag}$")) != Some(text.len()) {
        tag.push('q');
    }
    format!("${tag}${text}${tag}$")
}

/// A SQL text[] of literals.
fn text_array(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|i| literal(i)).collect();
    format!("ARRAY[{}]::text[]", items.join(", "))
}

/// The entity ids whose current rows a batch of changes needs checked: those written.
pub fn ids_to_check<'a>(changes: impl Iterator<Item = &'a Change>) -> Vec<String> {
    let mut ids: Vec<String> = changes
        .filter(|c| matches!(c.op, Op::Insert | Op::Update))
        .filter_map(|c| c.entity_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// What a user may learn of one change of a table with RLS.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    /// The change as it is: its data is the row as the user sees it now, or it is a DELETE,
    /// which carries no data.
    Send,
    /// The row is visible but has changed since: send the change with the current row as
    /// its data (`as_current`). An older version's data may hold what the user must not
    /// see; the current row is visible, and later changes follow anyway.
    Current,
    /// Nothing: the row was never visible to the user.
    Skip,
    /// The row was updated out of the user's sight: a DELETE, to those who named its id.
    Gone,
}

/// Decides from the user's visible current rows (`visible_rows`).
pub fn verdict(change: &Change, visible: &HashMap<String, Map<String, Value>>) -> Verdict {
    let current = change.entity_id.as_ref().and_then(|id| visible.get(id));
    match (change.op, current) {
        (Op::Delete | Op::Truncate, _) => Verdict::Send,
        (_, Some(current)) => {
            let data = change.data.as_ref();
            if data.is_some_and(|d| d.iter().all(|(k, v)| current.get(k) == Some(v))) {
                Verdict::Send
            } else {
                Verdict::Current
            }
        }
        (Op::Update, None) => Verdict::Gone,
        (Op::Insert, None) => Verdict::Skip,
    }
}

/// The verdict on a change, and the change to send for it: for `Current`, with the current
/// row as its data.
pub fn judge<'a>(
    change: &'a Change,
    visible: &HashMap<String, Map<String, Value>>,
) -> (Verdict, Cow<'a, Change>) {
    match verdict(change, visible) {
        Verdict::Current => (Verdict::Current, Cow::Owned(as_current(change, visible))),
        other => (other, Cow::Borrowed(change)),
    }
}

/// The change carrying the current row as its data (for `Verdict::Current`).
pub fn as_current(change: &Change, visible: &HashMap<String, Map<String, Value>>) -> Change {
    let current = change
        .entity_id
        .as_ref()
        .and_then(|id| visible.get(id))
        .cloned();
    Change {
        data: current.or_else(|| change.data.clone()),
        ..change.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(op: Op, id: &str, data: Value) -> Change {
        Change {
            id: 1,
            entity_code: "doc".into(),
            op,
            entity_id: Some(id.into()),
            data: data.as_object().cloned(),
            old_data: None,
            changed: None,
            client_id: None,
            schema_version: 1,
            captured_at: String::new(),
            cursor: String::new(),
        }
    }

    #[test]
    fn literals_survive_any_text() {
        assert_eq!(literal("a'b"), "$q$a'b$q$");
        assert_eq!(literal("x$q$y"), "$qq$x$q$y$qq$");
        assert_eq!(literal("ends with $q"), "$qq$ends with $q$qq$");
        assert_eq!(literal(r"back\slash"), r"$q$back\slash$q$");
    }

    #[test]
    fn only_visible_rows_are_sent_and_always_as_they_are_now() {
        let visible: HashMap<String, Map<String, Value>> = [(
            "1".to_owned(),
            json!({"id": 1, "title": "now"})
                .as_object()
                .unwrap()
                .clone(),
        )]
        .into();
        assert_eq!(
            verdict(
                &change(Op::Update, "1", json!({"id": 1, "title": "now"})),
                &visible
            ),
            Verdict::Send
        );
        let old = change(Op::Update, "1", json!({"id": 1, "title": "before"}));
        assert_eq!(verdict(&old, &visible), Verdict::Current);
        assert_eq!(as_current(&old, &visible).data, visible.get("1").cloned());
        assert_eq!(
            verdict(&change(Op::Update, "2", json!({"id": 2})), &visible),
            Verdict::Gone
        );
        assert_eq!(
            verdict(&change(Op::Insert, "2", json!({"id": 2})), &visible),
            Verdict::Skip
        );
        assert_eq!(
            verdict(&change(Op::Delete, "3", Value::Null), &visible),
            Verdict::Send
        );
    }
}
