//! Row filters of subscriptions (SPEC 2.3): conditions on columns, ANDed, evaluated on the
//! JSON rows of the log (`data` after a change, `old_data` before). Pure, so it is
//! unit-tested and fuzzed alone.
//!
//! The log types values as `to_jsonb` does (numbers, strings, booleans, null), while clients
//! often send every filter value as a string (`"value":"7"`). Comparison therefore coerces:
//! a number compares numerically with a number or a numeric string (and with nothing else),
//! a boolean with a boolean or `"true"`/`"false"`, anything else compares as text. As in SQL, a NULL (or missing)
//! column matches only `is_null`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::cmp::Ordering;

/// Values one `in` condition may list.
pub const MAX_IN_VALUES: usize = 1000;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub column: String,
    pub op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    IsNull,
    NotNull,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FilterError {
    #[error("{op:?} on {column} needs a value that is a string, number or boolean")]
    NeedsScalar { column: String, op: Op },
    #[error("in on {0} needs an array of 1 to {MAX_IN_VALUES} strings, numbers or booleans")]
    NeedsArray(String),
    #[error("{op:?} on {column} takes no value")]
    TakesNoValue { column: String, op: Op },
}

impl Condition {
    /// Checks that the value fits the operator.
    pub fn check(&self) -> Result<(), FilterError> {
        let scalar = |v: &Value| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_));
        match (self.op, &self.value) {
            (Op::IsNull | Op::NotNull, None | Some(Value::Null)) => Ok(()),
            (Op::IsNull | Op::NotNull, Some(_)) => Err(FilterError::TakesNoValue {
                column: self.column.clone(),
                op: self.op,
            }),
            (Op::In, Some(Value::Array(values)))
                if !values.is_empty()
                    && values.len() <= MAX_IN_VALUES
                    && values.iter().all(scalar) =>
            {
                Ok(())
            }
            (Op::In, _) => Err(FilterError::NeedsArray(self.column.clone())),
            (_, Some(v)) if scalar(v) => Ok(()),
            _ => Err(FilterError::NeedsScalar {
                column: self.column.clone(),
                op: self.op,
            }),
        }
    }

    /// Whether `row` satisfies this condition.
    pub fn matches(&self, row: &Map<String, Value>) -> bool {
        let actual = row.get(&self.column).unwrap_or(&Value::Null);
        match self.op {
            Op::IsNull => actual.is_null(),
            Op::NotNull => !actual.is_null(),
            _ if actual.is_null() => false,
            Op::In => match &self.value {
                Some(Value::Array(values)) => values
                    .iter()
                    .any(|v| compare(actual, v) == Some(Ordering::Equal)),
                _ => false,
            },
            op => {
                let Some(expected) = &self.value else {
                    return false;
                };
                let Some(ordering) = compare(actual, expected) else {
                    return false;
                };
                match op {
                    Op::Eq => ordering == Ordering::Equal,
                    Op::Neq => ordering != Ordering::Equal,
                    Op::Lt => ordering == Ordering::Less,
                    Op::Lte => ordering != Ordering::Greater,
                    Op::Gt => ordering == Ordering::Greater,
                    Op::Gte => ordering != Ordering::Less,
                    Op::In | Op::IsNull | Op::NotNull => unreachable!("handled above"),
                }
            }
        }
    }

    /// Where an index of subscriptions may file this condition: for `eq` and `in`, the keys
    /// (`equality_keys`) of the values it matches; None for the other operators.
    pub fn index_keys(&self) -> Option<Vec<u64>> {
        match (self.op, &self.value) {
            (Op::Eq, Some(value)) => Some(equality_keys(value).collect()),
            (Op::In, Some(Value::Array(values))) => {
                Some(values.iter().flat_map(equality_keys).collect())
            }
            _ => None,
        }
    }
}

/// A form a scalar takes in `compare`.
#[derive(Hash)]
enum Form<'a> {
    Text(&'a str),
    /// A finite number's bits, -0 as 0.
    Number(u64),
    Bool(bool),
}

/// Hashes of the forms `value` takes in `compare`: as text, as a finite number, as a
/// boolean. Two values that `compare` finds equal share one (not conversely: an index by
/// them finds candidates, which the filter then decides).
pub fn equality_keys(value: &Value) -> impl Iterator<Item = u64> + '_ {
    let number = || as_number(value).map(|n| Form::Number((n + 0.0).to_bits()));
    let forms = match value {
        Value::Number(_) => [number(), None, None],
        Value::String(s) => [
            Some(Form::Text(s)),
            number(),
            as_bool(value).map(Form::Bool),
        ],
        Value::Bool(b) => [Some(Form::Bool(*b)), None, None],
        _ => [None, None, None],
    };
    forms.into_iter().flatten().map(|form| {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        form.hash(&mut hasher);
        hasher.finish()
    })
}

/// Whether `row` satisfies every condition.
pub fn matches_all(conditions: &[Condition], row: &Map<String, Value>) -> bool {
    conditions.iter().all(|c| c.matches(row))
}

/// Orders a row's value against a filter value, coercing as the module doc says; None when
/// they cannot be compared (a JSON array or object, a NaN).
fn compare(actual: &Value, expected: &Value) -> Option<Ordering> {
    match (actual, expected) {
        // A number compares only with a number or a finite numeric string.
        (Value::Number(_), _) | (_, Value::Number(_)) => {
            as_number(actual)?.partial_cmp(&as_number(expected)?)
        }
        (Value::Bool(_), _) | (_, Value::Bool(_)) => match (as_bool(actual), as_bool(expected)) {
            (Some(a), Some(b)) => Some(a.cmp(&b)),
            _ => text(actual)?.partial_cmp(&text(expected)?),
        },
        _ => text(actual)?.partial_cmp(&text(expected)?),
    }
}

