//! Server API keys: kept only as SHA-256 digests and compared in constant time, so neither
//! the key nor its length leaks through timing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The accepted API keys.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            digests: keys.into_iter().map(digest).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// True if `presented` is one of the keys. Checks every key, whatever matches first.
    pub fn verify(&self, presented: &str) -> bool {
        let candidate = digest(presented);
        let mut matched = subtle::Choice::from(0);
        for known in &self.digests {
            matched |= known.ct_eq(&candidate);
        }
        matched.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_configured_keys() {
        let keys = ApiKeys::new(["first-key-0123456789", "second-key-0123456789"]);
        assert!(keys.verify("first-key-0123456789"));
        assert!(keys.verify("second-key-0123456789"));
        assert!(!keys.verify("first-key-012345678"));
        assert!(!keys.verify(""));
        assert!(!ApiKeys::default().verify(""));
    }
}
