//! Row-level-security policies compiled by the extension (`sync.policy_plan`) and evaluated
//! here, in memory, for any number of groups of subscribers (a role and its claims), so that
//! judging a change costs no query per group. Pure: no I/O.
//!
//! The extension hands over the quals PostgreSQL itself would apply to a SELECT by the role
//! (policy selection and combination are PostgreSQL's), when they are made of columns,
//! claims (`current_setting('request.jwt.claims', true)::jsonb ->> 'k'`, perhaps cast),
//! constants, comparisons, IN lists, `?`, IS NULL, AND, OR and NOT. They are evaluated with
//! SQL's three-valued logic, and a row is visible when they are TRUE, as in PostgreSQL.
//!
//! Scale: the quals are turned into a disjunction of conjunctions; in each, a literal
//! `column = claim` (or `claim ? column`) indexes the groups by their claim's value, so a row
//! image finds the groups that may see it by one lookup per disjunct, whatever the number
//! of groups. What cannot be indexed is evaluated per group, still in memory.

use serde_json::{Map, Value};
use std::collections::HashMap;

/// A compiled expression (the extension's JSON, parsed).
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    Const(Option<bool>),
    Cmp {
        op: CmpOp,
        ty: Ty,
        left: Term,
        right: Term,
    },
    IsNull(Term),
    IsNotNull(Term),
    /// `<claim json> ? item`: the claim (an array, object or string) holds `item`.
    Contains {
        claim: Vec<String>,
        item: Term,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// The type operands are compared as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Text,
    Int,
    Bool,
    Uuid,
}

/// The type a claim's text is cast to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cast {
    Int2,
    Int4,
    Int8,
    Uuid,
    Bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Term {
    Column(String),
    /// `->> 'k'` down a path of the claims, cast when `cast` says.
    Claim {
        path: Vec<String>,
        cast: Option<Cast>,
    },
    /// A constant: its text (or a bool), as its type prints it.
    Value(Value),
}

/// Why an expression could not be evaluated for a group: what would have raised in
/// PostgreSQL (a claim that is not a valid value of its cast).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("claim {claim:?} is not a valid {ty}: {text:?}")]
pub struct EvalError {
    pub claim: String,
    pub ty: &'static str,
    pub text: String,
}

impl Expr {
    /// Parses the extension's JSON (see `pg_sync_ext/src/policy.rs`).
    pub fn from_json(value: &Value) -> Result<Expr, String> {
        let object = value.as_object().ok_or("an expression is an object")?;
        let list = |v: &Value| -> Result<Vec<Expr>, String> {
            v.as_array()
                .ok_or("a list of expressions")?
                .iter()
                .map(Expr::from_json)
                .collect()
        };
        if let Some(args) = object.get("and") {
            return Ok(Expr::And(list(args)?));
        }
        if let Some(args) = object.get("or") {
            return Ok(Expr::Or(list(args)?));
        }
        if let Some(arg) = object.get("not") {
            return Ok(Expr::Not(Box::new(Expr::from_json(arg)?)));
        }
        if let Some(c) = object.get("const") {
            return Ok(Expr::Const(c.as_bool()));
        }
        if let Some(t) = object.get("null") {
            return Ok(Expr::IsNull(Term::from_json(t)?));
        }
        if let Some(t) = object.get("not_null") {
            return Ok(Expr::IsNotNull(Term::from_json(t)?));
        }
        if let Some(c) = object.get("contains") {
            return Ok(Expr::Contains {
                claim: path(&c["claim"])?,
                item: Term::from_json(&c["item"])?,
            });
        }
        if let Some(op) = object.get("cmp").and_then(Value::as_str) {
            let op = match op {
                "eq" => CmpOp::Eq,
                "ne" => CmpOp::Ne,
                "lt" => CmpOp::Lt,
                "le" => CmpOp::Le,
                "gt" => CmpOp::Gt,
                "ge" => CmpOp::Ge,
                other => return Err(format!("unknown comparison {other}")),
            };
            let ty = match object.get("type").and_then(Value::as_str) {
                Some("text") => Ty::Text,
                Some("int") => Ty::Int,
                Some("bool") => Ty::Bool,
                Some("uuid") => Ty::Uuid,
                other => return Err(format!("unknown type {other:?}")),
            };
            let args = object.get("args").and_then(Value::as_array).ok_or("args")?;
            let [left, right] = args.as_slice() else {
                return Err("a comparison has two args".into());
            };
            return Ok(Expr::Cmp {
                op,
                ty,
                left: Term::from_json(left)?,
                right: Term::from_json(right)?,
            });
        }
        Err(format!("unknown expression {value}"))
    }

