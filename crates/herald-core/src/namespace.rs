//! Namespace options and the registry that resolves a channel to its options.
//!
//! Options live in config (`[namespace]` for the default namespace, `[[namespaces]]` for named
//! ones); a channel whose namespace is not configured is rejected with `unknown channel`.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::channel::ChannelName;
use crate::duration::HumanDuration;
use crate::error::{ErrorCode, HeraldError};

/// Behaviour of every channel in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceOptions {
    /// Publications kept per channel (0 disables history).
    pub history_size: u32,
    /// How long each publication is kept (0 disables history).
    pub history_ttl: HumanDuration,
    /// Track who is subscribed.
    pub presence: bool,
    /// Send join/leave events to subscribers.
    pub join_leave: bool,
    /// Connected clients may publish to channels in this namespace.
    pub allow_publish_for_client: bool,
    /// Anonymous connections may subscribe.
    pub allow_subscribe_for_anonymous: bool,
    /// Subscribers may read history.
    pub allow_history_for_subscriber: bool,
    /// Subscribers may read presence.
    pub allow_presence_for_subscriber: bool,
    /// How long an idempotency key is remembered.
    pub idempotency_window: HumanDuration,
    /// A subscriber that falls behind gets only the newest queued publication of each channel
    /// (the older ones still queued for it are dropped) instead of being disconnected as slow.
    /// For "latest value wins" data: prices, positions, scores.
    pub conflate: bool,
    /// Subscribing needs a subscription token for the channel (or the channel listed in the
    /// connection token's `channels`): for private channels the application decides on.
    pub require_subscription_token: bool,
    /// Subscriptions (without a subscription token) are decided by the backend's subscribe
    /// proxy instead of the rules above.
    pub proxy_subscribe: bool,
    /// Client publications are decided (and may be rewritten) by the backend's publish proxy.
    pub proxy_publish: bool,
    /// Live first, push when offline: a publication on a user-limited channel (`inbox:#alice`)
    /// is pushed to the devices of each of the channel's users who has no live subscription
    /// to it on any node (needs `[push] enabled`). Subscriptions are tracked as presence for
    /// this, whether or not `presence` exposes them.
    pub push_offline: bool,
    /// With `push_offline`: a user who is subscribed must acknowledge the publication
    /// (`herald.ack`) within this time, or gets the push too. `0s`: no acknowledgements.
    pub push_ack_timeout: HumanDuration,
    /// The push's title and body: `{data.field}` (a dotted path into the publication's JSON
    /// data), `{channel}` and `{offset}` are replaced; a missing field is empty.
    pub push_title: String,
    pub push_body: String,
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        Self {
            history_size: 1000,
            history_ttl: HumanDuration::from_secs(24 * 3600),
            presence: false,
            join_leave: false,
            allow_publish_for_client: false,
            allow_subscribe_for_anonymous: false,
            allow_history_for_subscriber: false,
            allow_presence_for_subscriber: false,
            idempotency_window: HumanDuration::from_secs(300),
            conflate: false,
            require_subscription_token: false,
            proxy_subscribe: false,
            proxy_publish: false,
            push_offline: false,
            push_ack_timeout: HumanDuration::ZERO,
            push_title: "{data.title}".into(),
            push_body: "{data.body}".into(),
        }
    }
}

impl NamespaceOptions {
    /// Whether subscriptions are recorded in presence (for presence, or to know who is live).
    pub fn tracks_presence(&self) -> bool {
        self.presence || self.push_offline
    }

    pub fn history_enabled(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }
}

/// A named namespace as written in config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedNamespace {
    pub name: String,
    #[serde(flatten)]
    pub options: NamespaceOptions,
}

/// Resolves channels to namespace options.
#[derive(Clone, Debug, Default)]
pub struct Namespaces {
    default: Arc<NamespaceOptions>,
    named: HashMap<String, Arc<NamespaceOptions>>,
}

impl Namespaces {
    /// Builds the registry; names must be non-empty, unique, and use `[A-Za-z0-9_-]`.
    pub fn new(default: NamespaceOptions, named: Vec<NamedNamespace>) -> Result<Self, HeraldError> {
        let mut map = HashMap::with_capacity(named.len());
        for ns in named {
            let valid = !ns.name.is_empty()
                && ns
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(HeraldError::bad_request(format!(
                    "namespace name {:?} must be non-empty and use only letters, digits, '_' and '-'",
                    ns.name
                )));
            }
            if map.insert(ns.name.clone(), Arc::new(ns.options)).is_some() {
                return Err(HeraldError::bad_request(format!(
                    "namespace {:?} is configured twice",
                    ns.name
                )));
            }
        }
        Ok(Self {
            default: Arc::new(default),
            named: map,
        })
    }

    /// Options for `channel`, or `unknown channel` if its namespace is not configured.
    pub fn resolve(&self, channel: &ChannelName) -> Result<&Arc<NamespaceOptions>, HeraldError> {
        match channel.namespace() {
            None => Ok(&self.default),
            Some(ns) => self.named.get(ns).ok_or_else(|| {
                HeraldError::new(
                    ErrorCode::UnknownChannel,
                    format!("namespace {ns:?} is not configured"),
                )
            }),
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.named.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelRules;

    #[test]
    fn resolves_default_named_and_unknown() {
        let chat = NamespaceOptions {
            presence: true,
            ..NamespaceOptions::default()
        };
        let namespaces = Namespaces::new(
            NamespaceOptions::default(),
            vec![NamedNamespace {
                name: "chat".into(),
                options: chat.clone(),
            }],
        )
        .expect("valid");
        let rules = ChannelRules::default();
        let resolve = |name: &str| {
            let channel = ChannelName::parse(name, &rules).expect("valid name");
            namespaces.resolve(&channel).map(|o| (**o).clone())
        };
        assert_eq!(resolve("news"), Ok(NamespaceOptions::default()));
        assert_eq!(resolve("chat:1"), Ok(chat));
        assert_eq!(
            resolve("nope:1").expect_err("unknown").code,
            ErrorCode::UnknownChannel
        );
    }

    #[test]
    fn rejects_duplicate_and_bad_names() {
        let ns = |name: &str| NamedNamespace {
            name: name.into(),
            options: NamespaceOptions::default(),
        };
        assert!(Namespaces::new(NamespaceOptions::default(), vec![ns("a"), ns("a")]).is_err());
        assert!(Namespaces::new(NamespaceOptions::default(), vec![ns("a:b")]).is_err());
        assert!(Namespaces::new(NamespaceOptions::default(), vec![ns("")]).is_err());
    }
}
