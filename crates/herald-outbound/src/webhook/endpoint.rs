//! A webhook endpoint: where to send, which events, how to sign, how fast — and the state
//! Herald keeps about it (failing since when, disabled and why).
//!
//! Owns: [`Endpoint`] (the operator's definition, from `[[webhooks.endpoints]]` or the server
//! API, stored as a JSON document), its validation, the event selection ([`Endpoint::wants`])
//! and [`EndpointState`].
//!
//! May touch: nothing.

use herald_core::duration::HumanDuration;
use herald_core::node::glob_match;
use serde::{Deserialize, Serialize};

use super::event::EventType;
use super::sign::Secret;

/// Longest endpoint id.
pub const MAX_ID_LEN: usize = 64;
/// Most secrets at once (a rotation needs two; a few more leave room for slow receivers).
pub const MAX_SECRETS: usize = 5;
/// Most channel patterns per endpoint.
pub const MAX_CHANNEL_PATTERNS: usize = 100;
/// Longest URL.
pub const MAX_URL_LEN: usize = 2048;

/// One endpoint, as the operator defines it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Letters, digits, `-`, `_` and `.`; at most 64.
    pub id: String,
    /// `http://` or `https://`.
    pub url: String,
    /// Event types (`publication`, `client.connected`, …, or `*` for all).
    pub events: Vec<String>,
    /// Channel patterns (`*` matches any run of characters) for the events that have a
    /// channel (publications, subscriptions, presence); empty: every channel.
    #[serde(default)]
    pub channels: Vec<String>,
    /// `whsec_…` signing secrets; every one signs each delivery (a rotation: add the new
    /// one, update the receiver, remove the old one).
    pub secrets: Vec<String>,
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Deliveries per second to this endpoint, across the cluster; 0: no limit.
    #[serde(default)]
    pub rate_limit: u32,
    /// Deliver one at a time, in the order the events were queued.
    #[serde(default)]
    pub ordered: bool,
    /// How long one request may take; the server's `webhooks.timeout` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

fn enabled() -> bool {
    true
}

/// What Herald learnt about an endpoint (kept apart from the definition).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    /// When the current run of failures began (ms); `None` while it succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<u64>,
    /// Set when Herald disabled the endpoint (410 Gone, or failing too long).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<Disabled>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disabled {
    pub at: u64,
    pub reason: String,
}

impl Endpoint {
    /// Checks everything that needs nothing but the endpoint itself.
    pub fn validate(&self) -> Result<(), String> {
        validate_id(&self.id)?;
        if self.url.len() > MAX_URL_LEN {
            return Err(format!("url is longer than {MAX_URL_LEN} bytes"));
        }
        let url = url::Url::parse(&self.url).map_err(|e| format!("url {:?}: {e}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(format!("url {:?} must be http(s)://host/…", self.url));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("url must not carry credentials".into());
        }
        if self.events.is_empty() {
            return Err("events must name at least one event type (or \"*\")".into());
        }
        for event in &self.events {
            if event != "*" && EventType::parse(event).is_none() {
                return Err(format!(
                    "unknown event type {event:?}; known: {}",
                    EventType::ALL.map(EventType::as_str).join(", ")
                ));
            }
        }
        if self.channels.len() > MAX_CHANNEL_PATTERNS {
            return Err(format!("at most {MAX_CHANNEL_PATTERNS} channel patterns"));
        }
        if self.channels.iter().any(String::is_empty) {
            return Err("a channel pattern must not be empty".into());
        }
        if self.secrets.is_empty() {
            return Err("secrets needs at least one whsec_… secret".into());
        }
        if self.secrets.len() > MAX_SECRETS {
            return Err(format!("at most {MAX_SECRETS} secrets"));
        }
        for secret in &self.secrets {
            Secret::parse(secret).map_err(|e| format!("secrets: {e}"))?;
        }
        if self.timeout.is_some_and(HumanDuration::is_zero) {
            return Err("timeout must be above 0".into());
        }
        Ok(())
    }

    /// The parsed secrets (validated endpoints only have good ones).
    pub fn signing_secrets(&self) -> Vec<Secret> {
        self.secrets
            .iter()
            .filter_map(|s| Secret::parse(s).ok())
            .collect()
    }

    /// Whether an event of `kind` on `channel` (`None`: an event without one) goes here.
    pub fn wants(&self, kind: EventType, channel: Option<&str>) -> bool {
        let typed = self.events.iter().any(|e| e == "*" || e == kind.as_str());
        if !typed {
            return false;
        }
        match channel {
            Some(channel) if !self.channels.is_empty() => {
                self.channels.iter().any(|p| glob_match(p, channel))
            }
            _ => true,
        }
    }

    /// The endpoint with its secrets hidden (`whsec_…` and the last 4 characters), for
    /// listings.
    pub fn redacted(&self) -> Endpoint {
        let mut shown = self.clone();
        for secret in &mut shown.secrets {
            let tail: String = secret
                .chars()
                .rev()
                .take(4)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            *secret = format!("whsec_…{tail}");
        }
        shown
    }
}

pub fn validate_id(id: &str) -> Result<(), String> {
    let good = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if good {
        Ok(())
    } else {
        Err(format!(
            "id {id:?} must be 1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint {
            id: "orders".into(),
            url: "https://example.com/hook".into(),
            events: vec!["publication".into(), "client.connected".into()],
            channels: vec!["orders:*".into()],
            secrets: vec![Secret::generate()],
            enabled: true,
            rate_limit: 0,
            ordered: false,
            timeout: None,
            description: String::new(),
        }
    }

    #[test]
    fn selects_events_by_type_and_channel_pattern() {
        let e = endpoint();
        assert!(e.wants(EventType::Publication, Some("orders:42")));
        assert!(!e.wants(EventType::Publication, Some("chat:1")));
        assert!(e.wants(EventType::ClientConnected, None));
        assert!(!e.wants(EventType::ClientDisconnected, None));
        let all = Endpoint {
            events: vec!["*".into()],
            channels: Vec::new(),
            ..endpoint()
        };
        assert!(all.wants(EventType::PresenceJoin, Some("any")));
    }

    #[test]
    fn bad_definitions_are_refused_with_the_reason() {
        assert_eq!(endpoint().validate(), Ok(()));
        for (bad, needle) in [
            (
                Endpoint {
                    id: "a b".into(),
                    ..endpoint()
                },
                "id",
            ),
            (
                Endpoint {
                    url: "ftp://x".into(),
                    ..endpoint()
                },
                "http",
            ),
            (
                Endpoint {
                    url: "https://u:p@x".into(),
                    ..endpoint()
                },
                "credentials",
            ),
            (
                Endpoint {
                    events: vec![],
                    ..endpoint()
                },
                "events",
            ),
            (
                Endpoint {
                    events: vec!["nope".into()],
                    ..endpoint()
                },
                "unknown event",
            ),
            (
                Endpoint {
                    secrets: vec![],
                    ..endpoint()
                },
                "secrets",
            ),
            (
                Endpoint {
                    secrets: vec!["plain".into()],
                    ..endpoint()
                },
                "whsec_",
            ),
            (
                Endpoint {
                    channels: vec![String::new()],
                    ..endpoint()
                },
                "pattern",
            ),
        ] {
            let error = bad.validate().expect_err(needle);
            assert!(error.contains(needle), "{error}");
        }
    }

    #[test]
    fn listings_hide_secrets() {
        let e = endpoint();
        let shown = e.redacted();
        assert!(shown.secrets[0].starts_with("whsec_…"));
        assert_eq!(
            shown.secrets[0].chars().count(),
            "whsec_…".chars().count() + 4
        );
    }
}
