//! Channel keys: stored only as a salted SHA-256 hash, compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A key as the zone keeps it.
pub type KeyHash = [u8; 32];

/// The hash of `key` salted with the zone's random nonce (so a zone dump does not give away
/// keys that are reused elsewhere).
pub fn hash_key(salt: u64, key: &[u8]) -> KeyHash {
    let mut h = Sha256::new();
    h.update(salt.to_le_bytes());
    h.update(key);
    h.finalize().into()
}

/// Whether two key hashes are equal, in time independent of where they differ.
pub fn same_key(a: &KeyHash, b: &KeyHash) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salted_and_compared() {
        let a = hash_key(1, b"secret");
        assert!(same_key(&a, &hash_key(1, b"secret")));
        assert!(!same_key(&a, &hash_key(2, b"secret")));
        assert!(!same_key(&a, &hash_key(1, b"secreT")));
    }
}
