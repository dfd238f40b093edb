//! Row-level security judged on row images (SPEC 2.2): which versions of a tracked table's
//! rows a role, with a token's claims, may SELECT, without reading the table.
//!
//! Which policies apply, and how they combine (permissive OR'ed, restrictive AND'ed, the
//! default deny, the owner and BYPASSRLS exemptions, FORCE ROW LEVEL SECURITY), is not
//! re-implemented here: PostgreSQL's own planner function `get_row_security_policies`
//! computes the quals it would add to a SELECT on the table by that role. They are then
//! used two ways:
//!
//! - `sync.policy_plan(tbl, role)` compiles them, when they have a simple shape (columns
//!   compared with claims, constants and `current_user`, AND/OR/NOT, IN lists, IS NULL), into
//!   a JSON expression the gateway evaluates in memory for any claims (`sync-gateway`'s
//!   `access::policy`); it also says whether the role may SELECT at all and which columns the
//!   quals read (all of them must be published, or images cannot be judged).
//! - `sync.visible(tbl, groups, images)` evaluates them over the images for each group
//!   (a role and its claims), as that role, for quals of any shape: one SPI query per group
//!   over `jsonb_populate_recordset(NULL::tbl, images)` with the quals deparsed into it.
//!   A group whose evaluation raises fails alone.
//!
//! Both are called by the gateway's login role for roles it can become (checked: membership,
//! as SET ROLE requires), and run as that role, so policies and what they call run with the
//! subscriber's rights, never more.

use crate::changes::invalid_parameter;
use crate::roles::as_role;
mod compile;
mod membership;

use compile::Compiler;
use pg_sync_core::policy::{Expr, Group, Member, Plan, Visibility};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{JsonB, PgList};
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};

/// The RLS quals of a SELECT on `relid` by the current user, ANDed: None when row-level
/// security does not apply to the user (disabled, owner without FORCE, BYPASSRLS).
///
/// # Safety
/// `relid` must be a table.
unsafe fn select_quals(relid: pg_sys::Oid) -> Option<Vec<*mut pg_sys::Node>> {
    pg_sys::LockRelationOid(relid, pg_sys::AccessShareLock as i32);
    let mut rte = PgBox::<pg_sys::RangeTblEntry>::alloc_node(pg_sys::NodeTag::T_RangeTblEntry);
    rte.rtekind = pg_sys::RTEKind::RTE_RELATION;
    rte.relid = relid;
    rte.relkind = pg_sys::get_rel_relkind(relid);
    rte.rellockmode = pg_sys::AccessShareLock as i32;
    rte.requiredPerms = pg_sys::ACL_SELECT as pg_sys::AclMode;
    rte.inh = true;
    let rte = rte.into_pg();
    let mut query = PgBox::<pg_sys::Query>::alloc_node(pg_sys::NodeTag::T_Query);
    query.commandType = pg_sys::CmdType::CMD_SELECT;
    query.rtable = pg_sys::lappend(std::ptr::null_mut(), rte.cast());
    let (mut quals, mut checks) = (std::ptr::null_mut(), std::ptr::null_mut());
    let (mut applies, mut sublinks) = (false, false);
    pg_sys::get_row_security_policies(
        query.into_pg(),
        rte,
        1,
        &mut quals,
        &mut checks,
        &mut applies,
        &mut sublinks,
    );
    // (No quals although it "applies": the owner or a BYPASSRLS role, exempt for now.)
    let quals: Vec<_> = PgList::<pg_sys::Node>::from_pg(quals).iter_ptr().collect();
    (applies && !quals.is_empty()).then_some(quals)
}

