//! `POST /v1/write`: a batch of mutations applied in one transaction as the user (role and
//! claims, so RLS and privileges decide), tagged `<sub>:<clientId>` so the change is not
//! echoed to that client and no other user can claim it, and applied at most once per mutation id (`sync.claim_mutation`).
//! `expect` makes an UPDATE or DELETE conditional on the current row. Never partly applied:
//! the first failure rolls everything back and answers for that mutation.
//!
//! Entity and column names reach SQL only after being checked against the catalog, and
//! quoted; values only as parameters, typed by `jsonb_populate_record` against the table.

use super::error::ApiError;
use super::extract::{check_client_id, Authenticated};
use crate::access::roles::{act_as, lock_as, LockMode, UserContext};
use crate::feed::catalog::{entity_changed, quote, Entity};
use crate::model::change::Action;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use deadpool_postgres::Object;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::sync::Arc;
use tokio_postgres::error::SqlState;
use tokio_postgres::Transaction;

/// Mutations one request may carry.
pub const MAX_MUTATIONS: usize = 500;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WriteRequest {
    pub client_id: Option<String>,
    pub mutations: Vec<Mutation>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mutation {
    pub id: String,
    pub entity_code: String,
    pub action: Action,
    pub entity_id: Option<String>,
    pub data: Option<Map<String, Value>>,
    pub expect: Option<Map<String, Value>>,
}

/// A mutation checked against its entity.
struct Checked<'a> {
    mutation: &'a Mutation,
    entity: Arc<Entity>,
}

pub async fn write(
    State(state): State<Arc<AppState>>,
    auth: Authenticated,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let user = auth.with_role()?;
    let request: WriteRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    check_client_id(request.client_id.as_deref())?;
    if request.mutations.is_empty() || request.mutations.len() > MAX_MUTATIONS {
        return Err(ApiError::bad_request(format!(
            "a write has 1 to {MAX_MUTATIONS} mutations"
        )));
    }
    let mut ids = HashSet::new();
    for m in &request.mutations {
        if m.id.is_empty() || m.id.len() > 128 || !ids.insert(m.id.as_str()) {
            return Err(ApiError::bad_request(
                "each mutation needs its own id of 1 to 128 characters",
            )
            .with_mutation(&m.id));
        }
    }
    let mut work = state.work.as_user_on_primary(&user.sub).await?;
    let client: &mut Object = &mut work;
    // A table altered, re-tracked or replaced while the write was built: the catalog is read
    // again and the mutations checked anew against it.
    let mut changes_left = CHANGED_RETRIES;
    let results = loop {
        let checked = checked(&state, &request.mutations).await?;
        match attempt(client, &user, &request, &checked).await {
            Err(Attempt::Changed) if changes_left > 0 => {
                changes_left -= 1;
                state.catalog.reload().await.map_err(ApiError::internal)?;
            }
            Err(Attempt::Changed) => {
                let why = "the tables keep changing; retry the write";
                return Err(ApiError::unavailable(
                    why,
                    std::time::Duration::from_secs(1),
                ));
            }
            Err(Attempt::Failed(e)) => return Err(e),
            Ok(results) => break results,
        }
    };
    // Read after the commit: the cursor is at or after this write.
    let cursor: String = client
        .query_one("SELECT sync.current_cursor()", &[])
        .await
        .map_err(ApiError::from_db)?
        .get(0);
    Ok(Json(json!({"cursor": cursor, "results": results})))
}

/// Reads of the catalog a write makes when a table changed under it.
const CHANGED_RETRIES: usize = 2;

/// Why one attempt at a write did not commit.
enum Attempt {
    /// A table is not the entity the write was built for any more.
    Changed,
    Failed(ApiError),
}

impl From<ApiError> for Attempt {
    fn from(e: ApiError) -> Self {
        Attempt::Failed(e)
    }
}

/// The mutations, each with its entity as the catalog has it now, checked.
async fn checked<'a>(
    state: &AppState,
    mutations: &'a [Mutation],
) -> Result<Vec<Checked<'a>>, ApiError> {
    let mut checked = Vec::with_capacity(mutations.len());
    for m in mutations {
        let entity = state
            .catalog
            .entity(&m.entity_code)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::unknown_entity(&m.entity_code).with_mutation(&m.id))?;
        check(&entity, m).map_err(|e| e.with_mutation(&m.id))?;
        checked.push(Checked {
            mutation: m,
            entity,
        });
    }
    Ok(checked)
}

