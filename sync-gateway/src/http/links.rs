//! Signed page links. A page of `/v1/changes` is kept a year by the cache in front when it is
//! closed, and any consistent cursor makes a closed page: with made-up positions one reader
//! could make pages of their own without end and push everyone's out of the cache. So the
//! gateway signs each position it links pages from (`sig`, a MAC of the entity and the
//! position), and a cache in front keeps a closed page only at a signed position. A page at
//! an unsigned one is still served, to its reader alone. Every gateway behind one cache signs
//! with the same key: `--page-link-secret`, or one derived from `--jwt-secret`.

use crate::model::digest::hex;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Bytes of the MAC a link carries (in hex, twice as many characters).
const SIGNATURE_BYTES: usize = 16;

pub struct PageLinks {
    key: [u8; 32],
}

impl PageLinks {
    /// Links signed with a key derived from `secret` (so that the signing key is not the
    /// token secret itself).
    pub fn new(secret: &[u8]) -> PageLinks {
        let mut hasher = Sha256::new();
        hasher.update(b"pg_sync page links\0");
        hasher.update(secret);
        PageLinks {
            key: hasher.finalize().into(),
        }
    }

    /// Links only this process can sign (no secret was given): pages linked by another
    /// gateway are served, but not kept in front.
    pub fn of_this_process() -> PageLinks {
        PageLinks::new(uuid::Uuid::new_v4().as_bytes())
    }

    /// The `sig` of a link to the page of `entity` starting at `since`.
    pub fn sign(&self, entity: &str, since: &str) -> String {
        hex(&self.mac(entity, since).finalize().into_bytes()[..SIGNATURE_BYTES])
    }

    /// Whether `sig` is the signature of a link to that page, spelled as `sign` spells it
    /// (lower-case hex: each spelling would be a URL of its own in a cache), compared in
    /// constant time.
    pub fn signed(&self, entity: &str, since: &str, sig: &str) -> bool {
        let spelled = sig.len() == 2 * SIGNATURE_BYTES
            && sig.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let bytes: Option<Vec<u8>> = spelled
            .then(|| {
                (0..sig.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(sig.get(i..i + 2)?, 16).ok())
                    .collect()
            })
            .flatten();
        bytes.is_some_and(|bytes| {
            self.mac(entity, since)
                .verify_truncated_left(&bytes)
                .is_ok()
        })
    }

    fn mac(&self, entity: &str, since: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(entity.as_bytes());
        mac.update(b"\0");
        mac.update(since.as_bytes());
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_page_alone_and_under_its_key_alone() {
        let links = PageLinks::new(b"secret");
        let sig = links.sign("task", "1.a.2");
        assert_eq!(sig.len(), 32);
        assert!(links.signed("task", "1.a.2", &sig));
        assert!(
            PageLinks::new(b"secret").signed("task", "1.a.2", &sig),
            "another gateway, same secret"
        );
        assert!(!links.signed("task", "1.a.3", &sig), "another position");
        assert!(!links.signed("note", "1.a.2", &sig), "another entity");
        assert!(
            !links.signed("task", "1.a.2", &sig.to_uppercase()),
            "another spelling"
        );
        let plus = format!("+{}", &sig[1..]);
        assert!(!links.signed("task", "1.a.2", &plus), "another spelling");
        let flipped = format!(
            "{}{}",
            if sig.starts_with('0') { '1' } else { '0' },
            &sig[1..]
        );
        assert!(
            !links.signed("task", "1.a.2", &flipped),
            "another signature"
        );
        assert!(!links.signed("task", "1.a.2", &sig[..30]), "cut short");
        assert!(!links.signed("task", "1.a.2", "zz"), "not hex");
        assert!(
            !links.signed("task", "1.a.2", "é0000000000000000000000000000000"),
            "not ASCII"
        );
        assert!(!PageLinks::new(b"other").signed("task", "1.a.2", &sig));
        assert!(!PageLinks::of_this_process().signed("task", "1.a.2", &sig));
    }
}
