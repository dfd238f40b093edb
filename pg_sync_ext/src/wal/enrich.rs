//! One wal2json change (format version 2) as the log rows it becomes, typed as the trigger
//! types them.
//!
//! Each column's text goes through the input function of the type wal2json names (the
//! column's type when the change was made), and the published columns of a row become one
//! record whose `to_jsonb` is the row's `data`: the function the trigger calls on the row, on
//! the same values, so a consumer cannot tell the paths apart except by `source`. The entity
//! id is the key columns' output text, and an UPDATE's changed columns are compared by value
//! as the trigger compares them. An UPDATE's unchanged TOASTed columns, absent from
//! wal2json's `columns`, are taken from the old row (`identity`, full under REPLICA IDENTITY
//! FULL): never recorded as NULL.
//!
//! Speed (ingest was 0.06x of wal2json's own decoding): the JSON is read in place (borrowed
//! names, raw values), type I/O functions and record shapes are looked up once per
//! `Enricher`, and what one change allocates is freed with the change.

use crate::capture::same_value;
use crate::jsonb::ToJsonb;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::hash::{DefaultHasher, Hash, Hasher};

/// One line of wal2json's output; fields a line does not have are empty.
#[derive(Deserialize)]
pub struct Change<'a> {
    #[serde(borrow)]
    pub action: Cow<'a, str>,
    #[serde(borrow, default)]
    pub schema: Cow<'a, str>,
    #[serde(borrow, default)]
    pub table: Cow<'a, str>,
    /// The commit LSN, on B and C lines.
    #[serde(borrow, default)]
    pub lsn: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub prefix: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub content: Option<Cow<'a, str>>,
    #[serde(default)]
    pub transactional: bool,
    #[serde(borrow, default)]
    pub columns: Vec<Column<'a>>,
    #[serde(borrow, default)]
    pub identity: Vec<Column<'a>>,
}

#[derive(Deserialize)]
pub struct Column<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    pub typeoid: u32,
    /// A JSON string, number, boolean or null, as wal2json wrote it.
    #[serde(borrow)]
    pub value: &'a RawValue,
}

impl<'a> Change<'a> {
    pub fn parse(line: &'a str) -> Self {
        serde_json::from_str(line).expect("wal2json writes its documented format")
    }
}

/// What a change's table publishes, as enrichment needs it.
pub struct Publication<'t> {
    /// None: every column.
    pub columns: Option<&'t [String]>,
    /// The primary key's columns in key order.
    pub key: &'t [String],
}

impl Publication<'_> {
    fn publishes(&self, column: &str) -> bool {
        self.columns
            .is_none_or(|p| p.iter().any(|c| c == column) || self.key.iter().any(|k| k == column))
    }
}

/// A log row made from a change; the datums live until the next change is enriched.
pub struct Enriched {
    pub op: &'static str,
    pub entity_id: Option<String>,
    pub data: Option<pg_sys::Datum>,
    pub old_data: Option<pg_sys::Datum>,
    pub changed: Option<Vec<String>>,
}

/// A column's value, typed.
#[derive(Clone, Copy)]
struct Typed<'c> {
    name: &'c str,
    typeoid: u32,
    /// None: NULL.
    datum: Option<pg_sys::Datum>,
}

/// A type's I/O functions, looked up once.
struct TypeIo {
    input: pg_sys::FmgrInfo,
    ioparam: pg_sys::Oid,
    output: pg_sys::FmgrInfo,
    len: i16,
    byval: bool,
}

/// Turns changes into log rows, keeping what it looked up for the life of one call (so a
/// backend that ingests every 200 ms does not grow, and a changed type is seen next call).
pub struct Enricher {
    /// Holds the function infos and record shapes; deleted with the Enricher.
    cache: PgMemoryContexts,
    /// Holds one change's values and rows; reset before each change.
    per_change: PgMemoryContexts,
    /// Boxed: function infos must not move.
    types: HashMap<u32, Box<TypeIo>>,
    /// Blessed record descriptors by a hash of their (name, type) columns.
    records: HashMap<u64, Vec<pg_sys::TupleDesc>>,
    to_jsonb: ToJsonb,
    /// A column's text with its NUL, for the input function.
    text: Vec<u8>,
}

impl Enricher {
    pub fn new() -> Self {
        let cache = PgMemoryContexts::new("pg_sync WAL types");
        let per_change = PgMemoryContexts::new("pg_sync WAL change");
        // SAFETY: RECORDOID exists; the info lives in `cache`, dropped with it.
        let to_jsonb = unsafe { ToJsonb::new(pg_sys::RECORDOID, cache.value()) };
        Enricher {
            cache,
            per_change,
            types: HashMap::new(),
            records: HashMap::new(),
            to_jsonb,
            text: Vec::new(),
        }
    }

