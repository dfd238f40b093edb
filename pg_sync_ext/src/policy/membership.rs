//! Membership subqueries in a policy (`EXISTS (SELECT 1 FROM m WHERE m.k = row.c AND m.u =
//! claim)`, `row.c IN (SELECT m.k FROM m WHERE m.u = claim)`), compiled into
//! `pg_sync_core::policy::Member` when the gateway can read the membership table exactly as
//! the policy does.

use super::attname;
use super::compile::{comparison, strip, var, Compiler};
use pg_sync_core::policy::{CmpOp, Member, MemberField, Ty};
use pgrx::prelude::*;
use pgrx::PgList;

/// The key types a membership subquery may join on: their text is the same on both sides.
const MEMBER_KEY_TYPES: [pg_sys::Oid; 6] = [
    pg_sys::INT2OID,
    pg_sys::INT4OID,
    pg_sys::INT8OID,
    pg_sys::TEXTOID,
    pg_sys::VARCHAROID,
    pg_sys::UUIDOID,
];

impl Compiler<'_> {
    /// `EXISTS (SELECT 1 FROM m WHERE m.key = row.column AND m.field = term …)` or, not under
    /// a NOT, `row.column IN (SELECT m.key FROM m WHERE m.field = term …)`: equalities only,
    /// one on the row's column, the others on claims or constants, over a table the role may
    /// read, without row-level security for it (its policies would read the claims), and that
    /// pg_sync watches for this table's policies (so that a change of it refetches).
    pub(super) unsafe fn membership(&self, link: *mut pg_sys::SubLink) -> Result<Member, String> {
        use pg_sys::SubLinkType::*;
        let not_compiled = |why: &str| Err(format!("a subquery {why} is not compiled"));
        let in_form = match (*link).subLinkType {
            EXISTS_SUBLINK => false,
            ANY_SUBLINK if !self.negated.get() => true,
            ANY_SUBLINK => return not_compiled("IN under NOT"),
            _ => return not_compiled("other than EXISTS or IN"),
        };
        let query = (*link).subselect.cast::<pg_sys::Query>();
        if !pgrx::is_a(query.cast(), pg_sys::NodeTag::T_Query) {
            return not_compiled("of this kind");
        }
        let q = &*query;
        if q.commandType != pg_sys::CmdType::CMD_SELECT
            || q.hasAggs
            || q.hasWindowFuncs
            || q.hasTargetSRFs
            || q.hasSubLinks
            || q.hasRecursive
            || q.hasModifyingCTE
            || q.hasForUpdate
            || !q.cteList.is_null()
            || !q.groupClause.is_null()
            || !q.groupingSets.is_null()
            || !q.havingQual.is_null()
            || !q.limitCount.is_null()
            || !q.limitOffset.is_null()
            || !q.setOperations.is_null()
        {
            return not_compiled("with more than FROM and WHERE");
        }
        let rtable: Vec<*mut pg_sys::RangeTblEntry> =
            PgList::<pg_sys::RangeTblEntry>::from_pg(q.rtable)
                .iter_ptr()
                .collect();
        let from: Vec<*mut pg_sys::Node> =
            PgList::from_pg((*q.jointree).fromlist).iter_ptr().collect();
        let ([rte], [from]) = (&rtable[..], &from[..]) else {
            return not_compiled("over more than one table");
        };
        if (**rte).rtekind != pg_sys::RTEKind::RTE_RELATION
            || !(**rte).tablesample.is_null()
            || !pgrx::is_a(*from, pg_sys::NodeTag::T_RangeTblRef)
            || !matches!(
                (**rte).relkind as u8,
                pg_sys::RELKIND_RELATION | pg_sys::RELKIND_PARTITIONED_TABLE
            )
        {
            return not_compiled("over something other than a table");
        }
        let table = (**rte).relid;
        let mut key: Option<(String, i16, String, pg_sys::Oid)> = None;
        let mut fields = Vec::new();
        let mut conditions = Vec::new();
        conjuncts((*q.jointree).quals, &mut conditions);
        for condition in conditions {
            let Some((ty, [left, right])) = equality(condition) else {
                return not_compiled("comparing other than by = of a compiled type");
            };
            self.collated(ty, (*condition.cast::<pg_sys::OpExpr>()).inputcollid)?;
            let (inner, other) = match (var(left, 0), var(right, 0)) {
                (Some(inner), None) => (inner, right),
                (None, Some(inner)) => (inner, left),
                _ => return not_compiled("comparing other than its table's column"),
            };
            let field = attname(table, (*inner).varattno).ok_or("a dropped column")?;
            if let Some(outer) = var(other, 1) {
                if key.is_some() || in_form {
                    return not_compiled("matching more than one column of the row");
                }
                let column = attname(self.relid, (*outer).varattno).ok_or("a dropped column")?;
                if (*outer).vartype != (*inner).vartype
                    || !MEMBER_KEY_TYPES.contains(&(*inner).vartype)
                {
                    return not_compiled("matching columns of different or other types");
                }
                key = Some((field, (*inner).varattno, column, (*inner).vartype));
                continue;
            }
            if var_anywhere(other) {
                return not_compiled("comparing columns of other levels");
            }
            let term = self.term(other)?;
            fields.push(MemberField {
                field,
                attnum: (*inner).varattno,
                ty,
                term,
            });
        }
        if in_form {
            key = self.in_key(link, q, table)?.into();
        }
        let Some((key, key_attnum, column, key_type)) = key else {
            return not_compiled("not matching a column of the row");
        };
        if fields.is_empty() {
            return not_compiled("comparing no column with a claim or constant");
        }
        readable_membership(table, self.relid)?;
        Ok(Member {
            table: table.to_u32(),
            only: !(**rte).inh,
            key,
            key_attnum,
            column,
            ty: match key_type {
                pg_sys::UUIDOID => Ty::Uuid,
                pg_sys::TEXTOID | pg_sys::VARCHAROID => Ty::Text,
                _ => Ty::Int,
            },
            fields,
        })
    }

    /// The key of `row.column IN (SELECT m.key FROM m …)`: (m's column, the row's, their type).
    unsafe fn in_key(
        &self,
        link: *mut pg_sys::SubLink,
        q: &pg_sys::Query,
        table: pg_sys::Oid,
    ) -> Result<(String, i16, String, pg_sys::Oid), String> {
        let not_compiled = || Err("an IN subquery of this shape is not compiled".to_owned());
        let targets: Vec<*mut pg_sys::TargetEntry> =
            PgList::<pg_sys::TargetEntry>::from_pg(q.targetList)
                .iter_ptr()
                .filter(|t| !(**t).resjunk)
                .collect();
        let (Some((_, [left, right])), [target]) = (equality((*link).testexpr), &targets[..])
        else {
            return not_compiled();
        };
        let ty = equality((*link).testexpr)
            .map(|(ty, _)| ty)
            .unwrap_or(Ty::Int);
        self.collated(ty, (*(*link).testexpr.cast::<pg_sys::OpExpr>()).inputcollid)?;
        let (Some(outer), Some(inner)) = (var(left, 0), var((**target).expr.cast(), 0)) else {
            return not_compiled();
        };
        if !pgrx::is_a(strip(right), pg_sys::NodeTag::T_Param)
            || (*outer).vartype != (*inner).vartype
            || !MEMBER_KEY_TYPES.contains(&(*inner).vartype)
        {
            return not_compiled();
        }
        Ok((
            attname(table, (*inner).varattno).ok_or("a dropped column")?,
            (*inner).varattno,
            attname(self.relid, (*outer).varattno).ok_or("a dropped column")?,
            (*inner).vartype,
        ))
    }
}

