//! Channel names: parsing and validation.
//!
//! A channel is `namespace:name`, or just `name` in the default namespace. A `#` makes it
//! user-limited: everything after the last `#` is a comma-separated list of the only users
//! allowed to subscribe (`inbox:#alice`, `dm:#alice,bob`). Names are ASCII from a small,
//! URL- and header-safe alphabet so that every transport can carry them unescaped.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::HeraldError;

/// Syntax rules for channel names (configurable under `[channels]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelRules {
    /// Longest accepted channel name in bytes.
    pub max_length: usize,
}

impl Default for ChannelRules {
    fn default() -> Self {
        Self { max_length: 255 }
    }
}

pub const NAMESPACE_BOUNDARY: char = ':';
pub const USER_BOUNDARY: char = '#';
pub const USER_SEPARATOR: char = ',';

/// Characters allowed in channel names besides ASCII letters and digits.
const ALLOWED_PUNCTUATION: &str = "_-.:#,=@/+~$!";

fn is_allowed_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || ALLOWED_PUNCTUATION.as_bytes().contains(&byte)
}

/// A validated channel name with its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelName {
    full: Arc<str>,
    namespace_len: Option<usize>,
    users_start: Option<usize>,
}

impl ChannelName {
    /// Validates `name` against `rules`.
    pub fn parse(name: &str, rules: &ChannelRules) -> Result<Self, HeraldError> {
        if name.is_empty() {
            return Err(HeraldError::bad_request("channel name is empty"));
        }
        if name.len() > rules.max_length {
            return Err(HeraldError::bad_request(format!(
                "channel name is {} bytes long; the limit is {}",
                name.len(),
                rules.max_length
            )));
        }
        if let Some(bad) = name.bytes().find(|b| !is_allowed_char(*b)) {
            let shown = if bad.is_ascii_graphic() {
                format!("{:?}", bad as char)
            } else {
                format!("byte 0x{bad:02x}")
            };
            return Err(HeraldError::bad_request(format!(
                "channel name contains {shown}; allowed are ASCII letters, digits and {ALLOWED_PUNCTUATION}"
            )));
        }
        let namespace_len = name.find(NAMESPACE_BOUNDARY);
        if namespace_len == Some(0) {
            return Err(HeraldError::bad_request(
                "channel namespace before ':' is empty",
            ));
        }
        let users_start = name.rfind(USER_BOUNDARY).map(|i| i + 1);
        if let Some(start) = users_start {
            let users = &name[start..];
            if users.is_empty() || users.split(USER_SEPARATOR).any(str::is_empty) {
                return Err(HeraldError::bad_request(
                    "user-limited channel needs user ids after '#', separated by ','",
                ));
            }
        }
        Ok(Self {
            full: Arc::from(name),
            namespace_len,
            users_start,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn as_arc(&self) -> &Arc<str> {
        &self.full
    }

    /// The namespace, or `None` for the default namespace.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace_len.map(|len| &self.full[..len])
    }

    /// Users allowed to subscribe to a user-limited channel; `None` if not user-limited.
    pub fn allowed_users(&self) -> Option<impl Iterator<Item = &str>> {
        self.users_start
            .map(|start| self.full[start..].split(USER_SEPARATOR))
    }

    /// True if `user` may subscribe as far as the `#` rule goes.
    pub fn user_allowed(&self, user: &str) -> bool {
        match self.allowed_users() {
            None => true,
            Some(mut users) => !user.is_empty() && users.any(|u| u == user),
        }
    }
}

impl std::fmt::Display for ChannelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn parse(name: &str) -> Result<ChannelName, HeraldError> {
        ChannelName::parse(name, &ChannelRules::default())
    }

    #[test]
    fn splits_namespace_and_users() {
        let plain = parse("news").expect("valid");
        assert_eq!(plain.namespace(), None);
        assert!(plain.user_allowed("anyone"));

        let limited = parse("inbox:#alice,bob").expect("valid");
        assert_eq!(limited.namespace(), Some("inbox"));
        assert!(limited.user_allowed("alice"));
        assert!(limited.user_allowed("bob"));
        assert!(!limited.user_allowed("mallory"));
        assert!(!limited.user_allowed(""));

        let nested = parse("chat:room:1").expect("valid");
        assert_eq!(nested.namespace(), Some("chat"));
    }

    #[test]
    fn rejects_bad_names_with_bad_request() {
        let too_long = "a".repeat(256);
        for bad in [
            "",
            ":x",
            "has space",
            "emoji\u{1F600}",
            "tab\t",
            "inbox:#",
            "dm:#a,,b",
            "x*",
            too_long.as_str(),
        ] {
            let err = parse(bad).expect_err(bad);
            assert_eq!(err.code, ErrorCode::BadRequest, "{bad:?}");
        }
        assert!(parse(&"a".repeat(255)).is_ok());
    }
}
