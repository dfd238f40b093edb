//! The groups of one role compiled against its policy, so that a row image finds the groups
//! that may see it by one lookup per disjunct, whatever their number.
//!
//! The quals are turned into a disjunction of conjunctions; in each, a literal
//! `column = claim` (or `claim ? column`) indexes the groups by their claim's value. What
//! cannot be indexed is evaluated per group, still in memory. Groups whose claims make the
//! policy raise, and those it cannot evaluate exactly (`eval::inexact`), are set apart for
//! the caller.

use super::eval::{claim_value, eval, inexact, json_text, json_val, typed, EvalError, Row, Val};
use super::members::Memberships;
use crate::access::roles::GroupId;
use crate::model::change::AccessScope;
use pg_sync_core::policy::{CmpOp, Expr, Member, Term, Ty};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// A membership a policy asks about, with what `sync.members` reads of it made once with the
/// index, not for every page.
pub struct Asked {
    pub member: Member,
    /// `member` as JSON.
    pub member_json: Value,
    /// What the fields of its rows must read for one of the groups to match
    /// (`Memberships::wanted`), as JSON: an array of arrays of texts.
    pub wanted: Value,
}

impl Asked {
    /// Whether any group asks for its rows.
    pub fn wanted_by_any(&self) -> bool {
        self.wanted.as_array().is_some_and(|w| !w.is_empty())
    }
}

/// What a named membership row's fields read, for one membership.
enum Named {
    /// A null: `=` matches no group.
    Nobody,
    Fields(Vec<String>),
    /// Not named, or not of the field's type: any group may match.
    Unknown,
}

/// One literal of a disjunct: an atom, maybe negated (with SQL's NOT).
#[derive(Clone, Debug)]
struct Literal {
    expr: Expr,
    negated: bool,
}

impl Literal {
    fn eval<R: Row + ?Sized>(&self, row: &R, claims: &Value) -> Result<bool, EvalError> {
        Ok(eval(&self.expr, row, claims)?.map(|b| b != self.negated) == Some(true))
    }
}

/// The longest inputs of an image (`GroupIndex::inputs`) a page keeps, in bytes.
const MAX_INPUTS: usize = 1024;

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
        Expr::Null(t) | Expr::NotNull(t) => term(t),
        Expr::Contains { item, .. } => term(item),
        Expr::Member(_) => true,
    }
}

fn reads_claims(expr: &Expr) -> bool {
    let term = |t: &Term| matches!(t, Term::Claim { .. });
    match expr {
        Expr::And(a) | Expr::Or(a) => a.iter().any(reads_claims),
        Expr::Not(a) => reads_claims(a),
        Expr::Const(_) => false,
        Expr::Cmp { left, right, .. } => term(left) || term(right),
        Expr::Null(t) | Expr::NotNull(t) => term(t),
        Expr::Contains { .. } => true,
        Expr::Member(m) => m.fields.iter().any(|f| term(&f.term)),
    }
}

