//! A snapshot's rows as JSON lines, written here from the values of their columns as
//! PostgreSQL sends them, instead of each row built as JSON by PostgreSQL (`to_jsonb(t.*)`):
//! that was most of a snapshot's time (2.3 s of 2.8 for a million rows, where `COPY` of the
//! table takes 0.5). Integers, booleans and texts are written here; every other column comes
//! as PostgreSQL's JSON of that column alone: `to_json` for a built-in scalar, `to_jsonb` for
//! the rest. `to_json` passes some values on as they were typed, line breaks included: a
//! `json` value (also inside an array, a composite, a domain or a range), and whatever a cast
//! to `json` of a type of the user's own returns (an enum's owner can create one). It also
//! writes a float's `-0`, which `to_jsonb` gives as `0`. Each line is the same JSON value as
//! `to_jsonb` of the row.

use crate::feed::catalog::{quote, Entity};
use tokio_postgres::binary_copy::BinaryCopyOutRow;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Row;

/// How a column's value is read and written.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cell {
    Int2,
    Int4,
    Int8,
    Bool,
    Text,
    /// PostgreSQL's JSON text of the value, written as it is.
    Json,
}

/// The columns of the rows a snapshot sends, in the order they are selected.
pub struct RowLines {
    /// Each column's `"name":` as JSON, with its separator (`{` or `,`).
    keys: Vec<Vec<u8>>,
    cells: Vec<Cell>,
    select: String,
    /// Every column is of a built-in type, written by PostgreSQL's own code alone: no user's
    /// cast to `json` runs (one runs as the reader, and could write what differs by reader).
    pub built_in: bool,
}

/// The table's columns, with whether `to_json` of one gives what `to_jsonb` does, on one line:
/// a built-in scalar (below `FirstNormalObjectId`, so no user's cast to `json`) other than
/// `json` and the floats.
/// Read from the catalog rather than from a described `SELECT t.*`: describing a column of a
/// type of the user's own makes the driver look the type up with statements it keeps, which
/// the pool's `DISCARD ALL` has dropped ("prepared statement does not exist").
const COLUMNS: &str = "
SELECT a.attname::pg_catalog.text, a.atttypid, ty.oid < 16384,
       ty.typtype = 'b' AND ty.typcategory <> 'A' AND ty.oid < 16384
           AND ty.oid NOT IN ('pg_catalog.json'::pg_catalog.regtype,
                              'pg_catalog.float4'::pg_catalog.regtype,
                              'pg_catalog.float8'::pg_catalog.regtype)
FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum";

impl RowLines {
    /// The entity's published columns, read in the snapshot's transaction (after the table
    /// was locked and checked to be the entity the catalog read).
    pub async fn describe(
        tx: &deadpool_postgres::Transaction<'_>,
        entity: &Entity,
    ) -> Result<RowLines, tokio_postgres::Error> {
        let mut keys = Vec::new();
        let mut cells = Vec::new();
        let mut select = Vec::new();
        let mut built_in = true;
        for row in tx.query(COLUMNS, &[&entity.relid]).await? {
            let (name, oid, scalar): (String, u32, bool) = (row.get(0), row.get(1), row.get(3));
            if entity.allow_listed && !entity.columns.contains(&name) {
                continue;
            }
            built_in &= row.get::<_, bool>(2);
            let mut key = vec![if keys.is_empty() { b'{' } else { b',' }];
            serde_json::to_writer(&mut key, &name).expect("a Vec takes any bytes");
            key.push(b':');
            keys.push(key);
            let cell = Type::from_oid(oid).map_or(Cell::Json, |ty| Cell::of(&ty));
            let value = format!("t.{}", quote(&name));
            select.push(match cell {
                Cell::Json if scalar => {
                    format!("CAST(pg_catalog.to_json({value}) AS pg_catalog.text)")
                }
                Cell::Json => format!("CAST(pg_catalog.to_jsonb({value}) AS pg_catalog.text)"),
                _ => value,
            });
            cells.push(cell);
        }
        Ok(RowLines {
            keys,
            cells,
            select: select.join(", "),
            built_in,
        })
    }

    /// The select list that sends each column as `write` reads it.
    pub fn select_list(&self) -> &str {
        &self.select
    }

    /// The types of the select list's columns, for a binary `COPY`.
    pub fn types(&self) -> Vec<Type> {
        self.cells.iter().map(|cell| cell.wire_type()).collect()
    }

    /// Appends the row as one line of JSON.
    pub fn write(&self, row: &impl Cells, out: &mut Vec<u8>) -> Result<(), tokio_postgres::Error> {
        use std::io::Write;
        if self.cells.is_empty() {
            out.extend_from_slice(b"{}\n");
            return Ok(());
        }
        for (i, (key, cell)) in self.keys.iter().zip(&self.cells).enumerate() {
            out.extend_from_slice(key);
            let written = match cell {
                Cell::Int2 => row.cell::<Option<i16>>(i)?.map(|v| write!(out, "{v}")),
                Cell::Int4 => row.cell::<Option<i32>>(i)?.map(|v| write!(out, "{v}")),
                Cell::Int8 => row.cell::<Option<i64>>(i)?.map(|v| write!(out, "{v}")),
                Cell::Bool => row
                    .cell::<Option<bool>>(i)?
                    .map(|v| out.write_all(if v { b"true" } else { b"false" })),
                Cell::Text => row
                    .cell::<Option<&str>>(i)?
                    .map(|v| serde_json::to_writer(&mut *out, v).map_err(std::io::Error::from)),
                Cell::Json => row
                    .cell::<Option<&str>>(i)?
                    .map(|v| out.write_all(v.as_bytes())),
            };
            if written.is_none() {
                out.extend_from_slice(b"null");
            }
        }
        out.extend_from_slice(b"}\n");
        Ok(())
    }
}

impl Cell {
    fn of(ty: &Type) -> Cell {
        match *ty {
            Type::INT2 => Cell::Int2,
            Type::INT4 => Cell::Int4,
            Type::INT8 => Cell::Int8,
            Type::BOOL => Cell::Bool,
            Type::TEXT | Type::VARCHAR => Cell::Text,
            _ => Cell::Json,
        }
    }

    fn wire_type(self) -> Type {
        match self {
            Cell::Int2 => Type::INT2,
            Cell::Int4 => Type::INT4,
            Cell::Int8 => Type::INT8,
            Cell::Bool => Type::BOOL,
            Cell::Text => Type::TEXT,
            Cell::Json => Type::TEXT,
        }
    }
}

/// A row as a query or a binary `COPY` gives it.
pub trait Cells {
    fn cell<'a, T: FromSql<'a>>(&'a self, i: usize) -> Result<T, tokio_postgres::Error>;
}

impl Cells for Row {
    fn cell<'a, T: FromSql<'a>>(&'a self, i: usize) -> Result<T, tokio_postgres::Error> {
        self.try_get(i)
    }
}

impl Cells for BinaryCopyOutRow {
    fn cell<'a, T: FromSql<'a>>(&'a self, i: usize) -> Result<T, tokio_postgres::Error> {
        self.try_get(i)
    }
}