fn as_number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn as_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "true" => Some(true),
        Value::String(s) if s == "false" => Some(false),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn condition(column: &str, op: Op, value: Option<Value>) -> Condition {
        Condition {
            column: column.into(),
            op,
            value,
        }
    }

    fn row(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn numbers_compare_with_numeric_strings() {
        let r = row(json!({"project_id": 7, "score": 2.5}));
        assert!(condition("project_id", Op::Eq, Some(json!("7"))).matches(&r));
        assert!(condition("project_id", Op::Eq, Some(json!(7))).matches(&r));
        assert!(!condition("project_id", Op::Eq, Some(json!("8"))).matches(&r));
        assert!(condition("project_id", Op::Lt, Some(json!("10"))).matches(&r));
        assert!(!condition("project_id", Op::Lt, Some(json!("7"))).matches(&r));
        assert!(condition("project_id", Op::Lte, Some(json!("7"))).matches(&r));
        assert!(condition("score", Op::Gt, Some(json!(2))).matches(&r));
        assert!(condition("score", Op::Gte, Some(json!("2.5"))).matches(&r));
        // A number and a non-numeric string are not comparable: nothing matches, not even neq.
        assert!(!condition("project_id", Op::Neq, Some(json!("x"))).matches(&r));
    }

    #[test]
    fn strings_compare_as_text_and_booleans_as_booleans() {
        let r = row(json!({"status": "open", "done": false}));
        assert!(condition("status", Op::Eq, Some(json!("open"))).matches(&r));
        assert!(condition("status", Op::Lt, Some(json!("p"))).matches(&r));
        assert!(condition("status", Op::In, Some(json!(["open", "blocked"]))).matches(&r));
        assert!(!condition("status", Op::In, Some(json!(["done"]))).matches(&r));
        assert!(condition("done", Op::Eq, Some(json!("false"))).matches(&r));
        assert!(condition("done", Op::Eq, Some(json!(false))).matches(&r));
        assert!(!condition("done", Op::Eq, Some(json!(true))).matches(&r));
    }

    #[test]
    fn null_matches_only_is_null() {
        let r = row(json!({"assignee": null}));
        assert!(condition("assignee", Op::IsNull, None).matches(&r));
        assert!(condition("missing", Op::IsNull, None).matches(&r));
        assert!(!condition("assignee", Op::NotNull, None).matches(&r));
        for op in [Op::Eq, Op::Neq, Op::Lt, Op::Gte] {
            assert!(
                !condition("assignee", op, Some(json!("x"))).matches(&r),
                "{op:?}"
            );
        }
        assert!(!condition("assignee", Op::In, Some(json!(["x"]))).matches(&r));
    }

    #[test]
    fn conditions_are_anded() {
        let r = row(json!({"project_id": 7, "status": "open"}));
        let both = [
            condition("project_id", Op::Eq, Some(json!("7"))),
            condition("status", Op::In, Some(json!(["open", "blocked"]))),
        ];
        assert!(matches_all(&both, &r));
        let r = row(json!({"project_id": 7, "status": "done"}));
        assert!(!matches_all(&both, &r));
    }

    #[test]
    fn values_must_fit_their_operator() {
        assert!(condition("a", Op::Eq, Some(json!("x"))).check().is_ok());
        assert!(condition("a", Op::Eq, None).check().is_err());
        assert!(condition("a", Op::Eq, Some(json!([1]))).check().is_err());
        assert!(condition("a", Op::Eq, Some(json!({"x": 1})))
            .check()
            .is_err());
        assert!(condition("a", Op::In, Some(json!([]))).check().is_err());
        assert!(condition("a", Op::In, Some(json!([[1]]))).check().is_err());
        assert!(condition("a", Op::IsNull, Some(json!(1))).check().is_err());
        assert!(condition("a", Op::IsNull, None).check().is_ok());
    }

    #[test]
    fn objects_and_arrays_in_rows_never_match_comparisons() {
        let r = row(json!({"tags": ["a"], "meta": {"k": 1}}));
        assert!(!condition("tags", Op::Eq, Some(json!("a"))).matches(&r));
        assert!(!condition("meta", Op::Neq, Some(json!("a"))).matches(&r));
        assert!(condition("tags", Op::NotNull, None).matches(&r));
    }
}

/// The vectors every implementation of filters runs (the TypeScript client's too).
#[cfg(test)]
mod shared_vectors {
    use super::*;

    #[test]
    fn filters_mean_what_the_shared_vectors_say() {
        let file: Value = serde_json::from_str(include_str!("../../../tests/vectors/filters.json"))
            .expect("the vectors are JSON");
        let vectors = file["vectors"].as_array().expect("a list of vectors");
        assert!(vectors.len() > 10);
        for v in vectors {
            let condition: Condition = serde_json::from_value(v["condition"].clone()).unwrap();
            condition.check().unwrap();
            let row = v["row"].as_object().unwrap();
            assert_eq!(
                condition.matches(row),
                v["matches"].as_bool().unwrap(),
                "{}",
                v["name"]
            );
        }
    }
}