/// Why the current user may not SELECT the table at all, if so: as PostgreSQL would refuse
/// it (the table's privilege, its schema's USAGE), and, beyond PostgreSQL, a role that
/// bypasses row-level security (the gateway never acts as one; an open subscription of a role
/// altered since is refused here rather than shown every row).
unsafe fn refusal(relid: pg_sys::Oid) -> Option<String> {
    let user = pg_sys::GetUserId();
    if pg_sys::superuser_arg(user) || pg_sys::has_bypassrls_privilege(user) {
        return Some("the role bypasses row-level security".into());
    }
    let namespace = pg_sys::get_rel_namespace(relid);
    if pg_sys::pg_namespace_aclcheck(namespace, user, pg_sys::ACL_USAGE as pg_sys::AclMode)
        != pg_sys::AclResult::ACLCHECK_OK
    {
        return Some("no USAGE on the table's schema".into());
    }
    if pg_sys::pg_class_aclcheck(relid, user, pg_sys::ACL_SELECT as pg_sys::AclMode)
        != pg_sys::AclResult::ACLCHECK_OK
    {
        return Some("no SELECT on the table".into());
    }
    None
}

/// Why a role's policies cannot be judged here.
#[derive(Debug, thiserror::Error)]
enum PolicyError {
    #[error("role {0} does not exist")]
    NoRole(String),
    #[error("the gateway's role cannot act as {0} (GRANT {0} TO it)")]
    NotMember(String),
    /// Dropped since the caller read its catalog (a table replaced under the same entity
    /// code, say): the caller reads its catalog again.
    #[error("pg_sync: the table of oid {0} no longer exists")]
    NoTable(u32),
    /// A membership table read for a compiled policy (`members`) cannot be read as the plan
    /// said.
    #[error("pg_sync: the membership table cannot be read as compiled: {0}")]
    Membership(String),
}

impl PolicyError {
    fn report(self) -> ! {
        let code = match self {
            PolicyError::NoTable(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            _ => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        };
        ErrorReport::new(code, self.to_string(), "sync.policy").report(PgLogLevel::ERROR);
        unreachable!("an ERROR does not return")
    }
}

/// Raises `NoTable` (42P01) unless `tbl` is a relation: the checks below would otherwise
/// fail on its missing schema, as an internal error.
fn require_table(tbl: pg_sys::Oid) {
    // SAFETY: a syscache lookup.
    if unsafe { pg_sys::get_rel_namespace(tbl) } == pg_sys::InvalidOid {
        PolicyError::NoTable(tbl.to_u32()).report();
    }
}

/// `role`'s oid, if the calling role may become it (as SET ROLE would allow).
fn role_for_caller(role: &str) -> Result<pg_sys::Oid, PolicyError> {
    let name = CString::new(role).map_err(|_| PolicyError::NoRole(role.to_owned()))?;
    // SAFETY: catalog lookups.
    unsafe {
        let oid = pg_sys::get_role_oid(name.as_ptr(), true);
        if oid == pg_sys::InvalidOid {
            return Err(PolicyError::NoRole(role.to_owned()));
        }
        if !pg_sys::is_member_of_role(pg_sys::GetUserId(), oid) {
            return Err(PolicyError::NotMember(role.to_owned()));
        }
        Ok(oid)
    }
}

/// What the gateway needs to judge `role`'s reads of `tbl` (see the module's doc): a
/// `pg_sync_core::policy::Plan` as JSON.
#[pg_extern(volatile, parallel_unsafe)]
fn policy_plan(tbl: pg_sys::Oid, role: &str) -> JsonB {
    require_table(tbl);
    let roleid = role_for_caller(role).unwrap_or_else(|e| e.report());
    let plan = as_role(roleid, || unsafe {
        if let Some(why) = refusal(tbl) {
            return Plan {
                why: Some(why),
                ..Plan::default()
            };
        }
        let Some(quals) = select_quals(tbl) else {
            return Plan {
                select: true,
                ..Plan::default()
            };
        };
        let columns = referenced_columns(tbl, &quals);
        let compiled = quals
            .iter()
            .map(|&q| {
                Compiler {
                    relid: tbl,
                    role,
                    negated: Default::default(),
                }
                .expr(q)
            })
            .collect::<Result<Vec<_>, String>>();
        let (expr, why) = match compiled {
            Ok(mut exprs) if exprs.len() == 1 => (Some(exprs.remove(0)), None),
            Ok(exprs) => (Some(Expr::And(exprs)), None),
            Err(why) => (None, Some(why)),
        };
        Plan {
            select: true,
            rls: true,
            columns,
            expr,
            why,
        }
    });
    JsonB(serde_json::to_value(plan).expect("plans serialize"))
}

/// For each group (`pg_sync_core::policy::Group`), whether it may see each image (a JSON
/// object of the table's columns): a `Visibility` per group, in the groups' order.
#[pg_extern(volatile, parallel_unsafe)]
fn visible(tbl: pg_sys::Oid, groups: JsonB, images: JsonB) -> JsonB {
    require_table(tbl);
    let groups: Vec<Group> = match serde_json::from_value(groups.0) {
        Ok(groups) => groups,
        Err(e) => invalid_parameter(format!("groups: {e}")),
    };
    let images = images.0;
    let count = images.as_array().map_or(0, Vec::len);
    let mut by_role: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        by_role.entry(&g.role).or_default().push(i);
    }
    let mut answers = vec![Visibility::Visible(Vec::new()); groups.len()];
    let original_claims = claims_setting();
    for (role, members) in by_role {
        let roleid = match role_for_caller(role) {
            Ok(oid) => oid,
            Err(e) => {
                for i in members {
                    answers[i] = Visibility::Error(e.to_string());
                }
                continue;
            }
        };
        as_role(roleid, || unsafe {
            if let Some(why) = refusal(tbl) {
                for &i in &members {
                    answers[i] =
                        Visibility::Error(format!("{role} may not read this table: {why}"));
                }
                return;
            }
            let Some(quals) = select_quals(tbl) else {
                for &i in &members {
                    answers[i] = Visibility::Visible(vec![true; count]);
                }
                return;
            };
            let sql = visibility_sql(tbl, &quals);
            for &i in &members {
                let claims = groups[i].claims.to_string();
                answers[i] = match in_subtransaction(|| evaluate(&sql, &claims, &images)) {
                    Ok(visible) => Visibility::Visible(visible),
                    Err(message) => Visibility::Error(message),
                };
            }
        });
    }
    set_claims(original_claims.as_deref().unwrap_or(""));
    JsonB(serde_json::to_value(answers).expect("answers serialize"))
}

