//! What the router is told, by whom it is told: connections (subscriptions, through the
//! visibility stage, which reads who listens from them: `Passing`), the stage (judged
//! batches, replaced entities) and replays (pages of a subscription's gap). The router's
//! input types live here, beside their producers, not in the router.

use super::queue::Outbound;
use crate::access::judge::Verdict;
use crate::access::roles::{GroupId, UserContext};
use crate::access::stage::{JudgedBatch, Listening, Passing, Staged};
use crate::model::change::Change;
use crate::model::cursor::Cursor;
use crate::model::protocol::ServerMessage;
use crate::model::subscription::Subscription;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub type ConnId = u64;
pub type SubId = u64;

pub enum Command {
    Connect(Connection),
    Disconnect(ConnId),
    /// The connection refreshed its token: later changes are judged for this user and group.
    Reauth {
        conn: ConnId,
        user: Arc<UserContext>,
        group: GroupId,
    },
    Subscribe(SubscribeRequest),
    Unsubscribe {
        conn: ConnId,
        entity_code: String,
        entity_ids: Option<Vec<String>>,
    },
    UnsubscribeAll(ConnId),
    /// Answer REACHED once the live stream has passed `cursor` and the connection replays
    /// nothing: everything up to it has been sent.
    Await {
        conn: ConnId,
        cursor: Cursor,
        reference: Option<String>,
    },
    /// Changes in log order, judged, and the position after them.
    Batch(Arc<JudgedBatch>),
    /// The reader lost its place (its cursor expired): everyone resynchronises.
    Reset(Cursor),
    /// Entities replaced under their code: their subscribers refetch.
    Replaced(Vec<String>),
    /// A SUBSCRIBE checked against a table no longer tracked under its code: refused with
    /// RESYNC (the client refetches).
    Outdated {
        conn: ConnId,
        entity_code: String,
    },
    Replay(ReplayEvent),
}

impl From<Staged> for Command {
    fn from(staged: Staged) -> Command {
        match staged {
            Staged::Batch(batch) => Command::Batch(batch),
            Staged::Reset(position) => Command::Reset(position),
            Staged::Replaced(codes) => Command::Replaced(codes),
            Staged::Outdated { conn, entity_code } => Command::Outdated { conn, entity_code },
        }
    }
}

impl Passing for Command {
    fn listening(&self) -> Option<Listening<'_>> {
        Some(match self {
            Command::Connect(c) => Listening::Connect {
                conn: c.id,
                group: c.group,
                user: &c.user,
            },
            Command::Reauth { conn, user, group } => Listening::Reauth {
                conn: *conn,
                group: *group,
                user,
            },
            Command::Subscribe(s) => Listening::Subscribe {
                conn: s.conn,
                entity: &s.subscription.entity_code,
                tracking: s.tracking,
            },
            Command::Unsubscribe {
                conn,
                entity_code,
                entity_ids: None,
            } => Listening::Unsubscribe {
                conn: *conn,
                entity: entity_code,
            },
            Command::UnsubscribeAll(conn) => Listening::UnsubscribeAll(*conn),
            Command::Disconnect(conn) => Listening::Disconnect(*conn),
            _ => return None,
        })
    }
}

/// A connection as the router sees it.
pub struct Connection {
    pub id: ConnId,
    pub user: Arc<UserContext>,
    pub group: GroupId,
    /// Changes carrying this origin tag (or `<sub>:<tag>`) are not sent back.
    pub client_id: Option<String>,
    pub queue: Outbound,
    /// Cancelled to close the connection (too slow): it resumes from its cursor.
    pub kick: CancellationToken,
}

/// A SUBSCRIBE that the connection checked (admission, names, columns, cursor).
pub struct SubscribeRequest {
    pub conn: ConnId,
    pub subscription: Subscription,
    pub since: Option<Cursor>,
    pub reference: Option<String>,
    /// The entity's tracking when the request was checked (`Entity::tracking`): a request
    /// checked against a table since replaced under the code is refused at the stage.
    pub tracking: i64,
}

/// One step of a replay's page, in log order.
#[derive(Clone, Debug)]
pub enum ReplayItem {
    /// A change of the subscription's entity, with what the page's judgement says of it.
    Change(Arc<Change>, Verdict),
    /// A database transaction ended here, with this change (of any entity).
    TxEnd(Arc<Change>),
}

/// What a replay reports.
pub enum ReplayEvent {
    /// A part of the gap, in log order. `queued` is told once the router has queued it: the
    /// replay hands on its next part only then, so that its wait for room in the connection's
    /// queue sees this part there (parts still in the channel are not counted yet).
    Page {
        conn: ConnId,
        sub: SubId,
        items: Vec<ReplayItem>,
        queued: tokio::sync::oneshot::Sender<()>,
    },
    /// The gap is read up to `until`: SYNCED, then the live changes kept meanwhile.
    Done { conn: ConnId, sub: SubId },
    /// The replay could not run: this message ends the subscription.
    Failed {
        conn: ConnId,
        sub: SubId,
        message: ServerMessage,
    },
}

/// A replay for the replay task to run.
#[derive(Clone)]
pub struct ReplayStart {
    pub conn: ConnId,
    pub sub: SubId,
    pub user: Arc<UserContext>,
    pub group: GroupId,
    pub client_id: Option<String>,
    pub subscription: Subscription,
    pub since: Cursor,
    pub until: Cursor,
    /// The connection's queue, whose room the replay waits for before each page.
    pub queue: Outbound,
    /// Cancelled when the subscription ends before its replay does: the replay stops.
    pub cancel: CancellationToken,
}
