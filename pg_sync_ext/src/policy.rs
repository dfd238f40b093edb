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
use pg_sync_core::policy::{Cast, CmpOp, Expr, Group, Plan, Term, Ty, Visibility};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{JsonB, PgList};
use serde_json::{json, Value};
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
}

impl PolicyError {
    fn report(self) -> ! {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            self.to_string(),
            "sync.policy",
        )
        .report(PgLogLevel::ERROR);
        unreachable!("an ERROR does not return")
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
            .map(|&q| Compiler { relid: tbl, role }.expr(q))
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
    let quote = |s: *const std::ffi::c_char| {
        CStr::from_ptr(pg_sys::quote_identifier(s))
            .to_string_lossy()
            .into_owned()
    };
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

/// Compiles quals into the gateway's expression language, or says why they do not fit it.
struct Compiler<'a> {
    relid: pg_sys::Oid,
    /// The role the quals are for: `current_user` in them is this name.
    role: &'a str,
}

/// The comparison operators the gateway evaluates, by implementing function: the operator
/// and the type its operands are compared as.
fn comparison(function: u32) -> Option<(CmpOp, Ty)> {
    use pg_sys::*;
    use CmpOp::*;
    Some(match function {
        F_TEXTEQ | F_NAMEEQ | F_NAMEEQTEXT | F_TEXTEQNAME => (Eq, Ty::Text),
        F_TEXTNE => (Ne, Ty::Text),
        F_INT2EQ | F_INT4EQ | F_INT8EQ | F_INT24EQ | F_INT42EQ | F_INT28EQ | F_INT82EQ
        | F_INT48EQ | F_INT84EQ => (Eq, Ty::Int),
        F_INT2NE | F_INT4NE | F_INT8NE | F_INT24NE | F_INT42NE | F_INT28NE | F_INT82NE
        | F_INT48NE | F_INT84NE => (Ne, Ty::Int),
        F_INT4LT | F_INT8LT | F_INT48LT | F_INT84LT => (Lt, Ty::Int),
        F_INT4LE | F_INT8LE | F_INT48LE | F_INT84LE => (Le, Ty::Int),
        F_INT4GT | F_INT8GT | F_INT48GT | F_INT84GT => (Gt, Ty::Int),
        F_INT4GE | F_INT8GE | F_INT48GE | F_INT84GE => (Ge, Ty::Int),
        F_BOOLEQ => (Eq, Ty::Bool),
        F_BOOLNE => (Ne, Ty::Bool),
        F_UUID_EQ => (Eq, Ty::Uuid),
        F_UUID_NE => (Ne, Ty::Uuid),
        _ => return None,
    })
}

