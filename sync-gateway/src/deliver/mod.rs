//! Delivering changes to connections: the `router` (pure state: who gets what) and what it
//! is told (`command`), `replay` (a subscription's gap, read from the log and handed to the
//! router), `outbox` (messages built from runs of changes), `queue` (each connection's
//! byte-bounded send queue), the `connection` itself (a reader and a writer task per socket),
//! the `mirror` of subscriptions in `sync.subscription`, and `reach`: whether a client's
//! cursor can be served from the live stream yet.

pub mod command;
pub mod connection;
pub mod mirror;
pub mod outbox;
pub mod queue;
pub mod reach;
pub mod replay;
pub mod router;