    /// Three-valued evaluation over a row image and a group's claims, in order, stopping as
    /// PostgreSQL's AND and OR do (at the first FALSE, the first TRUE).
    pub fn eval(
        &self,
        row: &Map<String, Value>,
        claims: &Value,
    ) -> Result<Option<bool>, EvalError> {
        Ok(match self {
            Expr::Const(c) => *c,
            Expr::And(args) => {
                let mut result = Some(true);
                for a in args {
                    match a.eval(row, claims)? {
                        Some(false) => return Ok(Some(false)),
                        None => result = None,
                        Some(true) => {}
                    }
                }
                result
            }
            Expr::Or(args) => {
                let mut result = Some(false);
                for a in args {
                    match a.eval(row, claims)? {
                        Some(true) => return Ok(Some(true)),
                        None => result = None,
                        Some(false) => {}
                    }
                }
                result
            }
            Expr::Not(a) => a.eval(row, claims)?.map(|b| !b),
            Expr::IsNull(t) => Some(t.raw(row, claims)?.is_none()),
            Expr::IsNotNull(t) => Some(t.raw(row, claims)?.is_some()),
            Expr::Cmp {
                op,
                ty,
                left,
                right,
            } => {
                let (Some(a), Some(b)) = (
                    left.typed(*ty, row, claims)?,
                    right.typed(*ty, row, claims)?,
                ) else {
                    return Ok(None);
                };
                compare(*op, &a, &b)
            }
            Expr::Contains { claim, item } => {
                let Some(item) = item.text(row, claims)? else {
                    return Ok(None);
                };
                holds(claim_value(claims, claim), &item)
            }
        })
    }
}

fn path(value: &Value) -> Result<Vec<String>, String> {
    value
        .as_array()
        .ok_or("a claim path is a list")?
        .iter()
        .map(|k| {
            k.as_str()
                .map(str::to_owned)
                .ok_or_else(|| "a claim key is text".to_owned())
        })
        .collect()
}

/// A value as a comparison sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Val {
    Text(String),
    Int(i64),
    Bool(bool),
    Uuid(u128),
}

fn compare(op: CmpOp, a: &Val, b: &Val) -> Option<bool> {
    let ordering = match (a, b) {
        (Val::Int(x), Val::Int(y)) => x.cmp(y),
        (Val::Text(x), Val::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Val::Bool(x), Val::Bool(y)) => x.cmp(y),
        (Val::Uuid(x), Val::Uuid(y)) => x.cmp(y),
        _ => return None,
    };
    use std::cmp::Ordering::*;
    Some(match op {
        CmpOp::Eq => ordering == Equal,
        CmpOp::Ne => ordering != Equal,
        CmpOp::Lt => ordering == Less,
        CmpOp::Le => ordering != Greater,
        CmpOp::Gt => ordering == Greater,
        CmpOp::Ge => ordering != Less,
    })
}

/// The JSON at a claim path (`->` steps), None when a step is missing or not an object.
fn claim_value<'a>(claims: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(claims, |v, k| v.as_object().and_then(|o| o.get(k)))
}

/// `->>`: a JSON value as text (a string itself, null as NULL, anything else as JSON).
fn json_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// jsonb's `?`: an object has the key, an array holds the string, a string is it.
fn holds(value: Option<&Value>, item: &str) -> Option<bool> {
    Some(match value? {
        Value::Null => return None,
        Value::Object(o) => o.contains_key(item),
        Value::Array(a) => a.iter().any(|e| e.as_str() == Some(item)),
        Value::String(s) => s == item,
        _ => false,
    })
}

