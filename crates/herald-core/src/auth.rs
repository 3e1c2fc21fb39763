//! Who a client is and what it may do: credentials from a connection token, the
//! authenticator port that produces them, and the one permission check every transport uses.
//!
//! Owns the decisions only; token cryptography lives behind [`Authenticator`] in the server.

use serde_json::value::RawValue;

use crate::channel::ChannelName;
use crate::error::{ErrorCode, HeraldError};
use crate::namespace::NamespaceOptions;

/// An authenticated (or anonymous) client's identity.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// User id; empty for anonymous.
    pub user: String,
    /// Expiry as Unix seconds; `None` never expires.
    pub expires_at: Option<u64>,
    /// Connection info shown in presence and join/leave (the token's `info`).
    pub info: Option<Box<RawValue>>,
    /// Channels the client is subscribed to by the server at connect (the token's `channels`).
    pub channels: Vec<String>,
}

impl Credentials {
    pub fn anonymous() -> Self {
        Self::default()
    }

    pub fn is_anonymous(&self) -> bool {
        self.user.is_empty()
    }
}

/// What a verified subscription token grants: `user` may subscribe to `channel`.
#[derive(Clone, Debug, Default)]
pub struct SubscriptionGrant {
    /// The token's `sub`: must be the connection's user.
    pub user: String,
    /// The one channel the token is for.
    pub channel: String,
    /// Expiry as Unix seconds; `None` never expires.
    pub expires_at: Option<u64>,
    /// Channel-specific info shown in presence, join/leave and publications (`chan_info`).
    pub info: Option<Box<RawValue>>,
}

/// Turns tokens into credentials (JWT verification in the server). Async: a verifier may
/// have to fetch keys (a JWKS) first.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// A connection token. `Err` with `ErrorCode::TokenExpired` for an expired token,
    /// `Unauthorized` otherwise.
    async fn authenticate(&self, token: &str) -> Result<Credentials, HeraldError>;

    /// A subscription token (it names a `channel`); the same errors.
    async fn authenticate_subscription(
        &self,
        _token: &str,
    ) -> Result<SubscriptionGrant, HeraldError> {
        Err(HeraldError::new(
            ErrorCode::Unauthorized,
            "subscription tokens are not supported",
        ))
    }
}

/// Verifies a subscription token presented by `user`'s connection: the grant, if the token is
/// valid and is that user's (`PermissionDenied` otherwise). Which channel it grants is the
/// caller's to match against what was asked for.
pub async fn subscription_grant(
    authenticator: &dyn Authenticator,
    token: &str,
    user: &str,
) -> Result<SubscriptionGrant, HeraldError> {
    let grant = authenticator.authenticate_subscription(token).await?;
    if grant.user != user {
        return Err(HeraldError::new(
            ErrorCode::PermissionDenied,
            "the subscription token is for another user",
        ));
    }
    Ok(grant)
}

/// What a client asks to do on a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
    History,
    Presence,
}

