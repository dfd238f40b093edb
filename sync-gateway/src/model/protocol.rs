//! The WebSocket protocol of `/ws/sync` (SPEC 2.3): the messages and their JSON shapes,
//! parsing with limits, and the error codes. Pure: no I/O, so it is unit-tested and fuzzed
//! alone. What a message *does* is decided by `deliver::connection` and `deliver::router`.

use super::change::Action;
use super::cursor::Cursor;
use super::filter::Condition;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Incoming text messages larger than this are refused with `message_too_large`.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Entity ids one SUBSCRIBE or UNSUBSCRIBE may name.
pub const MAX_IDS_PER_MESSAGE: usize = 1000;
/// Bytes of one entity id, entity code, column name or `ref`.
pub const MAX_NAME_BYTES: usize = 512;
/// Conditions of one filter.
pub const MAX_CONDITIONS: usize = 32;
/// Bytes of a cursor (the extension's own limit).
pub const MAX_CURSOR_BYTES: usize = 8192;

/// A message from a client.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", content = "payload", deny_unknown_fields)]
pub enum ClientMessage {
    #[serde(rename = "SUBSCRIBE")]
    Subscribe(Subscribe),
    #[serde(rename = "UNSUBSCRIBE")]
    Unsubscribe(Unsubscribe),
    #[serde(rename = "UNSUBSCRIBE_ALL")]
    UnsubscribeAll,
    #[serde(rename = "PING")]
    Ping,
    #[serde(rename = "AUTH")]
    Auth(Auth),
    /// Answer REACHED once everything up to `cursor` (a write's, say) has been sent.
    #[serde(rename = "AWAIT")]
    Await(Await),
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Invalidate,
    Delta,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subscribe {
    pub entity_code: String,
    /// Absent: the whole entity (or the rows matching `filter`).
    pub entity_ids: Option<Vec<String>>,
    pub filter: Option<Vec<Condition>>,
    #[serde(default)]
    pub mode: Mode,
    /// Replay every change after this cursor first.
    pub since: Option<String>,
    /// Only these published columns in DELTA data.
    pub columns: Option<Vec<String>>,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Unsubscribe {
    pub entity_code: String,
    /// Absent: every subscription of the entity.
    pub entity_ids: Option<Vec<String>>,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub token: String,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Await {
    pub cursor: String,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
}

/// Why a message was refused; each maps to an error code of the protocol.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("message of {0} bytes is over the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("{0}")]
    BadRequest(String),
}

impl ProtocolError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::TooLarge(_) => ErrorCode::MessageTooLarge,
            ProtocolError::BadRequest(_) => ErrorCode::BadRequest,
        }
    }
}

/// Parses one incoming text message and checks its limits.
pub fn parse(text: &str) -> Result<ClientMessage, ProtocolError> {
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge(text.len()));
    }
    let message: ClientMessage =
        serde_json::from_str(text).map_err(|e| ProtocolError::BadRequest(e.to_string()))?;
    match &message {
        ClientMessage::Subscribe(s) => {
            check_name("entityCode", &s.entity_code)?;
            check_ids(s.entity_ids.as_deref())?;
            if s.entity_ids.is_some() && s.filter.is_some() {
                return bad("entityIds and filter cannot be combined");
            }
            if let Some(filter) = &s.filter {
                if filter.is_empty() || filter.len() > MAX_CONDITIONS {
                    return bad(&format!("a filter has 1 to {MAX_CONDITIONS} conditions"));
                }
                for condition in filter {
                    check_name("column", &condition.column)?;
                    condition
                        .check()
                        .map_err(|e| ProtocolError::BadRequest(e.to_string()))?;
                }
            }
            if let Some(columns) = &s.columns {
                let mut seen = std::collections::HashSet::new();
                for column in columns {
                    check_name("column", column)?;
                    if !seen.insert(column) {
                        return bad(&format!("columns names {column} twice"));
                    }
                }
            }
            check_optional(s.reference.as_deref())?;
            if s.since
                .as_ref()
                .is_some_and(|c| c.is_empty() || c.len() > MAX_CURSOR_BYTES)
            {
                return bad(&format!("since must have 1 to {MAX_CURSOR_BYTES} bytes"));
            }
        }
        ClientMessage::Unsubscribe(u) => {
            check_name("entityCode", &u.entity_code)?;
            check_ids(u.entity_ids.as_deref())?;
            check_optional(u.reference.as_deref())?;
        }
        ClientMessage::Auth(a) if a.token.is_empty() => return bad("token is empty"),
        ClientMessage::Await(a) => {
            if a.cursor.is_empty() || a.cursor.len() > MAX_CURSOR_BYTES {
                return bad(&format!("cursor must have 1 to {MAX_CURSOR_BYTES} bytes"));
            }
            check_optional(a.reference.as_deref())?;
        }
        _ => {}
    }
    Ok(message)
}