impl Term {
    fn from_json(value: &Value) -> Result<Term, String> {
        if let Some(c) = value.get("column").and_then(Value::as_str) {
            return Ok(Term::Column(c.to_owned()));
        }
        if let Some(p) = value.get("claim") {
            let cast = match value.get("as").and_then(Value::as_str) {
                None => None,
                Some("int2") => Some(Cast::Int2),
                Some("int4") => Some(Cast::Int4),
                Some("int8") => Some(Cast::Int8),
                Some("uuid") => Some(Cast::Uuid),
                Some("bool") => Some(Cast::Bool),
                Some(other) => return Err(format!("unknown cast {other}")),
            };
            return Ok(Term::Claim {
                path: path(p)?,
                cast,
            });
        }
        if let Some(v) = value.get("value") {
            return Ok(Term::Value(v.clone()));
        }
        Err(format!("unknown term {value}"))
    }

    /// The term's value as text, as a NULL test or `?` sees it (a cast claim must parse).
    fn raw(&self, row: &Map<String, Value>, claims: &Value) -> Result<Option<String>, EvalError> {
        match self {
            Term::Claim {
                cast: Some(cast), ..
            } => {
                let ty = match cast {
                    Cast::Uuid => Ty::Uuid,
                    Cast::Bool => Ty::Bool,
                    _ => Ty::Int,
                };
                Ok(self.typed(ty, row, claims)?.map(|_| String::new()))
            }
            _ => self.text(row, claims),
        }
    }

    fn text(&self, row: &Map<String, Value>, claims: &Value) -> Result<Option<String>, EvalError> {
        Ok(match self {
            Term::Column(c) => row.get(c).and_then(json_text),
            Term::Claim { path, .. } => claim_value(claims, path).and_then(json_text),
            Term::Value(v) => json_text(v),
        })
    }

    /// The term's value as type `ty`. A claim that does not parse is an error (the cast
    /// would raise); a column or constant that does not is NULL (cannot happen: both come
    /// from values of their type).
    fn typed(
        &self,
        ty: Ty,
        row: &Map<String, Value>,
        claims: &Value,
    ) -> Result<Option<Val>, EvalError> {
        let text = match self {
            Term::Column(c) => return Ok(row.get(c).and_then(|v| json_val(v, ty))),
            Term::Value(v) => return Ok(json_val(v, ty)),
            Term::Claim { path, .. } => claim_value(claims, path).and_then(json_text),
        };
        let Some(text) = text else { return Ok(None) };
        let cast = match self {
            Term::Claim { cast, .. } => *cast,
            _ => None,
        };
        let parsed = match (cast, ty) {
            (Some(Cast::Int2), _) => {
                parse_int(&text, i16::MIN as i64, i16::MAX as i64).map(Val::Int)
            }
            (Some(Cast::Int4), _) => {
                parse_int(&text, i32::MIN as i64, i32::MAX as i64).map(Val::Int)
            }
            (Some(Cast::Int8), _) | (None, Ty::Int) => {
                parse_int(&text, i64::MIN, i64::MAX).map(Val::Int)
            }
            (Some(Cast::Uuid), _) | (None, Ty::Uuid) => parse_uuid(&text).map(Val::Uuid),
            (Some(Cast::Bool), _) | (None, Ty::Bool) => parse_bool(&text).map(Val::Bool),
            (None, Ty::Text) => Some(Val::Text(text.clone())),
        };
        match parsed {
            Some(v) => Ok(Some(v)),
            None => Err(EvalError {
                claim: match self {
                    Term::Claim { path, .. } => path.join("."),
                    _ => String::new(),
                },
                ty: match ty {
                    Ty::Int => "integer",
                    Ty::Uuid => "uuid",
                    Ty::Bool => "boolean",
                    Ty::Text => "text",
                },
                text,
            }),
        }
    }
}

