//! What pg_sync's extension and gateway must agree on, defined once and shared by both
//! crates: pure Rust, no PostgreSQL calls, unit-tested and fuzzable on their own.
//!
//! - `cursor`: positions in the change log (PostgreSQL snapshots), how they are written and
//!   compared;
//! - `policy`: a row-level-security policy as the extension compiles it (`sync.policy_plan`)
//!   and the gateway evaluates it, as serde types: the JSON between them is these types'.

pub mod cursor;
pub mod policy;