/// The rows of a membership table (`pg_sync_core::policy::Member`, from a plan of `role`'s)
/// whose key is one of `keys` (texts of the key's type) and whose fields read one of the
/// tuples of `wanted` (a JSON array of arrays of texts, one text per field: what the
/// gateway's groups' claims ask for), read as `role`: their distinct fields, as text, by the
/// key's text, `{"7": [["alice"], ["bob"]]}`. Asking only for what some group can match
/// bounds the answer by the keys and groups, not by the table: a writer of the table who
/// piles rows under a key (or duplicates one) makes it no larger for anyone else. The rows
/// under the keys are still scanned: past `MEMBER_ROWS_SCANNED` of them the answer is JSON
/// `null`, and the gateway has the database judge those groups instead (the policy's own
/// EXISTS, as any SELECT of the table runs it: with an index on the key and the compared
/// column, it probes only the rows it needs). Raises when the role may not read the table
/// or row-level security applies to it now (the plan no longer holds: the gateway refuses
/// and reads it again).
#[pg_extern(volatile, parallel_unsafe)]
fn members(role: &str, member: JsonB, keys: Vec<Option<String>>, wanted: JsonB) -> JsonB {
    let member: Member = match serde_json::from_value(member.0) {
        Ok(member) => member,
        Err(e) => invalid_parameter(format!("member: {e}")),
    };
    let table = pg_sys::Oid::from(member.table);
    require_table(table);
    let roleid = role_for_caller(role).unwrap_or_else(|e| e.report());
    let answer = as_role(roleid, || unsafe {
        if let Some(why) = refusal(table) {
            PolicyError::Membership(why).report();
        }
        if pg_sys::check_enable_rls(table, pg_sys::InvalidOid, true)
            != pg_sys::CheckEnableRlsResult::RLS_NONE as i32
        {
            PolicyError::Membership("row-level security applies to it".into()).report();
        }
        let sql =
            members_sql(table, &member).unwrap_or_else(|why| PolicyError::Membership(why).report());
        read_one::<JsonB>(&sql, &[keys.into(), wanted.into()])
    });
    answer.unwrap_or_else(|| JsonB(Value::Object(Default::default())))
}