impl Compiler<'_> {
    unsafe fn expr(&self, node: *mut pg_sys::Node) -> Result<Expr, String> {
        use pg_sys::NodeTag::*;
        if pgrx::is_a(node, T_BoolExpr) {
            let b = node.cast::<pg_sys::BoolExpr>();
            let mut args = PgList::<pg_sys::Node>::from_pg((*b).args)
                .iter_ptr()
                .map(|a| self.expr(a))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(match (*b).boolop {
                pg_sys::BoolExprType::AND_EXPR => Expr::And(args),
                pg_sys::BoolExprType::OR_EXPR => Expr::Or(args),
                _ => Expr::Not(Box::new(args.pop().ok_or("NOT of nothing")?)),
            });
        }
        if pgrx::is_a(node, T_Const) {
            let c = node.cast::<pg_sys::Const>();
            if (*c).consttype == pg_sys::BOOLOID {
                return Ok(Expr::Const(self.value(node)?.as_bool()));
            }
        }
        if pgrx::is_a(node, T_OpExpr) {
            let op = node.cast::<pg_sys::OpExpr>();
            let args: Vec<*mut pg_sys::Node> = PgList::from_pg((*op).args).iter_ptr().collect();
            if let (Some((cmp, ty)), [left, right]) = (comparison((*op).opfuncid.into()), &args[..])
            {
                self.deterministic((*op).inputcollid)?;
                return Ok(Expr::Cmp {
                    op: cmp,
                    ty,
                    left: self.term(*left)?,
                    right: self.term(*right)?,
                });
            }
            if u32::from((*op).opfuncid) == pg_sys::F_JSONB_EXISTS {
                if let [array, item] = &args[..] {
                    let Some(path) = self.claim_json(*array) else {
                        return Err("jsonb ? on something other than a claim".into());
                    };
                    return Ok(Expr::Contains {
                        claim: path,
                        item: self.term(*item)?,
                    });
                }
            }
            return Err(format!(
                "operator {} is not compiled",
                u32::from((*op).opno)
            ));
        }
        if pgrx::is_a(node, T_ScalarArrayOpExpr) {
            let op = node.cast::<pg_sys::ScalarArrayOpExpr>();
            let args: Vec<*mut pg_sys::Node> = PgList::from_pg((*op).args).iter_ptr().collect();
            let (Some((cmp, ty)), [left, array]) = (comparison((*op).opfuncid.into()), &args[..])
            else {
                return Err("an ANY/ALL operator that is not compiled".into());
            };
            self.deterministic((*op).inputcollid)?;
            let left = self.term(*left)?;
            let items = self.array_items(*array)?;
            let each: Vec<Expr> = items
                .into_iter()
                .map(|item| Expr::Cmp {
                    op: cmp,
                    ty,
                    left: left.clone(),
                    right: item,
                })
                .collect();
            return Ok(if (*op).useOr {
                Expr::Or(each)
            } else {
                Expr::And(each)
            });
        }
        if pgrx::is_a(node, T_NullTest) {
            let test = node.cast::<pg_sys::NullTest>();
            let term = self.term((*test).arg.cast())?;
            return Ok(match (*test).nulltesttype {
                pg_sys::NullTestType::IS_NULL => Expr::Null(term),
                _ => Expr::NotNull(term),
            });
        }
        Err(format!("a {:?} is not compiled", (*node).type_))
    }

    /// A value a comparison reads: a column, a claim (as text, cast to the comparison's
    /// type by the gateway), or a constant.
    unsafe fn term(&self, node: *mut pg_sys::Node) -> Result<Term, String> {
        use pg_sys::NodeTag::*;
        if pgrx::is_a(node, T_RelabelType) {
            return self.term((*node.cast::<pg_sys::RelabelType>()).arg.cast());
        }
        if pgrx::is_a(node, T_CoerceViaIO) {
            // A claim cast from text: the gateway parses it as this type (and fails the group
            // when it cannot, as the cast would raise).
            let coerce = node.cast::<pg_sys::CoerceViaIO>();
            let cast = match (*coerce).resulttype {
                pg_sys::INT2OID => Cast::Int2,
                pg_sys::INT4OID => Cast::Int4,
                pg_sys::INT8OID => Cast::Int8,
                pg_sys::UUIDOID => Cast::Uuid,
                pg_sys::BOOLOID => Cast::Bool,
                _ => return Err("a cast to a type that is not compiled".into()),
            };
            if let Some(path) = self.claim_text((*coerce).arg.cast()) {
                return Ok(Term::Claim {
                    path,
                    cast: Some(cast),
                });
            }
            return Err("a cast of something other than a claim".into());
        }
        if pgrx::is_a(node, T_Var) {
            let var = node.cast::<pg_sys::Var>();
            if (*var).varno == 1 && (*var).varlevelsup == 0 && (*var).varattno > 0 {
                let name = attname(self.relid, (*var).varattno).ok_or("a dropped column")?;
                return Ok(Term::Column(name));
            }
            return Err("a column of another table".into());
        }
        if pgrx::is_a(node, T_Const) {
            return Ok(Term::Value(self.value(node)?));
        }
        if let Some(path) = self.claim_text(node) {
            return Ok(Term::Claim { path, cast: None });
        }
        if self.is_current_user(node) {
            return Ok(Term::Value(json!(self.role)));
        }
        Err(format!("a {:?} operand is not compiled", (*node).type_))
    }

    /// The elements of the array an ANY/ALL compares with: a constant array or ARRAY[...].
    unsafe fn array_items(&self, node: *mut pg_sys::Node) -> Result<Vec<Term>, String> {
        if pgrx::is_a(node, pg_sys::NodeTag::T_ArrayExpr) {
            let array = node.cast::<pg_sys::ArrayExpr>();
            return PgList::<pg_sys::Node>::from_pg((*array).elements)
                .iter_ptr()
                .map(|e| self.term(e))
                .collect();
        }
        if pgrx::is_a(node, pg_sys::NodeTag::T_Const) {
            let c = node.cast::<pg_sys::Const>();
            if (*c).constisnull {
                return Ok(Vec::new());
            }
            let values: Option<Vec<Option<String>>> = match (*c).consttype {
                pg_sys::TEXTARRAYOID | pg_sys::VARCHARARRAYOID => {
                    Vec::<Option<String>>::from_datum((*c).constvalue, false)
                }
                pg_sys::INT4ARRAYOID
                | pg_sys::INT8ARRAYOID
                | pg_sys::INT2ARRAYOID
                | pg_sys::UUIDARRAYOID
                | pg_sys::BOOLARRAYOID => {
                    // Through text: the gateway parses each as the comparison's type.
                    return Ok(parse_array_text(&output_text(
                        (*c).consttype,
                        (*c).constvalue,
                    )));
                }
                _ => return Err("an array constant of another type".into()),
            };
            return Ok(values
                .unwrap_or_default()
                .into_iter()
                .map(|v| Term::Value(json!(v)))
                .collect());
        }
        Err("an array that is not a constant or ARRAY[...]".into())
    }

    /// A constant as JSON (text of its type for the gateway to parse, or a bool).
    unsafe fn value(&self, node: *mut pg_sys::Node) -> Result<Value, String> {
        let c = node.cast::<pg_sys::Const>();
        if (*c).constisnull {
            return Ok(Value::Null);
        }
        match (*c).consttype {
            pg_sys::BOOLOID => Ok(json!(bool::from_datum((*c).constvalue, false))),
            pg_sys::TEXTOID
            | pg_sys::VARCHAROID
            | pg_sys::NAMEOID
            | pg_sys::INT2OID
            | pg_sys::INT4OID
            | pg_sys::INT8OID
            | pg_sys::UUIDOID => Ok(json!(output_text((*c).consttype, (*c).constvalue))),
            other => Err(format!("a constant of type {}", u32::from(other))),
        }
    }

    /// Texts of a string comparison must compare byte for byte, as the gateway does.
    unsafe fn deterministic(&self, collation: pg_sys::Oid) -> Result<(), String> {
        if collation == pg_sys::InvalidOid || pg_sys::get_collation_isdeterministic(collation) {
            Ok(())
        } else {
            Err("a comparison under a nondeterministic collation".into())
        }
    }

    /// `<claims json> ->> 'key'`: the claim path, when `node` is that.
    unsafe fn claim_text(&self, node: *mut pg_sys::Node) -> Option<Vec<String>> {
        let (function, base, key) = self.field_access(node)?;
        if function != pg_sys::F_JSONB_OBJECT_FIELD_TEXT
            && function != pg_sys::F_JSON_OBJECT_FIELD_TEXT
        {
            return None;
        }
        let mut path = self.claim_json(base)?;
        path.push(key);
        Some(path)
    }

    /// The claims as json(b) (`current_setting('request.jwt.claims', …)::jsonb`), or a path
    /// into them (`-> 'key'`): the path, when `node` is that.
    unsafe fn claim_json(&self, node: *mut pg_sys::Node) -> Option<Vec<String>> {
        if pgrx::is_a(node, pg_sys::NodeTag::T_CoerceViaIO) {
            let coerce = node.cast::<pg_sys::CoerceViaIO>();
            let to = (*coerce).resulttype;
            return ((to == pg_sys::JSONBOID || to == pg_sys::JSONOID)
                && self.is_claims_setting((*coerce).arg.cast()))
            .then(Vec::new);
        }
        let (function, base, key) = self.field_access(node)?;
        if function != pg_sys::F_JSONB_OBJECT_FIELD && function != pg_sys::F_JSON_OBJECT_FIELD {
            return None;
        }
        let mut path = self.claim_json(base)?;
        path.push(key);
        Some(path)
    }

    /// `base -> 'key'` or `base ->> 'key'` with a constant key: (function, base, key).
    unsafe fn field_access(
        &self,
        node: *mut pg_sys::Node,
    ) -> Option<(u32, *mut pg_sys::Node, String)> {
        if !pgrx::is_a(node, pg_sys::NodeTag::T_OpExpr) {
            return None;
        }
        let op = node.cast::<pg_sys::OpExpr>();
        let args: Vec<*mut pg_sys::Node> = PgList::from_pg((*op).args).iter_ptr().collect();
        let [base, key] = args[..] else { return None };
        if !pgrx::is_a(key, pg_sys::NodeTag::T_Const) {
            return None;
        }
        let key = key.cast::<pg_sys::Const>();
        if (*key).consttype != pg_sys::TEXTOID || (*key).constisnull {
            return None;
        }
        let key = String::from_datum((*key).constvalue, false)?;
        Some(((*op).opfuncid.into(), base, key))
    }

    /// `current_setting('request.jwt.claims'[, missing_ok])`.
    unsafe fn is_claims_setting(&self, node: *mut pg_sys::Node) -> bool {
        if !pgrx::is_a(node, pg_sys::NodeTag::T_FuncExpr) {
            return false;
        }
        let f = node.cast::<pg_sys::FuncExpr>();
        let function = u32::from((*f).funcid);
        if function != pg_sys::F_CURRENT_SETTING_TEXT
            && function != pg_sys::F_CURRENT_SETTING_TEXT_BOOL
        {
            return false;
        }
        let name = PgList::<pg_sys::Node>::from_pg((*f).args).head();
        name.is_some_and(|n| {
            pgrx::is_a(n, pg_sys::NodeTag::T_Const)
                && String::from_datum((*n.cast::<pg_sys::Const>()).constvalue, false).as_deref()
                    == Some("request.jwt.claims")
        })
    }

    /// `current_user` (or `current_role`, `user`), perhaps as text: the role of this plan.
    unsafe fn is_current_user(&self, node: *mut pg_sys::Node) -> bool {
        if pgrx::is_a(node, pg_sys::NodeTag::T_FuncExpr) {
            let f = node.cast::<pg_sys::FuncExpr>();
            if u32::from((*f).funcid) == pg_sys::F_TEXT_NAME {
                return PgList::<pg_sys::Node>::from_pg((*f).args)
                    .head()
                    .is_some_and(|a| self.is_current_user(a));
            }
        }
        if pgrx::is_a(node, pg_sys::NodeTag::T_SQLValueFunction) {
            let f = node.cast::<pg_sys::SQLValueFunction>();
            return matches!(
                (*f).op,
                pg_sys::SQLValueFunctionOp::SVFOP_CURRENT_USER
                    | pg_sys::SQLValueFunctionOp::SVFOP_CURRENT_ROLE
                    | pg_sys::SQLValueFunctionOp::SVFOP_USER
            );
        }
        false
    }
}

/// A value's text, as its type's output function writes it.
unsafe fn output_text(type_oid: pg_sys::Oid, value: pg_sys::Datum) -> String {
    let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
    pg_sys::getTypeOutputInfo(type_oid, &mut output, &mut varlena);
    let text = pg_sys::OidOutputFunctionCall(output, value);
    CStr::from_ptr(text).to_string_lossy().into_owned()
}

/// The elements of an array's text form `{a,b,"c d"}` (numbers, uuids, booleans: no quoting
/// or NULLs beyond what these types print).
fn parse_array_text(text: &str) -> Vec<Term> {
    let inner = text.trim_start_matches('{').trim_end_matches('}');
    if inner.is_empty() {
        return Vec::new();
    }
    inner
        .split(',')
        .map(|item| match item {
            "NULL" => Term::Value(Value::Null),
            "t" => Term::Value(json!(true)),
            "f" => Term::Value(json!(false)),
            other => Term::Value(json!(other.trim_matches('"'))),
        })
        .collect()
}
