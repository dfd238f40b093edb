//! The feed: what comes from the database, once per gateway. `listen` wakes the `reader`,
//! which pages through the log (`log`) and hands pages to the visibility stage; on a hot
//! standby (`--read-url`) it first marks the log on the primary and waits for the standby to
//! replay the mark (`replica`). `catalog` knows the tracked entities; `ingest` drives WAL
//! capture on one gateway at a time. The feed has its own connections (`--feed-pool-size`), which no client work can take.

pub mod catalog;
pub mod ingest;
pub mod listen;
pub mod log;
pub mod reader;
pub mod replica;
