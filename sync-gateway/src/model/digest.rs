//! Short digests: names that stand for their inputs (a page's audience, a page's bytes for
//! its `ETag`, who may read the entities).

use sha2::{Digest, Sha256};

/// 128 bits of SHA-256, in hex.
pub fn short_digest(data: &[u8]) -> String {
    hex(&Sha256::digest(data)[..16])
}

/// `bytes` in lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
