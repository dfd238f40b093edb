//! Compiling a role's quals (PostgreSQL's node trees) into `pg_sync_core::policy::Expr`, for
//! the gateway to evaluate, when they have a shape it evaluates exactly: columns, claims
//! (`current_setting('request.jwt.claims', true)::jsonb ->> 'k'`, perhaps cast), constants and
//! `current_user`, comparisons under deterministic collations, IN lists, `?` on a claim, IS
//! NULL, AND, OR, NOT, and membership subqueries (`EXISTS (SELECT 1 FROM m WHERE m.k = row.c
//! AND m.u = claim)`, `row.c IN (SELECT m.k FROM m WHERE m.u = claim)`) over a table the
//! role reads without row-level security and pg_sync watches. Anything else says why it does
//! not compile, and the database judges.

use super::attname;
use pg_sync_core::policy::{Cast, CmpOp, Expr, Term, Ty};
use pgrx::prelude::*;
use pgrx::PgList;
use serde_json::{json, Value};
use std::cell::Cell;
use std::ffi::CStr;

/// Compiles quals into the gateway's expression language, or says why they do not fit it.
pub(super) struct Compiler<'a> {
    pub relid: pg_sys::Oid,
    /// The role the quals are for: `current_user` in them is this name.
    pub role: &'a str,
    /// Whether the node being compiled is under an odd number of NOTs: `x IN (SELECT …)` is
    /// NULL where the gateway says FALSE, which only a NOT tells apart.
    pub negated: Cell<bool>,
}

/// The comparison operators the gateway evaluates, by implementing function: the operator
/// and the type its operands are compared as.
pub(super) fn comparison(function: u32) -> Option<(CmpOp, Ty)> {
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
    pub unsafe fn expr(&self, node: *mut pg_sys::Node) -> Result<Expr, String> {
        use pg_sys::NodeTag::*;
        if pgrx::is_a(node, T_BoolExpr) {
            let b = node.cast::<pg_sys::BoolExpr>();
            let not = (*b).boolop == pg_sys::BoolExprType::NOT_EXPR;
            self.negated.set(self.negated.get() != not);
            let args = PgList::<pg_sys::Node>::from_pg((*b).args)
                .iter_ptr()
                .map(|a| self.expr(a))
                .collect::<Result<Vec<_>, _>>();
            self.negated.set(self.negated.get() != not);
            let mut args = args?;
            return Ok(match (*b).boolop {
                pg_sys::BoolExprType::AND_EXPR => Expr::And(args),
                pg_sys::BoolExprType::OR_EXPR => Expr::Or(args),
                _ => Expr::Not(Box::new(args.pop().ok_or("NOT of nothing")?)),
            });
        }
        if pgrx::is_a(node, T_SubLink) {
            return self.membership(node.cast()).map(Expr::Member);
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
    pub(super) unsafe fn term(&self, node: *mut pg_sys::Node) -> Result<Term, String> {
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

    /// A membership comparison of texts must have a collation: without one (two columns of
    /// conflicting collations) PostgreSQL raises at the first comparison, and sees nothing.
    pub(super) unsafe fn collated(&self, ty: Ty, collation: pg_sys::Oid) -> Result<(), String> {
        if ty == Ty::Text && collation == pg_sys::InvalidOid {
            return Err("a membership comparison of texts without a collation".into());
        }
        self.deterministic(collation)
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

/// `node` without the relabelling of a binary-compatible type.
pub(super) unsafe fn strip(mut node: *mut pg_sys::Node) -> *mut pg_sys::Node {
    while pgrx::is_a(node, pg_sys::NodeTag::T_RelabelType) {
        node = (*node.cast::<pg_sys::RelabelType>()).arg.cast();
    }
    node
}

/// `node` as a column of the first table `levels_up` queries out, if it is one.
pub(super) unsafe fn var(node: *mut pg_sys::Node, levels_up: u32) -> Option<*mut pg_sys::Var> {
    let node = strip(node);
    if !pgrx::is_a(node, pg_sys::NodeTag::T_Var) {
        return None;
    }
    let v = node.cast::<pg_sys::Var>();
    ((*v).varno == 1 && (*v).varlevelsup == levels_up && (*v).varattno > 0).then_some(v)
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