/// The most rows of a membership table `members` scans under a page's keys.
const MEMBER_ROWS_SCANNED: i64 = 100_000;

/// `SELECT jsonb_object_agg(key, rows)` of the membership table's distinct (key, fields)
/// whose key is in `$1` and whose fields, as text, are one of the tuples of `$2`
/// (`[["alice", "3"], …]`):
/// identifiers quoted, the key cast to its column's type (its text is of that type: the
/// gateway sends values of the row's column, which has it too). The gateway compares
/// fields by their text too (`eval::Val::pg_text`), so the filter drops no row it matches.
unsafe fn members_sql(table: pg_sys::Oid, member: &Member) -> Result<String, String> {
    // The column the policy reads, by number, still under the name the plan knows it by.
    let column = |name: &str, attnum: i16| -> Result<(String, pg_sys::Oid), String> {
        let c = CString::new(name).map_err(|_| format!("no column {name:?}"))?;
        if attnum <= 0 || pg_sys::get_attnum(table, c.as_ptr()) != attnum {
            return Err(format!("column {name:?} was renamed, replaced or dropped"));
        }
        Ok((quote(c.as_ptr()), pg_sys::get_atttype(table, attnum)))
    };
    let (key, key_type) = column(&member.key, member.key_attnum)?;
    let fields = member
        .fields
        .iter()
        .map(|f| column(&f.field, f.attnum).map(|(name, _)| format!("m.{name}::pg_catalog.text")))
        .collect::<Result<Vec<_>, _>>()?;
    let relname = pg_sys::get_rel_name(table);
    let schema = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(table));
    let key_type = CStr::from_ptr(pg_sys::format_type_be_qualified(key_type)).to_string_lossy();
    Ok(format!(
        "SELECT CASE
           WHEN (SELECT pg_catalog.count(*) FROM (
                    SELECT FROM {table} m WHERE {under_keys} LIMIT {cap} + 1) scanned) > {cap}
           THEN 'null'::pg_catalog.jsonb
           ELSE COALESCE((
             SELECT pg_catalog.jsonb_object_agg(k, v) FROM (
               SELECT k, pg_catalog.jsonb_agg(f) AS v FROM (
                 SELECT DISTINCT m.{key}::pg_catalog.text AS k, pg_catalog.jsonb_build_array({fields}) AS f
                   FROM {table} m
                  WHERE {under_keys}
                    AND pg_catalog.jsonb_build_array({fields})
                        IN (SELECT pg_catalog.jsonb_array_elements($2))) matched
                GROUP BY k) by_key), '{{}}'::pg_catalog.jsonb)
         END",
        table = format!(
            "{}{}.{}",
            if member.only { "ONLY " } else { "" },
            quote(schema),
            quote(relname)
        ),
        under_keys = format!("m.{key} = ANY ($1::pg_catalog.text[]::{key_type}[])"),
        fields = fields.join(", "),
        cap = MEMBER_ROWS_SCANNED,
    ))
}

/// The one value a read-only query returns. Read-only as SPI means it (pgrx's
/// `Spi::get_one*` run queries read-write, which takes a transaction id: a hot standby has
/// none to give).
fn read_one<T: pgrx::FromDatum + pgrx::IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Option<T> {
    Spi::connect(|client| {
        client
            .select(sql, Some(1), args)
            .expect("a read-only query runs")
            .first()
            .get_one::<T>()
            .ok()
            .flatten()
    })
}

unsafe fn quote(name: *const std::ffi::c_char) -> String {
    CStr::from_ptr(pg_sys::quote_identifier(name))
        .to_string_lossy()
        .into_owned()
}

/// Runs the visibility query for one claim set: a bool per image.
fn evaluate(sql: &str, claims: &str, images: &Value) -> Vec<bool> {
    set_claims(claims);
    Spi::connect(|client| {
        client
            .select(sql, None, &[JsonB(images.clone()).into()])
            .expect("the visibility query runs")
            .map(|row| row.get::<bool>(1).ok().flatten().unwrap_or(false))
            .collect()
    })
}