    /// Frees what the previous change allocated; call before each change, and run the
    /// change's work (enriching, appending to the log) inside `in_change`.
    pub fn in_change<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        // SAFETY: nothing of the previous change is used any more (see `Enriched`).
        unsafe {
            self.per_change.reset();
            let context = self.per_change.value();
            PgMemoryContexts::For(context).switch_to(|_| f(self))
        }
    }

    /// The log rows of one change of a tracked table: none for an UPDATE that changes no
    /// published column, two (DELETE, INSERT) for an UPDATE of the primary key, else one.
    /// Runs type input and output functions and `to_jsonb`: call it with the table owner's
    /// rights.
    pub fn enrich(&mut self, change: &Change<'_>, publication: &Publication<'_>) -> Vec<Enriched> {
        // SAFETY: the values are texts of their types as PostgreSQL wrote them for wal2json.
        unsafe {
            let new = self.typed(&change.columns);
            let old = self.typed(&change.identity);
            let row = |op, entity_id, data, old_data, changed| Enriched {
                op,
                entity_id,
                data,
                old_data,
                changed,
            };
            match change.action.as_ref() {
                "I" => vec![row(
                    "INSERT",
                    self.entity_id(&new, publication),
                    Some(self.json(&new, publication)),
                    None,
                    None,
                )],
                "D" => vec![row(
                    "DELETE",
                    self.entity_id(&old, publication),
                    None,
                    Some(self.json(&old, publication)),
                    None,
                )],
                "T" => vec![row("TRUNCATE", None, None, None, None)],
                "U" => {
                    // Unchanged TOASTed columns are absent from `columns`: they are as they were.
                    let mut new = new;
                    for value in &old {
                        if !new.iter().any(|n| n.name == value.name) {
                            new.push(*value);
                        }
                    }
                    let (new_id, old_id) = (
                        self.entity_id(&new, publication),
                        self.entity_id(&old, publication),
                    );
                    if !old.is_empty() && new_id != old_id {
                        return vec![
                            row(
                                "DELETE",
                                old_id,
                                None,
                                Some(self.json(&old, publication)),
                                None,
                            ),
                            row(
                                "INSERT",
                                new_id,
                                Some(self.json(&new, publication)),
                                None,
                                None,
                            ),
                        ];
                    }
                    let mut changed: Vec<String> = new
                        .iter()
                        .filter(|n| publication.publishes(n.name))
                        .filter(|n| !old.iter().any(|o| self.same(o, n)))
                        .map(|n| n.name.to_owned())
                        .collect();
                    changed.sort();
                    if changed.is_empty() && !old.is_empty() {
                        return vec![];
                    }
                    let old_data = (!old.is_empty()).then(|| self.json(&old, publication));
                    vec![row(
                        "UPDATE",
                        new_id,
                        Some(self.json(&new, publication)),
                        old_data,
                        Some(changed),
                    )]
                }
                _ => vec![],
            }
        }
    }

    unsafe fn typed<'c>(&mut self, columns: &'c [Column<'_>]) -> Vec<Typed<'c>> {
        columns
            .iter()
            .map(|c| Typed {
                name: &c.name,
                typeoid: c.typeoid,
                datum: self.input(c.value, c.typeoid),
            })
            .collect()
    }

    /// A wal2json value through its type's input function; None for null.
    unsafe fn input(&mut self, value: &RawValue, typeoid: u32) -> Option<pg_sys::Datum> {
        let raw = value.get();
        let text: Cow<'_, str> = match raw.as_bytes().first() {
            Some(b'n') => return None,
            // A string, unescaped (borrowed when it has no escapes).
            Some(b'"') => serde_json::from_str::<&str>(raw)
                .map(Cow::Borrowed)
                .or_else(|_| serde_json::from_str::<String>(raw).map(Cow::Owned))
                .expect("wal2json writes valid strings"),
            // A number (its digits as PostgreSQL wrote them) or a boolean.
            _ => Cow::Borrowed(raw),
        };
        self.text.clear();
        self.text.extend_from_slice(text.as_bytes());
        self.text.push(0);
        let text = self.text.as_mut_ptr().cast();
        let io = self.type_io(typeoid);
        Some(pg_sys::InputFunctionCall(
            &mut io.input,
            text,
            io.ioparam,
            -1,
        ))
    }

    unsafe fn type_io(&mut self, typeoid: u32) -> &mut TypeIo {
        let cache = self.cache.value();
        self.types.entry(typeoid).or_insert_with(|| {
            let oid = pg_sys::Oid::from(typeoid);
            let (mut input, mut ioparam, mut output, mut varlena) = (
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                false,
            );
            pg_sys::getTypeInputInfo(oid, &mut input, &mut ioparam);
            pg_sys::getTypeOutputInfo(oid, &mut output, &mut varlena);
            let (mut len, mut byval) = (0, false);
            pg_sys::get_typlenbyval(oid, &mut len, &mut byval);
            let mut io = Box::new(TypeIo {
                input: pg_sys::FmgrInfo::default(),
                ioparam,
                output: pg_sys::FmgrInfo::default(),
                len,
                byval,
            });
            pg_sys::fmgr_info_cxt(input, &mut io.input, cache);
            pg_sys::fmgr_info_cxt(output, &mut io.output, cache);
            io
        })
    }

    /// The key's text (as its type's output function writes it); a composite key as a JSON
    /// array of texts.
    unsafe fn entity_id(
        &mut self,
        row: &[Typed<'_>],
        publication: &Publication<'_>,
    ) -> Option<String> {
        let mut parts = Vec::with_capacity(publication.key.len());
        for key in publication.key {
            let value = row.iter().find(|v| v.name == key.as_str());
            parts.push(match value {
                Some(Typed {
                    typeoid,
                    datum: Some(datum),
                    ..
                }) => {
                    let io = self.type_io(*typeoid);
                    let text = pg_sys::OutputFunctionCall(&mut io.output, *datum);
                    CStr::from_ptr(text).to_string_lossy().into_owned()
                }
                _ => String::new(),
            });
        }
        match parts.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            many => Some(serde_json::to_string(many).expect("strings serialize")),
        }
    }

    /// Whether two values are of one column and equal, compared as the trigger compares.
    unsafe fn same(&mut self, a: &Typed<'_>, b: &Typed<'_>) -> bool {
        if a.name != b.name || a.typeoid != b.typeoid {
            return false;
        }
        match (a.datum, b.datum) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                let io = self.type_io(a.typeoid);
                same_value(x, y, io.len, io.byval)
            }
            _ => false,
        }
    }

    /// `to_jsonb` of the row's published columns, as one record.
    unsafe fn json(&mut self, row: &[Typed<'_>], publication: &Publication<'_>) -> pg_sys::Datum {
        let published: Vec<&Typed<'_>> = row
            .iter()
            .filter(|v| publication.publishes(v.name))
            .collect();
        let desc = self.record_shape(&published);
        let mut datums: Vec<pg_sys::Datum> = published
            .iter()
            .map(|v| v.datum.unwrap_or(pg_sys::Datum::from(0)))
            .collect();
        let mut nulls: Vec<bool> = published.iter().map(|v| v.datum.is_none()).collect();
        let tuple = pg_sys::heap_form_tuple(desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
        self.to_jsonb
            .call(pg_sys::heap_copy_tuple_as_datum(tuple, desc))
    }

    /// The blessed record descriptor of these columns (names and types, in order).
    unsafe fn record_shape(&mut self, columns: &[&Typed<'_>]) -> pg_sys::TupleDesc {
        let mut hasher = DefaultHasher::new();
        for c in columns {
            (c.name, c.typeoid).hash(&mut hasher);
        }
        let shapes = self.records.entry(hasher.finish()).or_default();
        let matches = |desc: pg_sys::TupleDesc| {
            let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
            attrs.len() == columns.len()
                && attrs.iter().zip(columns).all(|(a, c)| {
                    a.atttypid == pg_sys::Oid::from(c.typeoid)
                        && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == c.name.as_bytes()
                })
        };
        if let Some(&desc) = shapes.iter().find(|&&d| matches(d)) {
            return desc;
        }
        let desc = PgMemoryContexts::For(self.cache.value()).switch_to(|_| {
            let desc = pg_sys::CreateTemplateTupleDesc(columns.len() as i32);
            for (i, c) in columns.iter().enumerate() {
                let name = CString::new(c.name).expect("column names have no NUL");
                pg_sys::TupleDescInitEntry(
                    desc,
                    (i + 1) as pg_sys::AttrNumber,
                    name.as_ptr(),
                    pg_sys::Oid::from(c.typeoid),
                    -1,
                    0,
                );
            }
            pg_sys::BlessTupleDesc(desc)
        });
        shapes.push(desc);
        desc
    }
}