/// Whether `node` reads a column at all (of any query level).
unsafe fn var_anywhere(node: *mut pg_sys::Node) -> bool {
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, _: *mut std::ffi::c_void) -> bool {
        !node.is_null()
            && (pgrx::is_a(node, pg_sys::NodeTag::T_Var)
                || pg_sys::expression_tree_walker(node, Some(walker), std::ptr::null_mut()))
    }
    walker(node, std::ptr::null_mut())
}

/// The terms of a WHERE clause's top-level AND.
unsafe fn conjuncts(node: *mut pg_sys::Node, out: &mut Vec<*mut pg_sys::Node>) {
    if node.is_null() {
        return;
    }
    if pgrx::is_a(node, pg_sys::NodeTag::T_BoolExpr)
        && (*node.cast::<pg_sys::BoolExpr>()).boolop == pg_sys::BoolExprType::AND_EXPR
    {
        for arg in
            PgList::<pg_sys::Node>::from_pg((*node.cast::<pg_sys::BoolExpr>()).args).iter_ptr()
        {
            conjuncts(arg, out);
        }
        return;
    }
    if pgrx::is_a(node, pg_sys::NodeTag::T_List) {
        for arg in PgList::<pg_sys::Node>::from_pg(node.cast()).iter_ptr() {
            conjuncts(arg, out);
        }
        return;
    }
    out.push(node);
}

/// `a = b` with a compiled equality: (the type compared as, [a, b]).
unsafe fn equality(node: *mut pg_sys::Node) -> Option<(Ty, [*mut pg_sys::Node; 2])> {
    if !pgrx::is_a(node, pg_sys::NodeTag::T_OpExpr) {
        return None;
    }
    let op = node.cast::<pg_sys::OpExpr>();
    let (cmp, ty) = comparison((*op).opfuncid.into())?;
    let args: Vec<*mut pg_sys::Node> = PgList::from_pg((*op).args).iter_ptr().collect();
    match (cmp, &args[..]) {
        (CmpOp::Eq, [a, b]) => Some((ty, [*a, *b])),
        _ => None,
    }
}

/// Whether the gateway may read membership `table` for the policies of `tracked` as the
/// current role: it may SELECT it, row-level security does not apply to it, and pg_sync
/// watches it for `tracked` (`sync._watch_policy_inputs`: a change of it puts an ACCESS row
/// of `tracked` into the log, where every reader of an older page learns of it).
unsafe fn readable_membership(table: pg_sys::Oid, tracked: pg_sys::Oid) -> Result<(), String> {
    if super::refusal(table).is_some() {
        return Err("a membership table the role may not read is not compiled".into());
    }
    if pg_sys::check_enable_rls(table, pg_sys::InvalidOid, true)
        != pg_sys::CheckEnableRlsResult::RLS_NONE as i32
    {
        return Err("a membership table with row-level security is not compiled".into());
    }
    let watched = super::read_one::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger g
                           JOIN pg_catalog.pg_proc f ON f.oid = g.tgfoid
                           JOIN pg_catalog.pg_namespace n ON n.oid = f.pronamespace
                         WHERE g.tgrelid = $1 AND n.nspname = 'sync' AND f.proname = '_policy_input'
                           AND pg_catalog.position('\\x00'::pg_catalog.bytea || g.tgargs,
                                                   '\\x00'::pg_catalog.bytea
                                                   || pg_catalog.convert_to($2::pg_catalog.text, 'UTF8')
                                                   || '\\x00'::pg_catalog.bytea) > 0)",
        &[table.into(), tracked.into()],
    );
    match watched {
        Some(true) => Ok(()),
        _ => Err("a membership table pg_sync does not watch is not compiled".into()),
    }
}
