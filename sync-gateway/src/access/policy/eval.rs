//! Evaluating a compiled policy (`pg_sync_core::policy::Expr`) for one row image and one
//! group's claims, with SQL's three-valued logic and PostgreSQL's input rules for the casts
//! it models: a row is visible when the quals are TRUE, as in PostgreSQL.
//!
//! Exact, or not at all: `->>` of a claim that holds an object, an array or a non-integral
//! number prints jsonb's text in PostgreSQL (`{"a": 1}`, keys in jsonb's order, numbers as
//! numeric prints them), which is not reproduced here; such a group is judged in the
//! database instead (`inexact`).

use pg_sync_core::policy::{Cast, CmpOp, Expr, Member, Term, Ty};
use serde_json::{Map, Value};

/// What an expression reads of a row: its image's columns and, for `Expr::Member`, the rows
/// of the membership table that match it (`members::WithMembers`).
pub trait Row {
    fn column(&self, name: &str) -> Option<&Value>;
    /// The fields (text or null, in `member.fields`' order) of each row of `member`'s table
    /// whose key equals this row's column.
    fn members(&self, member: &Member) -> &[Vec<Value>];
}

/// An image alone: no membership row matches it.
impl Row for Map<String, Value> {
    fn column(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }

    fn members(&self, _: &Member) -> &[Vec<Value>] {
        &[]
    }
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

/// Three-valued evaluation of `expr` over a row image and a group's claims, in order,
/// stopping as PostgreSQL's AND and OR do (at the first FALSE, the first TRUE).
pub fn eval<R: Row + ?Sized>(
    expr: &Expr,
    row: &R,
    claims: &Value,
) -> Result<Option<bool>, EvalError> {
    Ok(match expr {
        Expr::Const(c) => *c,
        Expr::And(args) => {
            let mut result = Some(true);
            for a in args {
                match eval(a, row, claims)? {
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
                match eval(a, row, claims)? {
                    Some(true) => return Ok(Some(true)),
                    None => result = None,
                    Some(false) => {}
                }
            }
            result
        }
        Expr::Not(a) => eval(a, row, claims)?.map(|b| !b),
        Expr::Null(t) => Some(raw(t, row, claims)?.is_none()),
        Expr::NotNull(t) => Some(raw(t, row, claims)?.is_some()),
        Expr::Cmp {
            op,
            ty,
            left,
            right,
        } => {
            let (Some(a), Some(b)) = (
                typed(left, *ty, row, claims)?,
                typed(right, *ty, row, claims)?,
            ) else {
                return Ok(None);
            };
            compare(*op, &a, &b)
        }
        Expr::Contains { claim, item } => {
            let Some(item) = text(item, row, claims)? else {
                return Ok(None);
            };
            holds(claim_value(claims, claim), &item)
        }
        Expr::Member(member) => {
            // The terms first, whether or not a row matches: a claim that does not parse
            // fails the group on every row alike.
            let terms = member
                .fields
                .iter()
                .map(|f| typed(&f.term, f.ty, row, claims))
                .collect::<Result<Vec<_>, _>>()?;
            let matches = |fields: &Vec<Value>| {
                fields.len() == member.fields.len()
                    && member
                        .fields
                        .iter()
                        .zip(fields)
                        .zip(&terms)
                        .all(|((f, value), term)| {
                            term.is_some() && json_val(value, f.ty).as_ref() == term.as_ref()
                        })
            };
            Some(row.members(member).iter().any(matches))
        }
    })
}

/// Whether evaluating `expr` for these claims would read, as text, a claim whose text this
/// module does not print as PostgreSQL does (an object, an array, a non-integral number
/// under `->>`, compared as text): then the database must judge for these claims.
pub fn inexact(expr: &Expr, claims: &Value) -> bool {
    let odd = |term: &Term| match term {
        Term::Claim { path, cast: None } => {
            matches!(
                claim_value(claims, path),
                Some(Value::Object(_) | Value::Array(_))
            ) || claim_value(claims, path)
                .and_then(Value::as_number)
                .is_some_and(|n| !n.is_i64() && !n.is_u64())
        }
        _ => false,
    };
    match expr {
        Expr::And(args) | Expr::Or(args) => args.iter().any(|a| inexact(a, claims)),
        Expr::Not(a) => inexact(a, claims),
        Expr::Const(_) | Expr::Null(_) | Expr::NotNull(_) => false,
        Expr::Cmp {
            ty: Ty::Text,
            left,
            right,
            ..
        } => odd(left) || odd(right),
        Expr::Cmp { .. } => false,
        Expr::Contains { item, .. } => odd(item),
        Expr::Member(member) => member
            .fields
            .iter()
            .any(|f| f.ty == Ty::Text && odd(&f.term)),
    }
}

/// A value as a comparison sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Val {
    Text(String),
    Int(i64),
    Bool(bool),
    Uuid(u128),
}

impl Val {
    /// The text PostgreSQL prints for this value (`::text`): a membership row's field, read
    /// as text, equals this value exactly when its text is this.
    pub fn pg_text(&self) -> String {
        match self {
            Val::Text(s) => s.clone(),
            Val::Int(i) => i.to_string(),
            Val::Bool(b) => b.to_string(),
            Val::Uuid(u) => {
                let h = format!("{u:032x}");
                format!(
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                )
            }
        }
    }
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
pub(super) fn claim_value<'a>(claims: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(claims, |v, k| v.as_object().and_then(|o| o.get(k)))
}

/// `->>`: a JSON value as text (a string itself, null as NULL, anything else as JSON).
pub(super) fn json_text(value: &Value) -> Option<String> {
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

/// The term's value as text, as a NULL test or `?` sees it (a cast claim must parse).
fn raw<R: Row + ?Sized>(term: &Term, row: &R, claims: &Value) -> Result<Option<String>, EvalError> {
    match term {
        Term::Claim {
            cast: Some(cast), ..
        } => {
            let ty = match cast {
                Cast::Uuid => Ty::Uuid,
                Cast::Bool => Ty::Bool,
                _ => Ty::Int,
            };
            Ok(typed(term, ty, row, claims)?.map(|_| String::new()))
        }
        _ => text(term, row, claims),
    }
}

fn text<R: Row + ?Sized>(
    term: &Term,
    row: &R,
    claims: &Value,
) -> Result<Option<String>, EvalError> {
    Ok(match term {
        Term::Column(c) => row.column(c).and_then(json_text),
        Term::Claim { path, .. } => claim_value(claims, path).and_then(json_text),
        Term::Value(v) => json_text(v),
    })
}

/// The term's value as type `ty`. A claim that does not parse is an error (the cast
/// would raise); a column or constant that does not is NULL (cannot happen: both come
/// from values of their type).
pub(super) fn typed<R: Row + ?Sized>(
    term: &Term,
    ty: Ty,
    row: &R,
    claims: &Value,
) -> Result<Option<Val>, EvalError> {
    let text = match term {
        Term::Column(c) => return Ok(row.column(c).and_then(|v| json_val(v, ty))),
        Term::Value(v) => return Ok(json_val(v, ty)),
        Term::Claim { path, .. } => claim_value(claims, path).and_then(json_text),
    };
    let Some(text) = text else { return Ok(None) };
    let cast = match term {
        Term::Claim { cast, .. } => *cast,
        _ => None,
    };
    let parsed = match (cast, ty) {
        (Some(Cast::Int2), _) => parse_int(&text, i16::MIN as i64, i16::MAX as i64).map(Val::Int),
        (Some(Cast::Int4), _) => parse_int(&text, i32::MIN as i64, i32::MAX as i64).map(Val::Int),
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
            claim: match term {
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

/// A value of a row or a constant as type `ty`.
pub(super) fn json_val(value: &Value, ty: Ty) -> Option<Val> {
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
pub(super) fn parse_uuid(text: &str) -> Option<u128> {
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
pub(super) fn parse_bool(text: &str) -> Option<bool> {
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
