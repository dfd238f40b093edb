//! The plain types every stage shares: a change of the log and what a subscriber sees of it,
//! cursors, subscriptions with their filters and the judgement of a change, and the
//! WebSocket protocol. Pure: no I/O anywhere below.

pub mod change;
pub mod cursor;
pub mod digest;
pub mod filter;
pub mod protocol;
pub mod subscription;