/// One transaction applying every mutation, or none.
async fn attempt(
    client: &mut Object,
    user: &UserContext,
    request: &WriteRequest,
    checked: &[Checked<'_>],
) -> Result<Vec<Value>, Attempt> {
    let tx = client.transaction().await.map_err(ApiError::from_db)?;
    // Each table locked as the user, then checked to be what the write was built for:
    // nothing can alter it before the write is done (`lock_as`).
    let mut entities: Vec<&Arc<Entity>> = checked.iter().map(|c| &c.entity).collect();
    entities.sort_by(|a, b| a.table.cmp(&b.table));
    entities.dedup_by(|a, b| a.table == b.table);
    for entity in entities {
        lock_as(&tx, user, entity, LockMode::Write)
            .await
            .map_err(refused)?;
        let sql = format!("SELECT {}", Entity::check_sql(1));
        match tx.execute(&sql, &entity.identity()).await {
            Err(e) if entity_changed(&e) => return Err(Attempt::Changed),
            other => other.map_err(ApiError::from_db)?,
        };
    }
    // Claim the mutation ids first, before acting as the user; a rollback releases them.
    let ids: Vec<&str> = checked.iter().map(|c| c.mutation.id.as_str()).collect();
    let fresh: HashSet<String> = tx
        .query(
            "SELECT m FROM unnest($2::text[]) AS m WHERE sync.claim_mutation($1, m)",
            &[&user.sub, &ids],
        )
        .await
        .map_err(ApiError::from_db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(client_id) = &request.client_id {
        // Under the user's own name (SPEC 2.3), for trigger and WAL capture alike.
        let tag = format!("{}:{client_id}", user.sub);
        tx.execute("SELECT sync.tag_origin($1)", &[&tag])
            .await
            .map_err(ApiError::from_db)?;
    }
    act_as(&tx, user).await.map_err(ApiError::from_db)?;
    let mut results = Vec::with_capacity(checked.len());
    for c in checked {
        let id = &c.mutation.id;
        let applied = fresh.contains(id);
        if applied {
            apply(&tx, c).await.map_err(|e| e.with_mutation(id))?;
        }
        results.push(json!({"id": id, "status": if applied { "applied" } else { "duplicate" }}));
    }
    tx.commit().await.map_err(ApiError::from_db)?;
    Ok(results)
}

/// Checks a mutation's shape and names before anything touches the database.
fn check(entity: &Entity, m: &Mutation) -> Result<(), ApiError> {
    let needs_data = matches!(m.action, Action::Create | Action::Update);
    if needs_data && m.data.as_ref().is_none_or(|d| d.is_empty()) {
        return Err(ApiError::bad_request("CREATE and UPDATE need data"));
    }
    if m.action == Action::Delete && m.data.is_some() {
        return Err(ApiError::bad_request("DELETE takes no data"));
    }
    if m.action != Action::Create && m.entity_id.is_none() {
        return Err(ApiError::bad_request("UPDATE and DELETE need an entityId"));
    }
    if m.action == Action::Create && m.expect.is_some() {
        return Err(ApiError::bad_request("expect applies to UPDATE and DELETE"));
    }
    let named = m.data.iter().chain(m.expect.iter()).flat_map(|d| d.keys());
    for column in named {
        if !entity.columns.contains(column) {
            return Err(ApiError::bad_request(format!(
                "{column} is not a published column of {}",
                entity.code
            )));
        }
    }
    if m.action == Action::Create && m.entity_id.is_some() && entity.key.len() != 1 {
        return Err(ApiError::bad_request(
            "with a composite key, CREATE takes the key's columns in data",
        ));
    }
    Ok(())
}

type Param<'p> = &'p (dyn tokio_postgres::types::ToSql + Sync);

/// The expected values are one more parameter, when there are any.
fn with_expect<'p>(mut params: Vec<Param<'p>>, expect: &'p Option<Value>) -> Vec<Param<'p>> {
    if let Some(expect) = expect {
        params.push(expect);
    }
    params
}

/// What a write refused by row-level security or privileges answers (403), whatever the
/// reason: the answer to a write must not tell a hidden row from a policy.
const REFUSED: &str = "the write was refused by row-level security or privileges";

/// A database error of a write as the client sees it: a refusal says only `REFUSED`, a
/// unique key taken by another row (not the primary key) a bare 409.
fn refused(error: tokio_postgres::Error) -> ApiError {
    match error.code() {
        Some(code) if *code == SqlState::INSUFFICIENT_PRIVILEGE => ApiError::forbidden(REFUSED),
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "conflict",
            "a unique value of this row is taken",
        ),
        _ => ApiError::from_db(error),
    }
}

async fn apply(tx: &Transaction<'_>, c: &Checked<'_>) -> Result<(), ApiError> {
    let (m, entity) = (c.mutation, &c.entity);
    let table = &entity.table;
    let row = |values: &Map<String, Value>| -> (String, Value) {
        let columns: Vec<String> = values.keys().map(|k| quote(k)).collect();
        (columns.join(", "), Value::Object(values.clone()))
    };
    let ids = vec![m.entity_id.clone().unwrap_or_default()];
    let expect_sql = |n: usize| match &m.expect {
        Some(expect) if !expect.is_empty() => {
            let (columns, _) = row(expect);
            let qualified: Vec<String> = expect.keys().map(|k| format!("t.{}", quote(k))).collect();
            format!(
                " AND ({}) IS NOT DISTINCT FROM (SELECT {columns} FROM pg_catalog.jsonb_populate_record(NULL::{table}, ${n}))",
                qualified.join(", ")
            )
        }
        _ => String::new(),
    };
    let expect = m
        .expect
        .clone()
        .filter(|e| !e.is_empty())
        .map(Value::Object);
    let touched = match m.action {
        Action::Create => {
            let mut data = m.data.clone().unwrap_or_default();
            if let (Some(id), [key]) = (&m.entity_id, entity.key.as_slice()) {
                data.entry(key.clone())
                    .or_insert_with(|| Value::String(id.clone()));
            }
            let (columns, values) = row(&data);
            let key: Vec<String> = entity.key.iter().map(|k| quote(k)).collect();
            let key = key.join(", ");
            let sql = format!(
                "INSERT INTO {table} ({columns}) SELECT {columns} FROM pg_catalog.jsonb_populate_record(NULL::{table}, $1) \
                 ON CONFLICT ({key}) DO NOTHING"
            );
            let inserted = tx.execute(&sql, &[&values]).await.map_err(refused)?;
            if inserted == 0 {
                // The id is taken: by a row the user sees (409, with it), or by one it may not
                // see, which is answered as RLS refusals are, so that the answer tells nothing
                // of a hidden row.
                let sql = format!(
                    "SELECT {} FROM {table} t \
                      WHERE ({key}) = (SELECT {key} FROM pg_catalog.jsonb_populate_record(NULL::{table}, $1))",
                    entity.row_json_sql()
                );
                let current = tx.query_opt(&sql, &[&values]).await.map_err(refused)?;
                return Err(match current {
                    Some(row) => ApiError::conflict(row.get::<_, Value>(0)),
                    None => ApiError::forbidden(REFUSED),
                });
            }
            inserted
        }
        Action::Update => {
            let (columns, values) = row(m.data.as_ref().expect("checked"));
            let sql = format!(
                "UPDATE {table} t SET ({columns}) = (SELECT {columns} FROM pg_catalog.jsonb_populate_record(NULL::{table}, $1)) \
                  WHERE {}{}",
                entity.key_in_sql(2),
                expect_sql(3)
            );
            tx.execute(&sql, &with_expect(vec![&values, &ids], &expect))
                .await
                .map_err(refused)?
        }
        Action::Delete => {
            let sql = format!(
                "DELETE FROM {table} t WHERE {}{}",
                entity.key_in_sql(1),
                expect_sql(2)
            );
            tx.execute(&sql, &with_expect(vec![&ids], &expect))
                .await
                .map_err(refused)?
        }
    };
    if touched == 0 {
        // Either the condition failed (the row is there: 409 with it) or there is no such
        // row the user may see.
        let sql = format!(
            "SELECT {} FROM {table} t WHERE {}",
            entity.row_json_sql(),
            entity.key_in_sql(1)
        );
        let current = tx
            .query_opt(&sql, &[&ids])
            .await
            .map_err(ApiError::from_db)?;
        return Err(match current {
            Some(row) => ApiError::conflict(row.get::<_, Value>(0)),
            None => ApiError::not_found(format!("no {} with id {}", entity.code, ids[0])),
        });
    }
    Ok(())
}
