//! The rows of membership tables that a page's images match, for policies compiled with
//! `Expr::Member`: read once per page and role (`sync.members`, as the role), then looked up
//! in memory for every image and group.

use super::eval::{json_text, json_val, typed, Row, Val};
use pg_sync_core::policy::{Expr, Member};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// The fields (text or null) of a membership table's rows, by their key.
type RowsByKey = HashMap<Val, Vec<Vec<Value>>>;

/// Per membership a policy asks about: the rows of its table that the images match.
#[derive(Default)]
pub struct Memberships {
    tables: Vec<(Member, RowsByKey)>,
}

impl Memberships {
    /// The memberships `expr` asks about, each once.
    pub fn asked(expr: &Expr) -> Vec<&Member> {
        let mut out = Vec::new();
        expr.each(&mut |e| match e {
            Expr::Member(m) if !out.contains(&m) => out.push(m),
            _ => {}
        });
        out
    }

    /// The keys `member` is asked for by `images` (their column's values, as text), each once.
    pub fn keys(member: &Member, images: &[&Map<String, Value>]) -> Vec<String> {
        let mut keys: Vec<String> = images
            .iter()
            .filter_map(|i| i.get(&member.column).and_then(json_text))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// What `member`'s fields must read, as text, for a row to match one of `claims`: each
    /// group's tuple once. A group whose terms are null or fail matches no row, nor does a
    /// text holding NUL, which no PostgreSQL text holds (and jsonb refuses: sent, it would
    /// fail the read for the whole role). Only rows holding one are answered, so that rows
    /// nobody can match, however many, are not.
    pub fn wanted<'a>(
        member: &Member,
        claims: impl Iterator<Item = &'a Value>,
    ) -> Vec<Vec<String>> {
        let no_row = Map::new();
        let mut wanted: Vec<Vec<String>> = claims
            .filter_map(|claims| {
                member
                    .fields
                    .iter()
                    .map(|f| {
                        let text = typed(&f.term, f.ty, &no_row, claims).ok()??.pg_text();
                        (!text.contains('\0')).then_some(text)
                    })
                    .collect()
            })
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        wanted
    }

    /// Adds what `sync.members` answered for `member`: `{key text: [[field, …], …]}`.
    pub fn insert(&mut self, member: Member, answer: Value) {
        let Value::Object(by_key) = answer else {
            self.tables.push((member, HashMap::new()));
            return;
        };
        let rows = by_key
            .into_iter()
            .filter_map(|(key, rows)| {
                let key = json_val(&Value::String(key), member.ty)?;
                let rows = match rows {
                    Value::Array(rows) => rows
                        .into_iter()
                        .filter_map(|r| match r {
                            Value::Array(fields) => Some(fields),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Some((key, rows))
            })
            .collect();
        self.tables.push((member, rows));
    }

    /// `image` as a policy reads it, with these memberships.
    pub fn row<'a>(&'a self, image: &'a Map<String, Value>) -> WithMembers<'a> {
        WithMembers {
            image,
            memberships: self,
        }
    }
}

/// An image and the membership rows that match it.
pub struct WithMembers<'a> {
    image: &'a Map<String, Value>,
    memberships: &'a Memberships,
}

impl Row for WithMembers<'_> {
    fn column(&self, name: &str) -> Option<&Value> {
        self.image.get(name)
    }

    fn members(&self, member: &Member) -> &[Vec<Value>] {
        let key = self
            .image
            .get(&member.column)
            .and_then(|v| json_val(v, member.ty));
        self.memberships
            .tables
            .iter()
            .find(|(m, _)| m == member)
            .zip(key)
            .and_then(|((_, rows), key)| rows.get(&key))
            .map_or(&[], Vec::as_slice)
    }
}
