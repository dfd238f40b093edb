//! Property tests of the pure parts that read client input: the WebSocket message parser,
//! row filters and access verdicts never panic, whatever arrives. `make test` runs a short
//! round; `make fuzz` runs new random rounds for FUZZ_SECONDS. Findings become the regression
//! cases below.

use crate::model::filter::{equality_keys, Condition, Op};
use crate::model::protocol::{parse, reference_of};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// JSON values of any shape, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Messages close to valid ones, with any payload.
fn message_like() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        Just("SUBSCRIBE"),
        Just("UNSUBSCRIBE"),
        Just("UNSUBSCRIBE_ALL"),
        Just("PING"),
        Just("AUTH"),
        Just("X")
    ];
    (kind, any_json())
        .prop_map(|(kind, payload)| json!({"type": kind, "payload": payload}).to_string())
}

fn any_op() -> impl Strategy<Value = Op> {
    prop::sample::select(vec![
        Op::Eq,
        Op::Neq,
        Op::Lt,
        Op::Lte,
        Op::Gt,
        Op::Gte,
        Op::In,
        Op::IsNull,
        Op::NotNull,
    ])
}

/// Scalars that `eq` may find equal across types: numbers, numeric and boolean strings.
fn confusable_scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        (-3i64..3).prop_map(|n| json!(n)),
        prop::sample::select(vec![0.0, -0.0, 1.0, 1.5, -2.0, 1e300]).prop_map(|f| json!(f)),
        prop::sample::select(vec![u64::MAX, 9_007_199_254_740_993]).prop_map(|n| json!(n)),
        prop::sample::select(vec![
            "0",
            "-0",
            " 1",
            "1.0",
            "01",
            "1e0",
            "+1",
            "true",
            "false",
            "True",
            "",
            "x",
            "1.5",
            "-2",
            "NaN",
            "inf",
            "9007199254740993",
            "18446744073709551615",
        ])
        .prop_map(|s| json!(s)),
        ".{0,4}".prop_map(Value::String),
    ]
}

proptest! {
    /// The router files `eq` and `in` filters by `index_keys` and looks a change's values up
    /// by `equality_keys`: every row a filter matches must be found.
    #[test]
    fn an_index_by_equality_keys_finds_every_row_a_filter_matches(
        actual in confusable_scalar(),
        values in prop::collection::vec(confusable_scalar(), 1..4),
        listed in any::<bool>(),
    ) {
        let (op, value) = match listed {
            true => (Op::In, Value::Array(values)),
            false => (Op::Eq, values[0].clone()),
        };
        let condition = Condition { column: "c".into(), op, value: Some(value) };
        let row: Map<String, Value> = [("c".to_owned(), actual.clone())].into_iter().collect();
        if condition.matches(&row) {
            let filed = condition.index_keys().expect("eq and in are filed");
            prop_assert!(equality_keys(&actual).any(|k| filed.contains(&k)), "{actual} {condition:?}");
        }
    }

    #[test]
    fn parsing_never_panics(text in ".{0,200}") {
        let _ = parse(&text);
        let _ = reference_of(&text);
    }

    #[test]
    fn parsing_message_like_input_never_panics(text in message_like()) {
        let _ = parse(&text);
        let _ = reference_of(&text);
    }

    #[test]
    fn filters_never_panic(column in "[a-c]", op in any_op(), value in proptest::option::of(any_json()), row in any_json()) {
        let condition = Condition { column, op, value };
        let _ = condition.check();
        if let Value::Object(row) = row {
            let _ = condition.matches(&row);
        } else {
            let _ = condition.matches(&Map::new());
        }
    }
}

#[test]
fn regressions() {
    // Shapes found while fuzzing or reviewing: numbers beyond f64, empty keys, deep nesting.
    for text in [
        r#"{"type":"SUBSCRIBE","payload":{"entityCode":"p","filter":[{"column":"a","op":"lt","value":1e400}]}}"#,
        r#"{"type":"SUBSCRIBE","payload":{"entityCode":"","entityIds":[""]}}"#,
        r#"{"type":"PING","payload":null}"#,
        r#"{"type":"UNSUBSCRIBE_ALL","payload":{}}"#,
        r#"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"#,
    ] {
        let _ = parse(text);
    }
    let huge = Condition {
        column: "a".into(),
        op: Op::Gt,
        value: Some(json!("1e400")),
    };
    assert!(!huge.matches(json!({"a": 5}).as_object().unwrap()));
}
