//! Who may share a cached page of the log: its *audience*, the users who see exactly the
//! same rows of an entity's changes. A page judged for one user is served from a cache to
//! another only when both are of its audience.
//!
//! Two users see the same changes of an entity when the same plan judges them with the same
//! inputs: the same role (its privileges, whether row-level security applies to it), the
//! same access to the entity as the catalog read it (`Entity::access`: its table's grants,
//! owner and policies, the tables they read, and the attributes and memberships of the
//! gateway's roles that touch them: a change of them gives the entity new audiences, a change
//! of another table's leaves them), the same tracking of the entity, and, under a compiled policy (itself part of the digest), the
//! same value of every claim the policy reads. A policy the gateway cannot compile is
//! evaluated by the database, which may read anything (another table, a function), and a
//! compiled one that reads a membership table depends on that table too: their pages are
//! nobody's to share.
//!
//! The audience is a digest of those inputs. It is no secret and no credential: it names a
//! cache entry, and whoever presents it is checked against it (`http::changes`).

use super::plans::Plan;
use super::policy::Memberships;
use super::roles::UserContext;
use crate::feed::catalog::Entity;
use crate::model::digest::short_digest;
use pg_sync_core::policy::{Expr, Term};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// The audience of `user`'s reads of `entity` under `plan`; None when its pages are the
/// user's alone.
pub fn audience(entity: &Entity, plan: &Plan, user: &UserContext) -> Option<String> {
    let role = user.role.as_deref()?;
    let claims: Vec<Value> = match (&plan.expr, plan.rls) {
        (_, false) => Vec::new(),
        // What a membership policy lets a user see depends on another table, as of when
        // the page was judged: its pages are the user's alone, as the database's are.
        (Some(expr), true) if !Memberships::asked(expr).is_empty() => return None,
        (Some(expr), true) => claim_paths(expr)
            .into_iter()
            .map(|path| {
                let value = path.iter().try_fold(&user.claims_json, |v, k| {
                    v.as_object().and_then(|o| o.get(k))
                });
                // Present as null and absent differ (`?` tells them apart).
                json!([path, value.map(|v| json!({ "is": v }))])
            })
            .collect(),
        (None, true) => return None,
    };
    let inputs = json!([
        entity.access,
        entity.code,
        entity.tracking,
        role,
        plan.rls,
        plan.expr,
        claims
    ]);
    Some(short_digest(inputs.to_string().as_bytes()))
}

/// Every claim path `expr` reads.
fn claim_paths(expr: &Expr) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    expr.each_term(&mut |t| {
        if let Term::Claim { path, .. } = t {
            out.insert(path.clone());
        }
    });
    expr.each(&mut |e| {
        if let Expr::Contains { claim, .. } = e {
            out.insert(claim.clone());
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity() -> Entity {
        Entity {
            table: "\"app\".\"task\"".into(),
            rls: true,
            access: "f".into(),
            ..Entity::of("task", 1)
        }
    }

    fn plan(expr: Option<Value>, rls: bool) -> Plan {
        Plan {
            select: true,
            rls,
            expr: expr.map(|e| serde_json::from_value(e).unwrap()),
            unpublished: None,
            why: None,
            read_at: 0,
        }
    }

    fn user(sub: &str, role: &str, claims: Value) -> UserContext {
        UserContext {
            sub: sub.into(),
            role: Some(role.into()),
            claims: claims.to_string(),
            claims_json: claims,
        }
    }

    fn org_policy() -> Value {
        json!({"cmp": {"op": "eq", "type": "text", "left": {"column": "org"},
                       "right": {"claim": {"path": ["org"]}}}})
    }

    #[test]
    fn users_share_an_audience_exactly_when_what_the_policy_reads_of_them_is_the_same() {
        let (e, p) = (entity(), plan(Some(org_policy()), true));
        let a = audience(
            &e,
            &p,
            &user("a", "app", json!({"sub": "a", "org": "acme"})),
        );
        let b = audience(
            &e,
            &p,
            &user("b", "app", json!({"sub": "b", "org": "acme"})),
        );
        let c = audience(
            &e,
            &p,
            &user("c", "app", json!({"sub": "c", "org": "beta"})),
        );
        let missing = audience(&e, &p, &user("d", "app", json!({"sub": "d"})));
        let null = audience(&e, &p, &user("d", "app", json!({"org": null})));
        let number = audience(&e, &p, &user("e", "app", json!({"org": 7})));
        let text = audience(&e, &p, &user("e", "app", json!({"org": "7"})));
        assert!(a.is_some());
        assert_eq!(a, b, "the policy does not read sub");
        assert_ne!(a, c);
        assert_ne!(a, missing);
        assert_ne!(
            missing, null,
            "a claim present as null is not an absent one"
        );
        assert_ne!(number, text, "another JSON value is another audience");
    }

    #[test]
    fn the_role_the_access_and_the_tracking_each_make_another_audience() {
        let (e, p) = (entity(), plan(Some(org_policy()), true));
        let alice = user("a", "app", json!({"org": "acme"}));
        let base = audience(&e, &p, &alice);
        let regranted = Entity {
            access: "g".into(),
            ..entity()
        };
        assert_ne!(base, audience(&regranted, &p, &alice));
        assert_ne!(
            base,
            audience(&e, &p, &user("a", "auditor", json!({"org": "acme"})))
        );
        let retracked = Entity {
            tracking: 2,
            ..entity()
        };
        assert_ne!(base, audience(&retracked, &p, &alice));
    }

    #[test]
    fn without_row_level_security_a_role_is_one_audience_and_an_uncompiled_policy_none() {
        let e = entity();
        let open = plan(None, false);
        assert_eq!(
            audience(&e, &open, &user("a", "app", json!({"org": "x"}))),
            audience(&e, &open, &user("b", "app", json!({"org": "y"})))
        );
        let uncompiled = plan(None, true);
        assert_eq!(
            audience(&e, &uncompiled, &user("a", "app", json!({}))),
            None
        );
        let roleless = UserContext {
            role: None,
            ..user("a", "app", json!({}))
        };
        assert_eq!(audience(&e, &open, &roleless), None);
    }

    #[test]
    fn claims_read_inside_contains_and_null_tests_count() {
        let expr = json!({"or": [
            {"contains": {"claim": ["groups"], "item": {"value": "x"}}},
            {"null": {"claim": {"path": ["team", "id"]}}}
        ]});
        let paths = claim_paths(&serde_json::from_value(expr).unwrap());
        assert_eq!(
            paths.into_iter().collect::<Vec<_>>(),
            [vec!["groups".to_string()], vec!["team".into(), "id".into()]]
        );
    }
}