/// The permission decision shared by every transport. `subscribed` says whether the client
/// is subscribed to the channel (needed for history and presence).
pub fn check(
    credentials: &Credentials,
    channel: &ChannelName,
    options: &NamespaceOptions,
    action: Action,
    subscribed: bool,
) -> Result<(), HeraldError> {
    let denied = |why: &str| {
        Err(HeraldError::new(
            ErrorCode::PermissionDenied,
            why.to_owned(),
        ))
    };
    match action {
        Action::Subscribe => {
            if !channel.user_allowed(&credentials.user) {
                return denied("the channel is limited to other users");
            }
            let granted_by_token = credentials.channels.iter().any(|c| c == channel.as_str());
            if options.require_subscription_token && !granted_by_token {
                return denied("this namespace needs a subscription token");
            }
            if credentials.is_anonymous()
                && !options.allow_subscribe_for_anonymous
                && !granted_by_token
            {
                return denied("anonymous clients may not subscribe in this namespace");
            }
            Ok(())
        }
        Action::Publish => {
            if !options.allow_publish_for_client {
                return denied("clients may not publish in this namespace");
            }
            // Publishing never reaches further than subscribing: not into another user's
            // channel, and in a private namespace only where the client holds a
            // subscription (which took a subscription token) or its token lists the channel.
            if !channel.user_allowed(&credentials.user) {
                return denied("the channel is limited to other users");
            }
            let granted_by_token = credentials.channels.iter().any(|c| c == channel.as_str());
            if options.require_subscription_token && !subscribed && !granted_by_token {
                return denied("publishing here needs a subscription to the channel");
            }
            if credentials.is_anonymous() && !options.allow_subscribe_for_anonymous {
                return denied("anonymous clients may not publish in this namespace");
            }
            Ok(())
        }
        Action::History => {
            if !options.allow_history_for_subscriber || !subscribed {
                return denied("history is for subscribers, where the namespace allows it");
            }
            Ok(())
        }
        Action::Presence => {
            if !options.allow_presence_for_subscriber || !subscribed {
                return denied("presence is for subscribers, where the namespace allows it");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelRules;

    fn channel(name: &str) -> ChannelName {
        ChannelName::parse(name, &ChannelRules::default()).expect("valid")
    }

    #[test]
    fn permission_matrix() {
        let alice = Credentials {
            user: "alice".into(),
            ..Credentials::default()
        };
        let anon = Credentials::anonymous();
        let closed = NamespaceOptions::default();
        let open = NamespaceOptions {
            allow_subscribe_for_anonymous: true,
            allow_publish_for_client: true,
            allow_history_for_subscriber: true,
            allow_presence_for_subscriber: true,
            ..NamespaceOptions::default()
        };
        let ok = |r: Result<(), HeraldError>| r.is_ok();
        assert!(ok(check(
            &alice,
            &channel("news"),
            &closed,
            Action::Subscribe,
            false
        )));
        assert!(!ok(check(
            &anon,
            &channel("news"),
            &closed,
            Action::Subscribe,
            false
        )));
        assert!(ok(check(
            &anon,
            &channel("news"),
            &open,
            Action::Subscribe,
            false
        )));
        assert!(ok(check(
            &alice,
            &channel("inbox:#alice"),
            &closed,
            Action::Subscribe,
            false
        )));
        assert!(!ok(check(
            &alice,
            &channel("inbox:#bob"),
            &closed,
            Action::Subscribe,
            false
        )));
        assert!(!ok(check(
            &anon,
            &channel("inbox:#bob"),
            &open,
            Action::Subscribe,
            false
        )));
        assert!(!ok(check(
            &alice,
            &channel("news"),
            &closed,
            Action::Publish,
            true
        )));
        assert!(ok(check(
            &alice,
            &channel("news"),
            &open,
            Action::Publish,
            false
        )));
        assert!(!ok(check(
            &alice,
            &channel("news"),
            &open,
            Action::History,
            false
        )));
        assert!(ok(check(
            &alice,
            &channel("news"),
            &open,
            Action::History,
            true
        )));
        assert!(!ok(check(
            &alice,
            &channel("news"),
            &closed,
            Action::Presence,
            true
        )));
        let granted = Credentials {
            channels: vec!["news".into()],
            ..Credentials::anonymous()
        };
        assert!(ok(check(
            &granted,
            &channel("news"),
            &closed,
            Action::Subscribe,
            false
        )));
        // A namespace that needs subscription tokens: only the connection token's channels
        // pass the check (a subscription token is verified by the transport instead).
        let private = NamespaceOptions {
            require_subscription_token: true,
            ..NamespaceOptions::default()
        };
        assert!(!ok(check(
            &alice,
            &channel("news"),
            &private,
            Action::Subscribe,
            false
        )));
        assert!(ok(check(
            &granted,
            &channel("news"),
            &private,
            Action::Subscribe,
            false
        )));
        // Publishing is never wider than subscribing.
        let publishing = NamespaceOptions {
            allow_publish_for_client: true,
            ..NamespaceOptions::default()
        };
        assert!(!ok(check(
            &alice,
            &channel("inbox:#bob"),
            &publishing,
            Action::Publish,
            false
        )));
        assert!(ok(check(
            &alice,
            &channel("inbox:#alice"),
            &publishing,
            Action::Publish,
            false
        )));
        let private_publishing = NamespaceOptions {
            require_subscription_token: true,
            ..publishing
        };
        for (subscribed, allowed) in [(false, false), (true, true)] {
            assert_eq!(
                ok(check(
                    &alice,
                    &channel("room"),
                    &private_publishing,
                    Action::Publish,
                    subscribed
                )),
                allowed
            );
        }
    }
}
