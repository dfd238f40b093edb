//! Who may do and see what. `auth` checks tokens; `roles` decides which role a user acts as
//! (and `Groups` gives users of one role and claims one group); `admission` says whether a
//! user may read an entity at all; `plans`, `policy` and `visibility` judge each change for
//! row-level security, in the stage between the feed and the router; `limits` bounds the
//! work clients cause.

pub mod admission;
pub mod auth;
pub mod limits;
pub mod plans;
pub mod policy;
pub mod roles;
pub mod visibility;