/// `SELECT <quals> IS TRUE FROM jsonb_populate_recordset(NULL::tbl, $1) AS <relname>`: the
/// quals deparsed as for the table itself, over records built from the images, in order.
unsafe fn visibility_sql(relid: pg_sys::Oid, quals: &[*mut pg_sys::Node]) -> String {
    let relname = pg_sys::get_rel_name(relid);
    let context = pg_sys::deparse_context_for(relname, relid);
    let quals: Vec<String> = quals
        .iter()
        .map(|&q| {
            let text = pg_sys::deparse_expression(q, context, false, false);
            format!("({})", CStr::from_ptr(text).to_string_lossy())
        })
        .collect();
    let schema = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
    format!(
        "SELECT ({}) IS TRUE FROM pg_catalog.jsonb_populate_recordset(NULL::{}.{}, $1) AS {}",
        quals.join(" AND "),
        quote(schema),
        quote(relname),
        quote(relname)
    )
}

/// The current value of `request.jwt.claims`, to put back afterwards.
fn claims_setting() -> Option<String> {
    crate::log::setting(c"request.jwt.claims")
}

fn set_claims(claims: &str) {
    let value = CString::new(claims).unwrap_or_default();
    // SAFETY: sets a user-settable placeholder for the rest of the transaction.
    unsafe {
        pg_sys::set_config_option(
            c"request.jwt.claims".as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// Runs `f` in a subtransaction, as a PL/pgSQL exception block does: an error inside rolls
/// the subtransaction back and comes back as its message.
fn in_subtransaction<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    // SAFETY: the same steps as PL/pgSQL's exec_stmt_block around a subtransaction.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            let value = f();
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
            Ok(value)
        }))
        .catch_others(|caught| {
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
            Err(match caught {
                pgrx::pg_sys::panic::CaughtError::PostgresError(report)
                | pgrx::pg_sys::panic::CaughtError::ErrorReport(report) => {
                    report.message().to_owned()
                }
                pgrx::pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                    ereport.message().to_owned()
                }
            })
        })
        .execute()
    }
}

/// The table's columns the quals read, also from inside their subqueries.
unsafe fn referenced_columns(relid: pg_sys::Oid, quals: &[*mut pg_sys::Node]) -> Vec<String> {
    struct Walk {
        level: u32,
        attnos: Vec<i16>,
    }
    unsafe extern "C-unwind" fn walker(
        node: *mut pg_sys::Node,
        context: *mut std::ffi::c_void,
    ) -> bool {
        if node.is_null() {
            return false;
        }
        let walk = &mut *context.cast::<Walk>();
        if pgrx::is_a(node, pg_sys::NodeTag::T_Var) {
            let var = node.cast::<pg_sys::Var>();
            if (*var).varno == 1 && (*var).varlevelsup == walk.level {
                walk.attnos.push((*var).varattno);
            }
            return false;
        }
        if pgrx::is_a(node, pg_sys::NodeTag::T_Query) {
            walk.level += 1;
            let done = pg_sys::query_tree_walker(node.cast(), Some(walker), context, 0);
            walk.level -= 1;
            return done;
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    let mut walk = Walk {
        level: 0,
        attnos: Vec::new(),
    };
    for &q in quals {
        walker(q, (&mut walk as *mut Walk).cast());
    }
    let mut attnos: Vec<i16> = if walk.attnos.contains(&0) {
        // A whole-row reference reads every column.
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as i32);
        let desc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let all = desc
            .iter()
            .filter(|a| !a.is_dropped())
            .map(|a| a.attnum)
            .collect();
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        all
    } else {
        walk.attnos.into_iter().filter(|&a| a > 0).collect()
    };
    attnos.sort_unstable();
    attnos.dedup();
    attnos
        .into_iter()
        .filter_map(|a| attname(relid, a))
        .collect()
}

unsafe fn attname(relid: pg_sys::Oid, attno: i16) -> Option<String> {
    let name = pg_sys::get_attname(relid, attno, true);
    (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
}
