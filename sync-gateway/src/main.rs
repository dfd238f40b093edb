//! `sync-gateway`: the server beside PostgreSQL that pushes pg_sync's change log to clients.
//! Its WebSocket and HTTP sides come with their own issue; for now it reports its version.

fn main() {
    println!("sync-gateway {}", env!("CARGO_PKG_VERSION"));
}
