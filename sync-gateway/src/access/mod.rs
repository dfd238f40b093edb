//! Who may do and see what. `auth` checks tokens; `roles` decides which role a user acts as
//! (and `Groups` gives users of one role and claims one group); `admission` says whether a
//! user may read an entity at all; `judge` is the one judgement of a page of the log (of the
//! groups `listeners` gives, with `plans` and `policy` for row-level security, `in_database`
//! for what only the database can answer, and `refetch` for pages judged later than
//! written), which `stage` applies between the feed and the router; `sharing` says who may
//! share a cached page; `limits` bounds the work clients cause.

pub mod admission;
pub mod auth;
pub mod in_database;
pub mod judge;
pub mod limits;
pub mod listeners;
pub mod plans;
pub mod policy;
pub mod refetch;
pub mod roles;
pub mod sharing;
pub mod stage;
