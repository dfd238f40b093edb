//! A row-level-security policy compiled for the gateway: the quals PostgreSQL would add to a
//! SELECT of a table by a role, when they are made of columns, claims
//! (`current_setting('request.jwt.claims', true)::jsonb ->> 'k'`, perhaps cast), constants,
//! comparisons, `?`, IS NULL, AND, OR and NOT. The extension builds these values
//! (`pg_sync_ext/src/policy.rs`) and `sync.policy_plan` returns them as JSON; the gateway
//! evaluates them with SQL's three-valued logic (`sync-gateway/src/access/policy`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a role's SELECT of a table is subject to (`sync.policy_plan(tbl, role)`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The role may SELECT the table at all.
    pub select: bool,
    /// Row-level security applies to the role (not the owner, not BYPASSRLS, RLS enabled).
    pub rls: bool,
    /// The table's columns the quals read (all must be published for images to be judged).
    #[serde(default)]
    pub columns: Vec<String>,
    /// The quals compiled, when they could be; else the database evaluates them.
    #[serde(default)]
    pub expr: Option<Expr>,
    /// Why the role may not SELECT, or why the quals did not compile.
    #[serde(default)]
    pub why: Option<String>,
}

/// A compiled expression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    /// A boolean constant; None is NULL.
    Const(Option<bool>),
    Cmp {
        op: CmpOp,
        #[serde(rename = "type")]
        ty: Ty,
        left: Term,
        right: Term,
    },
    /// `IS NULL`.
    Null(Term),
    /// `IS NOT NULL`.
    NotNull(Term),
    /// `<claim json> ? item`: the claim (an array, object or string) holds `item`.
    Contains {
        claim: Vec<String>,
        item: Term,
    },
    /// A row of a membership table matches the row and the terms: `EXISTS (SELECT 1 FROM m
    /// WHERE m.key = row.column AND m.field = term …)`, or `row.column IN (SELECT m.key FROM
    /// m WHERE …)` where neither side can be NULL. TRUE or FALSE, never NULL.
    Member(Member),
}

impl Expr {
    /// Calls `f` with this expression and each one under it.
    pub fn each<'a>(&'a self, f: &mut impl FnMut(&'a Expr)) {
        f(self);
        match self {
            Expr::And(all) | Expr::Or(all) => all.iter().for_each(|e| e.each(f)),
            Expr::Not(e) => e.each(f),
            _ => {}
        }
    }

    /// Calls `f` with each term compared at any depth: both sides of a comparison, a NULL
    /// test's, a `?`'s item, each membership field's.
    pub fn each_term<'a>(&'a self, f: &mut impl FnMut(&'a Term)) {
        self.each(&mut |e| match e {
            Expr::Cmp { left, right, .. } => {
                f(left);
                f(right);
            }
            Expr::Null(t) | Expr::NotNull(t) | Expr::Contains { item: t, .. } => f(t),
            Expr::Member(m) => m.fields.iter().for_each(|field| f(&field.term)),
            Expr::And(_) | Expr::Or(_) | Expr::Not(_) | Expr::Const(_) => {}
        });
    }
}

/// The membership an `Expr::Member` asks about. The gateway reads the rows of `table` whose
/// `key` equals a row's `column` as the subscriber's role (`sync.members`), and compares
/// their fields with the terms itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The membership table's oid.
    pub table: u32,
    /// Read without its inheritance children (`FROM ONLY`), as the policy reads it.
    #[serde(default)]
    pub only: bool,
    /// The membership table's column equal to the row's `column`, both of type `ty`.
    pub key: String,
    /// The key's attribute number: the policy names columns by number, and a column
    /// renamed since (another one given the name) must not be read in its place.
    pub key_attnum: i16,
    pub column: String,
    #[serde(rename = "type")]
    pub ty: Ty,
    /// `m.field = term`, each compared as its type: all must hold for one row of `table`.
    pub fields: Vec<MemberField>,
}

/// One comparison of a membership row's column with a term (a claim, a constant).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberField {
    pub field: String,
    pub attnum: i16,
    #[serde(rename = "type")]
    pub ty: Ty,
    pub term: Term,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// The type operands are compared as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ty {
    Text,
    Int,
    Bool,
    Uuid,
}

/// The type a claim's text is cast to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cast {
    Int2,
    Int4,
    Int8,
    Uuid,
    Bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Term {
    Column(String),
    /// `->> 'k'` down a path of the claims (`-> 'a' ->> 'b'`), cast when `cast` says.
    Claim {
        path: Vec<String>,
        #[serde(rename = "as", default, skip_serializing_if = "Option::is_none")]
        cast: Option<Cast>,
    },
    /// A constant: its text as its type prints it, a bool, or null.
    Value(Value),
}

/// A group of subscribers `sync.visible(tbl, groups, images)` judges row images for: a role
/// and its claims.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub role: String,
    pub claims: Value,
}

/// What `sync.visible` answers for one group: whether it may see each image, in order, or
/// why its policies failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    Visible(Vec<bool>),
    Error(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plans_travel_as_json_and_back() {
        let plan = Plan {
            select: true,
            rls: true,
            columns: vec!["owner".into()],
            expr: Some(Expr::Or(vec![
                Expr::Cmp {
                    op: CmpOp::Eq,
                    ty: Ty::Text,
                    left: Term::Column("owner".into()),
                    right: Term::Claim {
                        path: vec!["sub".into()],
                        cast: None,
                    },
                },
                Expr::Not(Box::new(Expr::Null(Term::Value(json!("7"))))),
                Expr::Contains {
                    claim: vec!["teams".into()],
                    item: Term::Claim {
                        path: vec!["app".into(), "n".into()],
                        cast: Some(Cast::Int4),
                    },
                },
                Expr::Const(None),
            ])),
            why: None,
        };
        let text = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&text).unwrap(), plan);
        let refused: Plan =
            serde_json::from_value(json!({"select": false, "rls": false, "why": "no"})).unwrap();
        assert!(!refused.select && refused.expr.is_none());
    }
}
