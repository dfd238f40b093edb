//! Row-level-security policies compiled by the extension (`sync.policy_plan`, as
//! `pg_sync_core::policy` types) and evaluated here, in memory, for any number of groups of
//! subscribers (a role and its claims), so that judging a change costs no query per group.
//! Pure: no I/O. `eval` evaluates one expression for one row and one group, as PostgreSQL
//! would, or says it cannot exactly; `index` finds the groups that may see a row; `members`
//! holds the membership rows a page's images match, for policies that ask about them.

mod eval;
mod index;
mod members;

pub use eval::EvalError;
pub use index::GroupIndex;
pub use members::Memberships;

#[cfg(test)]
mod tests {
    use super::eval::{eval, parse_bool, parse_uuid};
    use super::*;
    use crate::access::roles::GroupId;
    use crate::model::change::AccessScope;
    use pg_sync_core::policy::Expr;
    use serde_json::{json, Map, Value};
    use std::collections::HashSet;

    fn expr(value: Value) -> Expr {
        serde_json::from_value(value).unwrap()
    }

    fn row(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn owner_is_sub() -> Value {
        json!({"cmp": {"op": "eq", "type": "text", "left": {"column": "owner"}, "right": {"claim": {"path": ["sub"]}}}})
    }

    #[test]
    fn three_valued_logic_as_in_sql() {
        let e = expr(json!({"or": [owner_is_sub(), {"null": {"column": "owner"}}]}));
        let alice = json!({"sub": "alice"});
        assert_eq!(
            eval(&e, &row(json!({"owner": "alice"})), &alice),
            Ok(Some(true))
        );
        assert_eq!(
            eval(&e, &row(json!({"owner": "bob"})), &alice),
            Ok(Some(false))
        );
        assert_eq!(
            eval(&e, &row(json!({"owner": null})), &alice),
            Ok(Some(true))
        );
        // A missing claim is NULL: owner = NULL is NULL, and NOT NULL is NULL too.
        let not = expr(json!({"not": owner_is_sub()}));
        assert_eq!(
            eval(&not, &row(json!({"owner": "bob"})), &json!({})),
            Ok(None)
        );
    }

    #[test]
    fn claims_are_cast_as_postgresql_casts_them() {
        let e = expr(
            json!({"cmp": {"op": "eq", "type": "int", "left": {"column": "n"}, "right": {"claim": {"path": ["app", "n"], "as": "int4"}}}}),
        );
        let r = row(json!({"n": 7}));
        assert_eq!(eval(&e, &r, &json!({"app": {"n": " 7 "}})), Ok(Some(true)));
        assert_eq!(eval(&e, &r, &json!({"app": {"n": 7}})), Ok(Some(true)));
        assert!(eval(&e, &r, &json!({"app": {"n": "seven"}})).is_err());
        assert!(eval(&e, &r, &json!({"app": {"n": "3000000000"}})).is_err());
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
        let team = json!({"cmp": {"op": "eq", "type": "text", "left": {"column": "team"}, "right": {"claim": {"path": ["team"]}}}});
        let published = json!({"cmp": {"op": "eq", "type": "bool", "left": {"column": "public"}, "right": {"value": true}}});
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
                eval(
                    &e,
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
            json!({"cmp": {"op": "eq", "type": "int", "left": {"column": "n"}, "right": {"claim": {"path": ["n"], "as": "int4"}}}}),
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

    #[test]
    fn claims_whose_text_is_not_reproduced_exactly_go_to_the_database() {
        let team = expr(
            json!({"cmp": {"op": "eq", "type": "text", "left": {"column": "team"}, "right": {"claim": {"path": ["team"]}}}}),
        );
        let index = GroupIndex::new(
            team,
            [
                (1, json!({"team": "a"})),
                (2, json!({"team": {"a": 1}})),
                (3, json!({"team": ["a"]})),
                (4, json!({"team": 1.5})),
                (5, json!({"team": 7})),
            ],
        );
        assert_eq!(index.inexact, [2, 3, 4]);
        assert_eq!(index.visible(&row(json!({"team": "7"}))), [5]);
        assert!(index.visible(&row(json!({"team": "{\"a\":1}"}))).is_empty());
    }

    /// `EXISTS (SELECT 1 FROM member m WHERE m.project = row.project AND m.usr = sub)`, with
    /// project 7's members u1 and u2, a row with a NULL user, and project 8 with none.
    fn membership() -> (Expr, Memberships) {
        let member = json!({"table": 1, "key": "project", "key_attnum": 1, "column": "project",
            "type": "int", "fields": [{"field": "usr", "attnum": 2, "type": "text", "term": {"claim": {"path": ["sub"]}}}]});
        let e = expr(json!({ "member": member }));
        let mut memberships = Memberships::default();
        let Expr::Member(m) = &e else { unreachable!() };
        memberships.insert(m.clone(), json!({"7": [["u1"], ["u2"], [null]]}));
        (e, memberships)
    }

    #[test]
    fn members_see_their_projects_rows_found_by_their_claim() {
        let (e, memberships) = membership();
        let groups = [
            (1, json!({"sub": "u1"})),
            (2, json!({"sub": "u2"})),
            (3, json!({"sub": "u3"})),
            (4, json!({})),
        ];
        let index = GroupIndex::new(e.clone(), groups.clone());
        let seven = row(json!({"project": 7}));
        assert_eq!(index.visible(&memberships.row(&seven)), [1, 2]);
        assert!(index
            .visible(&memberships.row(&row(json!({"project": 8}))))
            .is_empty());
        assert!(index
            .visible(&memberships.row(&row(json!({"project": null}))))
            .is_empty());
        // Without the membership rows, nobody: never more than the table allows.
        assert!(index.visible(&seven).is_empty());
        // EXISTS is never NULL: NOT of it shows the row to the others, and to no claim alike.
        let not = expr(json!({"not": serde_json::to_value(&e).unwrap()}));
        let index = GroupIndex::new(not, groups);
        assert_eq!(index.visible(&memberships.row(&seven)), [3, 4]);
    }

    /// A page judges each distinct inputs of an image once (`GroupIndex::inputs`): images
    /// with the same inputs must be seen by the same groups, whatever else they hold.
    #[test]
    fn images_with_the_same_inputs_are_seen_by_the_same_groups() {
        let (member, memberships) = membership();
        let team = json!({"cmp": {"op": "eq", "type": "text", "left": {"column": "team"}, "right": {"claim": {"path": ["team"]}}}});
        let e = expr(json!({"or": [team, serde_json::to_value(&member).unwrap()]}));
        let groups = (0..6u32).map(|g| {
            (
                g,
                json!({"sub": format!("u{}", g % 3), "team": if g % 2 == 0 { "a" } else { "b" }}),
            )
        });
        let index = GroupIndex::new(e, groups);
        let values = [
            json!(null),
            json!("a"),
            json!("b"),
            json!(7),
            json!(8),
            json!("7"),
        ];
        let mut images = Vec::new();
        for team in values.iter().map(Some).chain([None]) {
            for project in values.iter().map(Some).chain([None]) {
                for pad in [1, 2] {
                    let mut image = row(json!({ "pad": pad }));
                    image.extend(team.map(|t| ("team".to_owned(), t.clone())));
                    image.extend(project.map(|p| ("project".to_owned(), p.clone())));
                    images.push(image);
                }
            }
        }
        let judged: Vec<(String, Vec<GroupId>)> = images
            .iter()
            .map(|i| (index.inputs(i).unwrap(), index.visible(&memberships.row(i))))
            .collect();
        for (a, seen_a) in &judged {
            for (b, seen_b) in &judged {
                if a == b {
                    assert_eq!(seen_a, seen_b, "inputs {a:?}");
                }
            }
        }
        // What the policy does not read is not an input; NULL and a missing column differ.
        assert_eq!(judged[0].0, judged[1].0);
        let distinct: HashSet<&String> = judged.iter().map(|(i, _)| i).collect();
        assert_eq!(distinct.len(), images.len() / 2);
        assert!(judged.iter().any(|(_, seen)| !seen.is_empty()));
        // Inputs a writer made large are not kept: that image is judged alone.
        let large = row(json!({"team": "\u{1}".repeat(200), "project": 7}));
        assert_eq!(index.inputs(&large), None);
    }

    #[test]
    fn a_membership_compared_with_a_cast_claim_fails_a_group_whose_claim_does_not_parse() {
        let member = json!({"table": 1, "key": "project", "key_attnum": 1, "column": "project",
            "type": "int", "fields": [{"field": "level", "attnum": 3, "type": "int", "term": {"claim": {"path": ["n"], "as": "int4"}}}]});
        let e = expr(json!({ "member": member }));
        let Expr::Member(m) = &e else { unreachable!() };
        let mut memberships = Memberships::default();
        memberships.insert(m.clone(), json!({"7": [["3"]]}));
        let index = GroupIndex::new(e, [(1, json!({"n": " 3"})), (2, json!({"n": "x"}))]);
        assert_eq!(index.failed.len(), 1);
        assert_eq!(index.failed[0].0, 2);
        assert_eq!(
            index.visible(&memberships.row(&row(json!({"project": 7})))),
            [1]
        );
    }
    /// An ACCESS row names the membership rows written: the groups a named row matches (by
    /// its fields as their type reads them: a boolean's `t` is `true`), none for a null or
    /// another table, all when it lacks a field the policy compares.
    #[test]
    fn a_membership_write_concerns_the_groups_its_rows_match() {
        let member = json!({"table": 1, "key": "project", "key_attnum": 1, "column": "project",
            "type": "int", "fields": [
                {"field": "usr", "attnum": 2, "type": "text", "term": {"claim": {"path": ["sub"]}}},
                {"field": "active", "attnum": 3, "type": "bool", "term": {"value": "true"}}]});
        let index = GroupIndex::new(
            expr(json!({ "member": member })),
            [
                (1, json!({"sub": "u1"})),
                (2, json!({"sub": "u2"})),
                (3, json!({})),
            ],
        );
        let named = |input: u32, rows: Value| -> Vec<GroupId> {
            let scope: AccessScope =
                serde_json::from_value(json!({"input": input, "rows": rows})).unwrap();
            index.named_by(&[&scope])
        };
        let u1 = json!({"project": "7", "usr": "u1", "active": "t"});
        assert_eq!(named(1, json!([u1])), [1]);
        assert!(named(2, json!([u1])).is_empty(), "another table");
        assert!(named(1, json!([{"project": "7", "usr": "u1", "active": "f"}])).is_empty());
        assert!(named(1, json!([{"project": "7", "usr": null, "active": "t"}])).is_empty());
        assert_eq!(
            named(
                1,
                json!([{"project": "7", "usr": "u2", "active": "true"}, u1])
            ),
            [1, 2],
            "an update: its old and new row"
        );
        assert_eq!(named(1, json!([{"project": "7", "usr": "u1"}])), [1, 2, 3]);
    }

    /// Only rows a group can match are asked for: each group's terms once, as PostgreSQL
    /// prints their type (an int claim " 3" asks for "3"), none for a group whose claim is
    /// missing, does not parse, or holds NUL.
    #[test]
    fn the_rows_asked_for_are_the_groups_terms_as_postgresql_prints_them() {
        let member = json!({"table": 1, "key": "project", "key_attnum": 1, "column": "project",
            "type": "int", "fields": [
                {"field": "usr", "attnum": 2, "type": "text", "term": {"claim": {"path": ["sub"]}}},
                {"field": "level", "attnum": 3, "type": "int", "term": {"claim": {"path": ["n"], "as": "int4"}}},
                {"field": "id", "attnum": 4, "type": "uuid", "term": {"value": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"}}]});
        let Expr::Member(m) = expr(json!({ "member": member })) else {
            unreachable!()
        };
        let claims = [
            json!({"sub": "u1", "n": " 3"}),
            json!({"sub": "u1", "n": 3}),
            json!({"sub": "u2", "n": "x"}),
            json!({"n": 4}),
            json!({"sub": "u\0", "n": 3}),
        ];
        assert_eq!(
            Memberships::wanted(&m, claims.iter()),
            [["u1", "3", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]]
        );
    }
}
