//! Acting as a user in the database, the PostgREST way: each query run for a user sets, for
//! its transaction only, the role (the token's `role` claim, else `--default-role`) and
//! `request.jwt.claims` (every claim as JSON), so row-level-security policies read
//! `current_setting('request.jwt.claims', true)::jsonb`. The gateway's login role must be a
//! member of those roles and must not bypass RLS itself (not a superuser, not BYPASSRLS,
//! not the tables' owner).
//!
//! Also here: which versions of rows a user may see, for delivering changes of tables with
//! RLS enabled.

use crate::auth::Claims;
use crate::catalog::Entity;
use crate::log::{Change, Op};
use serde_json::{Map, Value};
use std::collections::HashMap;
use tokio_postgres::{Client, IsolationLevel, Transaction};

/// Who a query runs as.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserContext {
    pub sub: String,
    pub role: Option<String>,
    /// The token's claims as JSON text.
    pub claims: String,
}

impl UserContext {
    pub fn new(claims: &Claims, default_role: Option<&str>) -> Self {
        UserContext {
            sub: claims.sub.clone(),
            role: claims
                .role
                .clone()
                .or_else(|| default_role.map(str::to_owned)),
            claims: Value::Object(claims.all.clone()).to_string(),
        }
    }

    /// Users that see the same rows: same role, same claims.
    pub fn group(&self) -> (Option<String>, String) {
        (self.role.clone(), self.claims.clone())
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
/// the log's cursor, runs before.)
pub async fn act_as(tx: &Transaction<'_>, user: &UserContext) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT pg_catalog.set_config('request.jwt.claims', $1, true)",
        &[&user.claims],
    )
    .await?;
    if let Some(role) = &user.role {
        tx.execute("SELECT pg_catalog.set_config('role', $1, true)", &[role])
            .await?;
    }
    Ok(())
}

/// Whether `user`'s role may read the entity's table at all (its SELECT privilege).
pub async fn can_read(
    client: &Client,
    user: &UserContext,
    entity: &Entity,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_catalog.has_table_privilege(coalesce($1::text, current_user::text), $2::text::regclass, 'SELECT')",
            &[&user.role, &entity.table],
        )
        .await?;
    Ok(row.get(0))
}

/// The current rows, by entity id, among `ids`, that `user` may see.
pub async fn visible_rows(
    client: &mut Client,
    entity: &Entity,
    user: &UserContext,
    ids: &[String],
) -> Result<HashMap<String, Map<String, Value>>, tokio_postgres::Error> {
    let tx = begin_as(client, user, IsolationLevel::ReadCommitted, true).await?;
    let sql = format!(
        "SELECT {}, to_jsonb(t) - $2::text[] FROM {} t WHERE {}",
        entity.id_sql(),
        entity.table,
        entity.key_in_sql(1)
    );
    let rows = tx.query(&sql, &[&ids, &entity.hidden]).await?;
    tx.commit().await?;
    Ok(rows
        .iter()
        .filter_map(|r| match r.get::<_, Value>(1) {
            Value::Object(row) => Some((r.get(0), row)),
            _ => None,
        })
        .collect())
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
    /// The change as it is (its data is the visible current row; or it is a DELETE, which
    /// carries no data).
    Send,
    /// Nothing: the row has changed since (that later change follows), or was never visible.
    Skip,
    /// The row was updated out of the user's sight: a DELETE, to those who named its id.
    Gone,
}

/// Decides from the user's visible current rows. A change is sent only when the row as it
/// stands now is that very version and visible: an older version's data may hold what the
/// user must not see.
pub fn verdict(change: &Change, visible: &HashMap<String, Map<String, Value>>) -> Verdict {
    let current = change.entity_id.as_ref().and_then(|id| visible.get(id));
    match (change.op, current) {
        (Op::Delete | Op::Truncate, _) => Verdict::Send,
        (_, Some(current)) => {
            let data = change.data.as_ref();
            let same = data.is_some_and(|d| d.iter().all(|(k, v)| current.get(k) == Some(v)));
            if same {
                Verdict::Send
            } else {
                Verdict::Skip
            }
        }
        (Op::Update, None) => Verdict::Gone,
        (Op::Insert, None) => Verdict::Skip,
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
    fn only_the_visible_current_version_is_sent() {
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
        assert_eq!(
            verdict(
                &change(Op::Update, "1", json!({"id": 1, "title": "before"})),
                &visible
            ),
            Verdict::Skip
        );
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
