//! `--gateway-secret-key`: how a peer's key is checked, and how a node
//! signs what it publishes about itself with it.
//!
//! A key is compared through its SHA-256 digest, in constant time: the
//! time a comparison takes says nothing about the key, not even its length
//! (comparing the raw bytes returns at once on a length mismatch).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// `--gateway-secret-key` (empty: no key).
#[derive(Clone)]
pub struct GatewayKey {
    key: Vec<u8>,
    digest: [u8; 32],
}

impl std::fmt::Debug for GatewayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayKey(<redacted>)")
    }
}

impl GatewayKey {
    /// The key `key`; `""` is no key.
    pub fn new(key: &str) -> GatewayKey {
        GatewayKey {
            key: key.as_bytes().to_vec(),
            digest: Sha256::digest(key.as_bytes()).into(),
        }
    }

    /// Whether no key is set (peers need not present one).
    pub fn is_empty(&self) -> bool {
        self.key.is_empty()
    }

    /// Whether `given` is the key, in time independent of both.
    pub fn matches(&self, given: &[u8]) -> bool {
        let given: [u8; 32] = Sha256::digest(given).into();
        bool::from(given.ct_eq(&self.digest))
    }

    /// HMAC-SHA256 of `parts` (each length-prefixed, so no two lists of
    /// parts sign alike), hex-encoded; `None` without a key.
    pub fn sign(&self, parts: &[&[u8]]) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let tag = self.mac(parts).finalize().into_bytes();
        Some(tag.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Whether `signature` (hex) is this key's HMAC of `parts`; checked in
    /// constant time. Always false without a key.
    pub fn verify(&self, parts: &[&[u8]], signature: &str) -> bool {
        if self.is_empty() || signature.len() != 64 {
            return false;
        }
        let mut tag = [0u8; 32];
        for (i, byte) in tag.iter_mut().enumerate() {
            match u8::from_str_radix(signature.get(2 * i..2 * i + 2).unwrap_or("zz"), 16) {
                Ok(b) => *byte = b,
                Err(_) => return false,
            }
        }
        self.mac(parts).verify_slice(&tag).is_ok()
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_themselves() {
        let key = GatewayKey::new("a-strong-gateway-key-0123");
        assert!(key.matches(b"a-strong-gateway-key-0123"));
        assert!(!key.matches(b"a-strong-gateway-key-012"));
        assert!(!key.matches(b""));
        let none = GatewayKey::new("");
        assert!(none.is_empty());
        assert!(none.matches(b""));
        assert!(!none.matches(b"x"));
    }

    #[test]
    fn signatures_verify_only_with_the_key_and_the_same_parts() {
        let key = GatewayKey::new("a-strong-gateway-key-0123");
        let sig = key.sign(&[b"node", b"instance"]).unwrap();
        assert_eq!(sig.len(), 64);
        assert!(key.verify(&[b"node", b"instance"], &sig));
        assert!(!key.verify(&[b"nodei", b"nstance"], &sig));
        assert!(!GatewayKey::new("another-strong-key-4567").verify(&[b"node", b"instance"], &sig));
        assert!(!key.verify(&[b"node", b"instance"], "zz"));
        assert!(GatewayKey::new("").sign(&[b"x"]).is_none());
        assert!(!GatewayKey::new("").verify(&[b"x"], &sig));
    }
}