/// A value of a row or a constant as type `ty`.
fn json_val(value: &Value, ty: Ty) -> Option<Val> {
    match (value, ty) {
        (Value::Null, _) => None,
        (Value::Number(n), Ty::Int) => n.as_i64().map(Val::Int),
        (Value::Bool(b), Ty::Bool) => Some(Val::Bool(*b)),
        (Value::String(s), Ty::Int) => parse_int(s, i64::MIN, i64::MAX).map(Val::Int),
        (Value::String(s), Ty::Uuid) => parse_uuid(s).map(Val::Uuid),
        (Value::String(s), Ty::Bool) => parse_bool(s).map(Val::Bool),
        (other, Ty::Text) => json_text(other).map(Val::Text),
        _ => None,
    }
}

/// PostgreSQL's integer input: surrounding spaces, a sign, decimal digits, in range.
fn parse_int(text: &str, min: i64, max: i64) -> Option<i64> {
    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = t.parse().ok()?;
    (min..=max).contains(&n).then_some(n)
}

/// PostgreSQL's uuid input: 32 hex digits, a hyphen allowed after any group of four, in
/// optional braces.
fn parse_uuid(text: &str) -> Option<u128> {
    let t = match text.strip_prefix('{') {
        Some(inner) => inner.strip_suffix('}')?,
        None => text,
    };
    let mut value: u128 = 0;
    let mut digits = 0;
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        value = (value << 4) | c.to_digit(16)? as u128;
        digits += 1;
        if digits % 4 == 0 && digits < 32 && chars.peek() == Some(&'-') {
            chars.next();
        }
    }
    (digits == 32).then_some(value)
}

/// PostgreSQL's boolean input: t/true/y/yes/on/1 and f/false/n/no/off/0, any case, any
/// unambiguous prefix, surrounding spaces.
fn parse_bool(text: &str) -> Option<bool> {
    let t = text
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| t.len() >= min && word.starts_with(t.as_str());
    if prefix_of("true", 1) || prefix_of("yes", 1) || prefix_of("on", 2) || t == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || t == "0" {
        Some(false)
    } else {
        None
    }
}

/// A group of subscribers, as `GroupIndex` knows it: an id the caller chose and the claims.
pub type GroupId = u32;

/// One literal of a disjunct: an atom, maybe negated (with SQL's NOT).
#[derive(Clone, Debug)]
struct Literal {
    expr: Expr,
    negated: bool,
}

impl Literal {
    fn eval(&self, row: &Map<String, Value>, claims: &Value) -> Result<bool, EvalError> {
        Ok(self.expr.eval(row, claims)?.map(|b| b != self.negated) == Some(true))
    }
}

/// Disjuncts of conjunctions, as many as this at most; beyond, groups are evaluated one by
/// one.
const MAX_DISJUNCTS: usize = 64;

/// An expression in disjunctive normal form (NOT pushed down to the atoms, as De Morgan's
/// laws allow in three-valued logic too): TRUE exactly when one conjunction is TRUE.
fn dnf(expr: &Expr, negated: bool) -> Option<Vec<Vec<Literal>>> {
    let (all, any) = match (expr, negated) {
        (Expr::And(args), false) | (Expr::Or(args), true) => (Some(args), None),
        (Expr::Or(args), false) | (Expr::And(args), true) => (None, Some(args)),
        (Expr::Not(inner), n) => return dnf(inner, !n),
        (atom, n) => {
            return Some(vec![vec![Literal {
                expr: atom.clone(),
                negated: n,
            }]])
        }
    };
    if let Some(args) = any {
        let mut out = Vec::new();
        for a in args {
            out.extend(dnf(a, negated)?);
            if out.len() > MAX_DISJUNCTS {
                return None;
            }
        }
        return Some(out);
    }
    let mut out: Vec<Vec<Literal>> = vec![vec![]];
    for a in all.expect("one of the two") {
        let parts = dnf(a, negated)?;
        let mut next = Vec::new();
        for left in &out {
            for right in &parts {
                next.push(left.iter().chain(right).cloned().collect());
                if next.len() > MAX_DISJUNCTS {
                    return None;
                }
            }
        }
        out = next;
    }
    Some(out)
}

fn reads_columns(expr: &Expr) -> bool {
    let term = |t: &Term| matches!(t, Term::Column(_));
    match expr {
        Expr::And(a) | Expr::Or(a) => a.iter().any(reads_columns),
        Expr::Not(a) => reads_columns(a),
        Expr::Const(_) => false,
        Expr::Cmp { left, right, .. } => term(left) || term(right),
        Expr::IsNull(t) | Expr::IsNotNull(t) => term(t),
        Expr::Contains { item, .. } => term(item),
    }
}