/// The `ref` of a message, if one can be read, so that an error answers the right request
/// even when the rest of the message is wrong.
pub fn reference_of(text: &str) -> Option<String> {
    if text.len() > MAX_MESSAGE_BYTES {
        return None;
    }
    let value: Value = serde_json::from_str(text).ok()?;
    let reference = value.get("payload")?.get("ref")?.as_str()?;
    (reference.len() <= MAX_NAME_BYTES).then(|| reference.to_owned())
}

fn check_name(what: &str, name: &str) -> Result<(), ProtocolError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return bad(&format!("{what} must have 1 to {MAX_NAME_BYTES} bytes"));
    }
    Ok(())
}

fn check_optional(value: Option<&str>) -> Result<(), ProtocolError> {
    match value {
        Some(v) if v.len() > MAX_NAME_BYTES => {
            bad(&format!("ref must have at most {MAX_NAME_BYTES} bytes"))
        }
        _ => Ok(()),
    }
}

fn check_ids(ids: Option<&[String]>) -> Result<(), ProtocolError> {
    let Some(ids) = ids else { return Ok(()) };
    if ids.is_empty() || ids.len() > MAX_IDS_PER_MESSAGE {
        return bad(&format!(
            "entityIds must list 1 to {MAX_IDS_PER_MESSAGE} ids"
        ));
    }
    ids.iter().try_for_each(|id| check_name("an entity id", id))
}

fn bad<T>(message: &str) -> Result<T, ProtocolError> {
    Err(ProtocolError::BadRequest(message.to_owned()))
}

/// Error codes of ERROR messages.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    TokenExpired,
    Forbidden,
    UnknownEntity,
    TooManySubscriptions,
    MessageTooLarge,
    Internal,
}

/// What a client sees of one change.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChangeOut {
    pub entity_id: String,
    pub action: Action,
    /// DELTA only: the row after the change (CREATE, UPDATE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// DELTA only: the changed published columns (UPDATE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i32>,
}

