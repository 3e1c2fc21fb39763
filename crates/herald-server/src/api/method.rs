//! The server API's methods, named once: the [`Method`] enum with each method's wire name
//! (the HTTP path `/api/<name>` and the key of a `batch` command), whether it spends the
//! publish rate, and which key scopes may call it. Everything else that needs a method
//! name — the HTTP adapter, the gRPC adapter, metrics labels, the OpenAPI check — asks here.
//!
//! May touch: nothing; this is a table.

use crate::auth::Scope;

macro_rules! methods {
    ($($variant:ident => $name:literal,)*) => {
        /// A server API method.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Method {
            $($variant,)*
        }

        impl Method {
            /// Every method, in the order of the API reference.
            pub const ALL: &'static [Method] = &[$(Method::$variant,)*];

            /// The wire name: `/api/<name>` and a `batch` command's key.
            pub fn name(self) -> &'static str {
                match self {
                    $(Method::$variant => $name,)*
                }
            }
        }
    };
}

methods! {
    Publish => "publish",
    Broadcast => "broadcast",
    History => "history",
    HistoryRemove => "history_remove",
    Presence => "presence",
    PresenceStats => "presence_stats",
    Channels => "channels",
    Info => "info",
    Disconnect => "disconnect",
    Unsubscribe => "unsubscribe",
    RevokeToken => "revoke_token",
    InvalidateUserTokens => "invalidate_user_tokens",
    Batch => "batch",
    DeviceRegister => "device_register",
    DeviceUpdate => "device_update",
    DeviceRemove => "device_remove",
    DeviceList => "device_list",
    DeviceTopicList => "device_topic_list",
    DeviceTopicUpdate => "device_topic_update",
    UserTopicList => "user_topic_list",
    UserTopicUpdate => "user_topic_update",
    SendPushNotification => "send_push_notification",
    CancelPush => "cancel_push",
    UpdatePushStatus => "update_push_status",
    PushStatus => "push_status",
    DeviceRemovals => "device_removals",
    WebhookEndpointCreate => "webhook_endpoint_create",
    WebhookEndpointUpdate => "webhook_endpoint_update",
    WebhookEndpointDelete => "webhook_endpoint_delete",
    WebhookEndpointList => "webhook_endpoint_list",
    WebhookDeliveries => "webhook_deliveries",
    WebhookAttempts => "webhook_attempts",
    WebhookReplay => "webhook_replay",
}

/// The service a method belongs to, which may be switched off in config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Core,
    /// `[push] enabled`.
    Push,
    /// `[webhooks] enabled`.
    Webhooks,
}

impl Method {
    /// The service behind this method.
    pub fn service(self) -> Service {
        use Method::*;
        match self {
            DeviceRegister | DeviceUpdate | DeviceRemove | DeviceList | DeviceTopicList
            | DeviceTopicUpdate | UserTopicList | UserTopicUpdate | SendPushNotification
            | CancelPush | UpdatePushStatus | PushStatus | DeviceRemovals => Service::Push,
            WebhookEndpointCreate
            | WebhookEndpointUpdate
            | WebhookEndpointDelete
            | WebhookEndpointList
            | WebhookDeliveries
            | WebhookAttempts
            | WebhookReplay => Service::Webhooks,
            _ => Service::Core,
        }
    }

    /// The method called `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|method| method.name() == name)
    }

    /// Whether a call spends a token of `api.publish_rate_per_key`.
    pub fn is_rate_limited(self) -> bool {
        matches!(self, Self::Publish | Self::Broadcast)
    }

    /// Whether a key with `scope` may call this method. `batch` itself is open to every key;
    /// each of its commands is checked on its own.
    pub fn allowed_for(self, scope: Scope) -> bool {
        match scope {
            Scope::Admin => true,
            Scope::Publish => matches!(self, Self::Publish | Self::Broadcast | Self::Batch),
            Scope::Read => matches!(
                self,
                Self::History
                    | Self::Presence
                    | Self::PresenceStats
                    | Self::Channels
                    | Self::Info
                    | Self::Batch
            ),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for method in Method::ALL {
            assert_eq!(Method::from_name(method.name()), Some(*method));
        }
        assert_eq!(Method::from_name("nope"), None);
        let mut names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Method::ALL.len());
    }

    #[test]
    fn scopes_allow_their_methods_only() {
        assert!(Method::Disconnect.allowed_for(Scope::Admin));
        assert!(Method::Broadcast.allowed_for(Scope::Publish));
        assert!(!Method::History.allowed_for(Scope::Publish));
        assert!(Method::History.allowed_for(Scope::Read));
        assert!(!Method::Publish.allowed_for(Scope::Read));
        assert!(!Method::HistoryRemove.allowed_for(Scope::Read));
        assert!(!Method::Disconnect.allowed_for(Scope::Publish));
        assert!(!Method::DeviceList.allowed_for(Scope::Read));
    }

    /// The OpenAPI document describes exactly the methods there are.
    #[test]
    fn openapi_lists_every_method() {
        let doc: serde_json::Value =
            serde_json::from_str(crate::app::OPENAPI).expect("docs/openapi.json parses");
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented: Vec<&str> = paths
            .keys()
            .filter_map(|path| path.strip_prefix("/api/"))
            .filter(|name| *name != "openapi.json")
            .collect();
        documented.sort_unstable();
        let mut methods: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        methods.sort_unstable();
        assert_eq!(documented, methods);
    }
}
