//! What a judgement asks the database: the membership rows a compiled membership policy
//! reads (`sync.members`), and the verdicts of policies only the database can evaluate
//! (`sync.visible`), each as the role of the groups asking.

use super::listeners::Group;
use super::policy::{GroupIndex, Memberships};
use super::roles::GroupId;
use crate::feed::catalog::Entity;
use pg_sync_core::policy::Visibility;
use serde_json::{Map, Value};
use tokio_postgres::Client;

/// The membership rows the policy of `index` asks about that `images` and the claims of
/// its groups match, read as `role`, and whether it asks about any; None when a membership
/// table holds more rows under the images' keys than `sync.members` scans.
pub async fn read_memberships(
    client: &Client,
    role: &str,
    index: &GroupIndex,
    images: &[&Map<String, Value>],
) -> Result<Option<(Memberships, bool)>, tokio_postgres::Error> {
    let mut read = Memberships::default();
    for asked in index.memberships() {
        let keys = Memberships::keys(&asked.member, images);
        let answer: Value = if keys.is_empty() || !asked.wanted_by_any() {
            Value::Object(Map::new())
        } else {
            client
                .query_one(
                    "SELECT sync.members($1, $2, $3, $4)",
                    &[&role, &asked.member_json, &keys, &asked.wanted],
                )
                .await?
                .get(0)
        };
        if answer.is_null() {
            return Ok(None);
        }
        read.insert(asked.member.clone(), answer);
    }
    Ok(Some((read, !index.memberships().is_empty())))
}

/// `sync.visible` for `groups` over `images`: per group, a bit per image, or why it failed.
pub async fn visible_in_database(
    client: &Client,
    entity: &Entity,
    groups: &[(GroupId, &Group)],
    images: &[&Map<String, Value>],
) -> Result<Vec<Visibility>, tokio_postgres::Error> {
    let groups: Vec<pg_sync_core::policy::Group> = groups
        .iter()
        .map(|(_, g)| pg_sync_core::policy::Group {
            role: g.role.clone().unwrap_or_default(),
            claims: g.claims_json.clone(),
        })
        .collect();
    let count = groups.len();
    let groups = serde_json::to_value(groups).expect("groups serialize");
    let images = Value::Array(images.iter().map(|i| Value::Object((*i).clone())).collect());
    let row = client
        .query_one(
            "SELECT sync.visible($1, $2, $3)",
            &[&entity.relid, &groups, &images],
        )
        .await?;
    let answers = serde_json::from_value(row.get::<_, Value>(0)).unwrap_or_else(|e| {
        vec![Visibility::Error(format!("an answer of sync.visible did not parse: {e}")); count]
    });
    Ok(answers)
}