/// A message to a client.
#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "type", content = "payload")]
pub enum ServerMessage {
    #[serde(rename = "SUBSCRIBED", rename_all = "camelCase")]
    Subscribed {
        entity_code: String,
        count: usize,
        cursor: Cursor,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// Always true: this gateway marks transaction ends (`txEnd`), so a client can hold
        /// a transaction's messages for its end from the first one, before it has seen a mark.
        tx_ends: bool,
    },
    #[serde(rename = "INVALIDATE", rename_all = "camelCase")]
    Invalidate {
        entity_code: String,
        changes: Vec<ChangeOut>,
        timestamp: String,
        cursor: Cursor,
        /// This message ends a database transaction (of what this connection receives).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        tx_end: bool,
    },
    #[serde(rename = "DELTA", rename_all = "camelCase")]
    Delta {
        entity_code: String,
        changes: Vec<ChangeOut>,
        timestamp: String,
        cursor: Cursor,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        tx_end: bool,
    },
    #[serde(rename = "SYNCED", rename_all = "camelCase")]
    Synced {
        entity_code: String,
        cursor: Cursor,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    #[serde(rename = "RESYNC", rename_all = "camelCase")]
    Resync {
        entity_code: String,
        reason: ResyncReason,
    },
    #[serde(rename = "ERROR")]
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// The entity a `forbidden` is about: its subscriptions ended, and the client drops
        /// what it holds of it.
        #[serde(rename = "entityCode", skip_serializing_if = "Option::is_none")]
        entity_code: Option<String>,
    },
    #[serde(rename = "PONG")]
    Pong,
    /// Everything up to `cursor` this connection receives has been sent (answers AWAIT).
    #[serde(rename = "REACHED", rename_all = "camelCase")]
    Reached {
        cursor: Cursor,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// Reconnect after `after_ms` (the socket closes next): the gateway is stopping, or it
    /// cannot serve this position yet.
    #[serde(rename = "RECONNECT", rename_all = "camelCase")]
    Reconnect {
        after_ms: u64,
        reason: ReconnectReason,
    },
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReconnectReason {
    /// The gateway is shutting down.
    Shutdown,
    /// The gateway's database has not replayed up to the client's position yet.
    Behind,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ResyncReason {
    CursorExpired,
    Truncate,
    /// The entity was untracked, tracked again or replaced by another table under its code:
    /// the rows held are another table's.
    EntityChanged,
    /// Who may read what changed (a policy, an owner, a role's membership): the rows held
    /// may differ from what the user may see now, without any row having changed.
    AccessChanged,
}

impl ServerMessage {
    pub fn error(code: ErrorCode, message: impl Into<String>, reference: Option<String>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            reference,
            entity_code: None,
        }
    }

    /// ERROR `forbidden` for `entity_code`: the user may no longer read it.
    pub fn forbidden(entity_code: &str, message: impl Into<String>) -> Self {
        Self::about(entity_code, ErrorCode::Forbidden, message)
    }

    /// An ERROR that ended the subscriptions of `entity_code` (a refusal, a replay that
    /// could not run): the client knows which to drop or subscribe again.
    pub fn about(entity_code: &str, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            reference: None,
            entity_code: Some(entity_code.to_owned()),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::filter::Op;
    use serde_json::json;

    #[test]
    fn parses_the_spec_examples() {
        let m = parse(r#"{"type":"SUBSCRIBE","payload":{"entityCode":"project","entityIds":["u1","u2"],"mode":"delta","since":"c","ref":"r1"}}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::Subscribe(Subscribe {
                entity_code: "project".into(),
                entity_ids: Some(vec!["u1".into(), "u2".into()]),
                filter: None,
                mode: Mode::Delta,
                since: Some("c".into()),
                columns: None,
                reference: Some("r1".into()),
            })
        );
        let m = parse(r#"{"type":"SUBSCRIBE","payload":{"entityCode":"task","filter":[{"column":"project_id","op":"eq","value":"7"}],"mode":"delta"}}"#).unwrap();
        let ClientMessage::Subscribe(s) = m else {
            panic!()
        };
        assert_eq!(s.filter.unwrap()[0].op, Op::Eq);
        assert_eq!(
            parse(
                r#"{"type":"UNSUBSCRIBE","payload":{"entityCode":"project","entityIds":["u1"]}}"#
            )
            .unwrap(),
            ClientMessage::Unsubscribe(Unsubscribe {
                entity_code: "project".into(),
                entity_ids: Some(vec!["u1".into()]),
                reference: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"UNSUBSCRIBE_ALL"}"#).unwrap(),
            ClientMessage::UnsubscribeAll
        );
        assert_eq!(parse(r#"{"type":"PING"}"#).unwrap(), ClientMessage::Ping);
        assert_eq!(
            parse(r#"{"type":"AUTH","payload":{"token":"t"}}"#).unwrap(),
            ClientMessage::Auth(Auth { token: "t".into() })
        );
        assert_eq!(
            parse(r#"{"type":"AWAIT","payload":{"cursor":"c","ref":"w1"}}"#).unwrap(),
            ClientMessage::Await(Await {
                cursor: "c".into(),
                reference: Some("w1".into())
            })
        );
    }

    #[test]
    fn refuses_bad_messages() {
        for bad in [
            "",
            "null",
            "[]",
            r#"{"type":"NOPE"}"#,
            r#"{"type":"SUBSCRIBE"}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":7}}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":""}}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"p","entityIds":[]}}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"p","entityIds":[1]}}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"p","mode":"push"}}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"p","entityId":"x"}}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"p","filter":[]}}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"p","filter":[{"column":"a","op":"like","value":"x"}]}}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"p","filter":[{"column":"a","op":"in","value":"x"}]}}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"p","entityIds":["a"],"filter":[{"column":"a","op":"is_null"}]}}"#,
            r#"{"type":"SUBSCRIBE","payload":{"entityCode":"p","columns":["id","a","id"]}}"#,
            r#"{"type":"AUTH","payload":{"token":""}}"#,
            r#"{"type":"PING","payload":{"x":1}}"#,
        ] {
            assert!(
                matches!(parse(bad), Err(ProtocolError::BadRequest(_))),
                "accepted {bad:?}"
            );
        }
        let huge = format!(
            r#"{{"type":"PING","pad":"{}"}}"#,
            "x".repeat(MAX_MESSAGE_BYTES)
        );
        assert_eq!(parse(&huge).unwrap_err().code(), ErrorCode::MessageTooLarge);
        let many: Vec<String> = (0..=MAX_IDS_PER_MESSAGE).map(|i| i.to_string()).collect();
        let text =
            json!({"type":"SUBSCRIBE","payload":{"entityCode":"p","entityIds":many}}).to_string();
        assert!(parse(&text).is_err());
    }

    #[test]
    fn a_reference_is_found_in_a_bad_message() {
        assert_eq!(
            reference_of(r#"{"type":"SUBSCRIBE","payload":{"entityCode":7,"ref":"r9"}}"#),
            Some("r9".into())
        );
        assert_eq!(reference_of("nonsense"), None);
    }

    #[test]
    fn server_messages_have_the_spec_shapes() {
        let m = ServerMessage::Invalidate {
            entity_code: "project".into(),
            changes: vec![ChangeOut {
                entity_id: "u1".into(),
                action: Action::Update,
                data: None,
                changed: None,
                schema_version: None,
            }],
            timestamp: "t".into(),
            cursor: Cursor::from_db("c".into()),
            tx_end: false,
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"type":"INVALIDATE","payload":{"entityCode":"project","changes":[{"entityId":"u1","action":"UPDATE"}],"timestamp":"t","cursor":"c"}})
        );
        assert_eq!(
            serde_json::to_value(ServerMessage::Pong).unwrap(),
            json!({"type":"PONG"})
        );
        assert_eq!(
            serde_json::to_value(ServerMessage::Reconnect {
                after_ms: 1500,
                reason: ReconnectReason::Shutdown
            })
            .unwrap(),
            json!({"type":"RECONNECT","payload":{"afterMs":1500,"reason":"shutdown"}})
        );
        assert_eq!(
            serde_json::to_value(ServerMessage::error(
                ErrorCode::TooManySubscriptions,
                "m",
                Some("r".into())
            ))
            .unwrap(),
            json!({"type":"ERROR","payload":{"code":"too_many_subscriptions","message":"m","ref":"r"}})
        );
        assert_eq!(
            serde_json::to_value(ServerMessage::Resync {
                entity_code: "p".into(),
                reason: ResyncReason::CursorExpired
            })
            .unwrap(),
            json!({"type":"RESYNC","payload":{"entityCode":"p","reason":"cursor_expired"}})
        );
    }
}