fn reads_claims(expr: &Expr) -> bool {
    let term = |t: &Term| matches!(t, Term::Claim { .. });
    match expr {
        Expr::And(a) | Expr::Or(a) => a.iter().any(reads_claims),
        Expr::Not(a) => reads_claims(a),
        Expr::Const(_) => false,
        Expr::Cmp { left, right, .. } => term(left) || term(right),
        Expr::IsNull(t) | Expr::IsNotNull(t) => term(t),
        Expr::Contains { .. } => true,
    }
}

/// A literal that indexes groups: `column = claim` (either side) or `claim ? column`.
#[derive(Clone, Debug)]
enum Link {
    Equal { column: String, claim: Term, ty: Ty },
    Holds { column: String, claim: Vec<String> },
}

impl Link {
    fn of(literal: &Literal) -> Option<Link> {
        if literal.negated {
            return None;
        }
        match &literal.expr {
            Expr::Cmp {
                op: CmpOp::Eq,
                ty,
                left,
                right,
            } => match (left, right) {
                (Term::Column(c), claim @ Term::Claim { .. })
                | (claim @ Term::Claim { .. }, Term::Column(c)) => Some(Link::Equal {
                    column: c.clone(),
                    claim: claim.clone(),
                    ty: *ty,
                }),
                _ => None,
            },
            Expr::Contains {
                claim,
                item: Term::Column(c),
            } => Some(Link::Holds {
                column: c.clone(),
                claim: claim.clone(),
            }),
            _ => None,
        }
    }

    /// The keys a group is filed under.
    fn keys(&self, claims: &Value) -> Result<Vec<Val>, EvalError> {
        match self {
            Link::Equal { claim, ty, .. } => {
                Ok(claim.typed(*ty, &Map::new(), claims)?.into_iter().collect())
            }
            Link::Holds { claim, .. } => Ok(match claim_value(claims, claim) {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|i| i.as_str().map(|s| Val::Text(s.to_owned())))
                    .collect(),
                Some(Value::Object(o)) => o.keys().map(|k| Val::Text(k.clone())).collect(),
                Some(Value::String(s)) => vec![Val::Text(s.clone())],
                _ => vec![],
            }),
        }
    }

    /// The key a row looks up.
    fn key(&self, row: &Map<String, Value>) -> Option<Val> {
        match self {
            Link::Equal { column, ty, .. } => row.get(column).and_then(|v| json_val(v, *ty)),
            Link::Holds { column, .. } => row.get(column).and_then(json_text).map(Val::Text),
        }
    }
}

/// One conjunction, ready for rows: its literals on the row alone, and the groups that pass
/// its literals on claims alone, by the key of its link when it has one.
struct Conjunct {
    on_row: Vec<Literal>,
    /// Literals reading both the row and the claims (beyond the link), checked per group.
    on_both: Vec<Literal>,
    link: Option<Link>,
    by_key: HashMap<Val, Vec<GroupId>>,
    groups: Vec<GroupId>,
}

/// The groups of one role, compiled against its policy: who may see a row image.
pub struct GroupIndex {
    expr: Expr,
    claims: HashMap<GroupId, Value>,
    /// None: too many disjuncts, groups are evaluated one by one.
    conjuncts: Option<Vec<Conjunct>>,
    /// Groups for which the policy raises (a claim that does not parse as its cast).
    pub failed: Vec<(GroupId, EvalError)>,
}

