//! Server API keys: kept only as SHA-256 digests and compared in constant time, so neither
//! the key nor its length leaks through timing. Each key has a scope — `admin` (every
//! method), `publish` or `read` — and a name for logs; which methods a scope allows is
//! decided in one place, [`crate::api::Method::allowed_for`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// What a key may call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Admin,
    Publish,
    Read,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Admin => "admin",
            Self::Publish => "publish",
            Self::Read => "read",
        })
    }
}

/// A key that matched: its scope and its name (or `api.keys[N]`). Shared, not copied: it is
/// made for every API request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMatch {
    pub scope: Scope,
    pub name: Arc<str>,
}

#[derive(Clone, Debug)]
struct Entry {
    digest: [u8; 32],
    scope: Scope,
    name: Arc<str>,
}

/// The accepted API keys.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    entries: Vec<Entry>,
}

/// The SHA-256 digest of a key, as stored (also what `sha256` in config holds, in hex).
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    /// Admin keys, named after their position.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        let mut out = Self::default();
        for (index, key) in keys.into_iter().enumerate() {
            out.add_digest(digest(key), Scope::Admin, format!("api.keys[{index}]"));
        }
        out
    }

    pub fn add_digest(&mut self, digest: [u8; 32], scope: Scope, name: String) {
        self.entries.push(Entry {
            digest,
            scope,
            name: name.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The key `presented` is, if any. Every key is compared, whatever matches first, and the
    /// match is selected without branching on secret data.
    pub fn verify(&self, presented: &str) -> Option<KeyMatch> {
        let candidate = digest(presented);
        let mut matched = subtle::Choice::from(0);
        let mut position = 0u32;
        for (index, entry) in self.entries.iter().enumerate() {
            let equal = entry.digest.ct_eq(&candidate);
            // Entries are few (config); the index fits.
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            position = u32::conditional_select(&position, &index, equal);
            matched |= equal;
        }
        if bool::from(matched) {
            let entry = self.entries.get(position as usize)?;
            Some(KeyMatch {
                scope: entry.scope,
                name: entry.name.clone(),
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_configured_keys_and_reports_their_scope() {
        let mut keys = ApiKeys::new(["first-key-0123456789", "second-key-0123456789"]);
        keys.add_digest(
            digest("publisher-key-0123456789"),
            Scope::Publish,
            "ci".into(),
        );
        assert_eq!(
            keys.verify("first-key-0123456789").map(|m| m.scope),
            Some(Scope::Admin)
        );
        assert_eq!(
            keys.verify("second-key-0123456789").map(|m| m.name),
            Some(Arc::from("api.keys[1]"))
        );
        let publisher = keys.verify("publisher-key-0123456789").expect("match");
        assert_eq!((publisher.scope, &*publisher.name), (Scope::Publish, "ci"));
        assert!(keys.verify("first-key-012345678").is_none());
        assert!(keys.verify("").is_none());
        assert!(ApiKeys::default().verify("").is_none());
    }
}