/// A literal that indexes groups: `column = claim` (either side), `claim ? column`, or a
/// membership whose one field is compared with a claim.
#[derive(Clone, Debug)]
enum Link {
    Equal { column: String, claim: Term, ty: Ty },
    Holds { column: String, claim: Vec<String> },
    Member(Member),
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
            Expr::Member(m) if matches!(&m.fields[..], [f] if matches!(f.term, Term::Claim { .. })) => {
                Some(Link::Member(m.clone()))
            }
            _ => None,
        }
    }

    /// The keys a group is filed under.
    fn keys(&self, claims: &Value) -> Result<Vec<Val>, EvalError> {
        match self {
            Link::Equal { claim, ty, .. } => Ok(typed(claim, *ty, &Map::new(), claims)?
                .into_iter()
                .collect()),
            Link::Member(m) => Ok(
                typed(&m.fields[0].term, m.fields[0].ty, &Map::new(), claims)?
                    .into_iter()
                    .collect(),
            ),
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

    /// The keys a row looks up.
    fn row_keys<R: Row + ?Sized>(&self, row: &R) -> Vec<Val> {
        match self {
            Link::Equal { column, ty, .. } => row
                .column(column)
                .and_then(|v| json_val(v, *ty))
                .into_iter()
                .collect(),
            Link::Holds { column, .. } => row
                .column(column)
                .and_then(json_text)
                .map(Val::Text)
                .into_iter()
                .collect(),
            Link::Member(m) => row
                .members(m)
                .iter()
                .filter_map(|fields| json_val(fields.first()?, m.fields[0].ty))
                .collect(),
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
    /// Groups this index cannot judge exactly (`eval::inexact`): the database must.
    pub inexact: Vec<GroupId>,
    /// Each membership the policy asks about.
    memberships: Vec<Asked>,
    /// Per membership (as `memberships`), the groups that ask for each field values.
    askers: Vec<HashMap<Vec<String>, Vec<GroupId>>>,
    /// The columns of a row the policy reads, each once.
    reads: Vec<String>,
}

impl GroupIndex {
    pub fn new(expr: Expr, groups: impl IntoIterator<Item = (GroupId, Value)>) -> GroupIndex {
        let (set_apart, claims): (Vec<_>, Vec<_>) =
            groups.into_iter().partition(|(_, c)| inexact(&expr, c));
        let claims: HashMap<GroupId, Value> = claims.into_iter().collect();
        let mut set_apart: Vec<GroupId> = set_apart.into_iter().map(|(g, _)| g).collect();
        set_apart.sort_unstable();
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
        // Every column of the row the policy reads: its terms', and each membership's key
        // column (its rows are found by that column's value).
        let mut reads = Vec::new();
        expr.each_term(&mut |t| {
            if let Term::Column(c) = t {
                reads.push(c.clone());
            }
        });
        expr.each(&mut |e| {
            if let Expr::Member(m) = e {
                reads.push(m.column.clone());
            }
        });
        reads.sort_unstable();
        reads.dedup();
        let mut index = GroupIndex {
            expr,
            claims,
            conjuncts,
            failed: Vec::new(),
            inexact: set_apart,
            memberships: Vec::new(),
            askers: Vec::new(),
            reads,
        };
        if index.conjuncts.is_none() {
            // Evaluated one by one: a group fails when its claims make the policy raise on
            // the first image that reaches that part; find such groups up front by an empty
            // row, where every column is NULL.
            for (&g, c) in &index.claims {
                if let Err(e) = eval(&index.expr, &empty, c) {
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
        // What each membership's rows must read for any group is what some group asks for.
        (index.memberships, index.askers) = Memberships::asked(&index.expr)
            .into_iter()
            .map(|m| {
                let mut askers: HashMap<Vec<String>, Vec<GroupId>> = HashMap::new();
                for (g, claims) in &index.claims {
                    for fields in Memberships::wanted(m, std::iter::once(claims)) {
                        askers.entry(fields).or_default().push(*g);
                    }
                }
                let mut wanted: Vec<&Vec<String>> = askers.keys().collect();
                wanted.sort_unstable();
                let asked = Asked {
                    member: m.clone(),
                    member_json: serde_json::to_value(m).expect("a member serializes"),
                    wanted: serde_json::to_value(wanted).expect("texts serialize"),
                };
                (asked, askers)
            })
            .unzip();
        index
    }

    /// Each membership the policy asks about.
    pub fn memberships(&self) -> &[Asked] {
        &self.memberships
    }

    /// The groups (sorted, of those judged here) whose sight a write of membership rows that
    /// `scopes` name may have changed: those whose policy asks about a row of that table
    /// with the fields one of the rows holds. A row lacking a field the policy compares (its
    /// trigger was made for other policies) concerns every group.
    pub fn named_by(&self, scopes: &[&AccessScope]) -> Vec<GroupId> {
        let mut out = Vec::new();
        for (Asked { member, .. }, askers) in self.memberships.iter().zip(&self.askers) {
            for row in scopes
                .iter()
                .filter(|s| s.input == member.table)
                .flat_map(|s| &s.rows)
            {
                match Self::fields(member, row) {
                    Named::Nobody => {}
                    Named::Fields(fields) => out.extend(askers.get(&fields).into_iter().flatten()),
                    Named::Unknown => {
                        out.extend(self.claims.keys());
                        break;
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// What `member`'s fields read in a named row, as `Memberships::wanted` has them (each
    /// as its type's text: a boolean column's `t` is `true`).
    fn fields(member: &Member, row: &Map<String, Value>) -> Named {
        let mut fields = Vec::with_capacity(member.fields.len());
        for f in &member.fields {
            match row.get(&f.field) {
                None => return Named::Unknown,
                Some(Value::Null) => return Named::Nobody, // `=` NULL matches no one
                Some(text) => match json_val(text, f.ty) {
                    Some(value) => fields.push(value.pg_text()),
                    None => return Named::Unknown,
                },
            }
        }
        Named::Fields(fields)
    }

    /// What `visible` depends on of an image: the values of the columns the policy reads
    /// (the membership rows of a page are found by them too), as text. Two images with the
    /// same inputs are seen by the same groups, with the same memberships: a page judges
    /// each distinct inputs once (with every subscriber in a claim set of its own, finding
    /// the groups of one image is as many lookups as there are subscribers). None past
    /// `MAX_INPUTS`: such an image is judged alone, so that values a writer made large are
    /// not kept again, escaped, beside the page.
    pub fn inputs(&self, image: &Map<String, Value>) -> Option<String> {
        let mut out = String::new();
        for column in &self.reads {
            // Control characters are escaped in JSON: neither mark can occur in a value.
            match image.get(column) {
                Some(value) => out.push_str(&value.to_string()),
                None => out.push('\u{0}'),
            }
            out.push('\u{1}');
            if out.len() > MAX_INPUTS {
                return None;
            }
        }
        Some(out)
    }

    /// The groups (sorted) that may see `row`, among those that did not fail.
    pub fn visible<R: Row + ?Sized>(&self, row: &R) -> Vec<GroupId> {
        let mut out = Vec::new();
        match &self.conjuncts {
            None => {
                for (&g, c) in &self.claims {
                    if eval(&self.expr, row, c) == Ok(Some(true)) {
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
                    let candidates: Vec<&[GroupId]> = match &conjunct.link {
                        None => vec![&conjunct.groups],
                        Some(link) => link
                            .row_keys(row)
                            .iter()
                            .filter_map(|k| conjunct.by_key.get(k).map(Vec::as_slice))
                            .collect(),
                    };
                    for g in candidates.into_iter().flatten() {
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