impl GroupIndex {
    pub fn new(expr: Expr, groups: impl IntoIterator<Item = (GroupId, Value)>) -> GroupIndex {
        let claims: HashMap<GroupId, Value> = groups.into_iter().collect();
        let mut failed: HashMap<GroupId, EvalError> = HashMap::new();
        let empty = Map::new();
        let conjuncts = dnf(&expr, false).map(|terms| {
            terms
                .into_iter()
                .map(|literals| {
                    let (mut on_row, mut on_claims, mut on_both) = (vec![], vec![], vec![]);
                    let mut link = None;
                    for l in literals {
                        match (reads_columns(&l.expr), reads_claims(&l.expr)) {
                            (_, false) => on_row.push(l),
                            (false, true) => on_claims.push(l),
                            (true, true) => match (&link, Link::of(&l)) {
                                (None, Some(found)) => link = Some(found),
                                _ => on_both.push(l),
                            },
                        }
                    }
                    let mut conjunct = Conjunct {
                        on_row,
                        on_both,
                        link,
                        by_key: HashMap::new(),
                        groups: Vec::new(),
                    };
                    for (&g, c) in &claims {
                        let passes = on_claims
                            .iter()
                            .try_fold(true, |ok, l| Ok::<_, EvalError>(ok && l.eval(&empty, c)?));
                        let keys = conjunct.link.as_ref().map(|link| link.keys(c)).transpose();
                        match (passes, keys) {
                            (Err(e), _) | (_, Err(e)) => {
                                failed.insert(g, e);
                            }
                            (Ok(false), _) => {}
                            (Ok(true), Ok(None)) => conjunct.groups.push(g),
                            (Ok(true), Ok(Some(keys))) => {
                                for k in keys {
                                    conjunct.by_key.entry(k).or_default().push(g);
                                }
                            }
                        }
                    }
                    conjunct
                })
                .collect()
        });
        let mut index = GroupIndex {
            expr,
            claims,
            conjuncts,
            failed: Vec::new(),
        };
        if index.conjuncts.is_none() {
            // Evaluated one by one: a group fails when its claims make the policy raise on
            // the first image that reaches that part; find such groups up front by an empty
            // row, where every column is NULL.
            for (&g, c) in &index.claims {
                if let Err(e) = index.expr.eval(&empty, c) {
                    failed.insert(g, e);
                }
            }
        }
        let mut failed: Vec<_> = failed.into_iter().collect();
        failed.sort_by_key(|(g, _)| *g);
        for (g, _) in &failed {
            index.claims.remove(g);
        }
        index.failed = failed;
        index
    }

    /// The groups (sorted) that may see `row`, among those that did not fail.
    pub fn visible(&self, row: &Map<String, Value>) -> Vec<GroupId> {
        let mut out = Vec::new();
        match &self.conjuncts {
            None => {
                for (&g, c) in &self.claims {
                    if self.expr.eval(row, c) == Ok(Some(true)) {
                        out.push(g);
                    }
                }
            }
            Some(conjuncts) => {
                for conjunct in conjuncts {
                    let null = Value::Null;
                    if !conjunct
                        .on_row
                        .iter()
                        .all(|l| l.eval(row, &null) == Ok(true))
                    {
                        continue;
                    }
                    let candidates = match &conjunct.link {
                        None => &conjunct.groups[..],
                        Some(link) => match link.key(row).and_then(|k| conjunct.by_key.get(&k)) {
                            Some(groups) => &groups[..],
                            None => &[],
                        },
                    };
                    for g in candidates {
                        let claims = &self.claims[g];
                        if conjunct
                            .on_both
                            .iter()
                            .all(|l| l.eval(row, claims) == Ok(true))
                        {
                            out.push(*g);
                        }
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn expr(value: Value) -> Expr {
        Expr::from_json(&value).unwrap()
    }

    fn row(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn owner_is_sub() -> Value {
        json!({"cmp": "eq", "type": "text", "args": [{"column": "owner"}, {"claim": ["sub"]}]})
    }

    #[test]
    fn three_valued_logic_as_in_sql() {
        let e = expr(json!({"or": [owner_is_sub(), {"null": {"column": "owner"}}]}));
        let alice = json!({"sub": "alice"});
        assert_eq!(
            e.eval(&row(json!({"owner": "alice"})), &alice),
            Ok(Some(true))
        );
        assert_eq!(
            e.eval(&row(json!({"owner": "bob"})), &alice),
            Ok(Some(false))
        );
        assert_eq!(e.eval(&row(json!({"owner": null})), &alice), Ok(Some(true)));
        // A missing claim is NULL: owner = NULL is NULL, and NOT NULL is NULL too.
        let not = expr(json!({"not": owner_is_sub()}));
        assert_eq!(
            not.eval(&row(json!({"owner": "bob"})), &json!({})),
            Ok(None)
        );
    }

    #[test]
    fn claims_are_cast_as_postgresql_casts_them() {
        let e = expr(
            json!({"cmp": "eq", "type": "int", "args": [{"column": "n"}, {"claim": ["app", "n"], "as": "int4"}]}),
        );
        let r = row(json!({"n": 7}));
        assert_eq!(e.eval(&r, &json!({"app": {"n": " 7 "}})), Ok(Some(true)));
        assert_eq!(e.eval(&r, &json!({"app": {"n": 7}})), Ok(Some(true)));
        assert!(e.eval(&r, &json!({"app": {"n": "seven"}})).is_err());
        assert!(e.eval(&r, &json!({"app": {"n": "3000000000"}})).is_err());
        assert_eq!(
            parse_uuid("{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}"),
            parse_uuid("a0eebc999c0b4ef8bb6d6bb9bd380a11")
        );
        assert_eq!(
            parse_uuid("a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11"),
            parse_uuid("a0eebc999c0b4ef8bb6d6bb9bd380a11")
        );
        assert_eq!(parse_uuid("a0eebc99-9c0b4ef8-bb6d-6bb9bd380a1"), None);
        assert_eq!(parse_bool(" TR "), Some(true));
        assert_eq!(parse_bool("o"), None);
        assert_eq!(parse_bool("of"), Some(false));
    }

    #[test]
    fn groups_are_found_by_their_claim_not_one_by_one() {
        let team =
            json!({"cmp": "eq", "type": "text", "args": [{"column": "team"}, {"claim": ["team"]}]});
        let published =
            json!({"cmp": "eq", "type": "bool", "args": [{"column": "public"}, {"value": true}]});
        let e = expr(json!({"or": [team, owner_is_sub(), published]}));
        let groups = (0..1000u32).map(|g| {
            (
                g,
                json!({"sub": format!("u{g}"), "team": format!("t{}", g % 10)}),
            )
        });
        let index = GroupIndex::new(e.clone(), groups);
        assert!(index.failed.is_empty());
        let r = row(json!({"team": "t3", "owner": "u5", "public": false}));
        let seen = index.visible(&r);
        assert_eq!(seen.len(), 101, "100 of team t3 and u5");
        assert!(seen.contains(&5) && seen.contains(&13) && !seen.contains(&4));
        // The same answer as evaluating each group.
        let naive: Vec<u32> = (0..1000)
            .filter(|g| {
                e.eval(
                    &r,
                    &json!({"sub": format!("u{g}"), "team": format!("t{}", g % 10)}),
                ) == Ok(Some(true))
            })
            .collect();
        assert_eq!(seen, naive);
        let all = index.visible(&row(json!({"team": "x", "owner": "x", "public": true})));
        assert_eq!(all.len(), 1000);
    }

    #[test]
    fn a_group_whose_claims_make_the_policy_raise_fails_alone() {
        let e = expr(
            json!({"cmp": "eq", "type": "int", "args": [{"column": "n"}, {"claim": ["n"], "as": "int4"}]}),
        );
        let index = GroupIndex::new(e, [(1, json!({"n": "1"})), (2, json!({"n": "x"}))]);
        assert_eq!(index.failed.len(), 1);
        assert_eq!(index.failed[0].0, 2);
        assert_eq!(index.visible(&row(json!({"n": 1}))), [1]);
    }

    #[test]
    fn membership_in_a_claim_array() {
        let e = expr(json!({"contains": {"claim": ["teams"], "item": {"column": "team"}}}));
        let index = GroupIndex::new(
            e,
            [
                (1, json!({"teams": ["a", "b"]})),
                (2, json!({"teams": ["b"]})),
                (3, json!({})),
            ],
        );
        assert_eq!(index.visible(&row(json!({"team": "b"}))), [1, 2]);
        assert_eq!(index.visible(&row(json!({"team": "a"}))), [1]);
        assert!(index.visible(&row(json!({"team": null}))).is_empty());
    }
}
