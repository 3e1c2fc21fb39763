//! The one admission path. Every transport — the bidirectional WebSocket, SSE, HTTP streaming,
//! long-poll, the uni-directional WebSocket, and every one added later — decides whether a
//! client may subscribe to a channel, and whether a client publication goes through, by
//! calling [`Admission`]. A transport that decides by itself is a security hole (one was
//! found: the one-way transports never asked the backend of a `proxy_subscribe` namespace).
//!
//! A subscription is decided, in this order:
//! 1. the channel name is validated and its namespace resolved (unknown namespace: `102`);
//! 2. a user-limited channel (`room#alice`) admits only its users, whoever else decides;
//! 3. a subscription token for the connection's user and this channel grants it by itself
//!    (with its `info` as `chan_info` and its expiry);
//! 4. a channel the connection token lists (`channels`, server-side) is granted by that token;
//! 5. in a namespace with `proxy_subscribe`, the application's backend decides (its grant
//!    carries `chan_info`; its refusal keeps its own code; a backend that cannot be asked is a
//!    temporary refusal);
//! 6. otherwise the namespace's permission rules ([`auth::check`]).
//!
//! A *pattern* subscription (an MQTT wildcard filter: every channel of a namespace that the
//! filter matches, now and later) is decided once, for the namespace, by
//! [`Admission::subscribe_pattern`]: only where the rules alone decide (no
//! `require_subscription_token`, no `proxy_subscribe` — those decide one channel at a time,
//! so their channels must be subscribed one by one), and as the rules decide for a channel
//! of the namespace. The caller never delivers user-limited channels (`#` in the name) to a
//! pattern: they admit only their own users, one channel at a time.
//!
//! May touch: the node (name and namespace resolution), the [`Authenticator`] port for
//! subscription tokens and the [`BackendProxy`] port. Nothing else.

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::auth::{self, Action, Authenticator, Credentials, SubscriptionGrant};
use crate::channel::ChannelName;
use crate::error::{ErrorCode, HeraldError};
use crate::namespace::NamespaceOptions;
use crate::node::Node;
use crate::proxy::{BackendProxy, ProxyContext, ProxyReply};
use crate::publication::Payload;

/// What decides admissions: the node's namespaces, the token verifier and, when configured,
/// the application's backend. Cheap to build from borrowed parts.
#[derive(Clone, Copy)]
pub struct Admission<'a> {
    pub node: &'a Node,
    pub authenticator: &'a dyn Authenticator,
    pub proxy: Option<&'a dyn BackendProxy>,
}

/// How a client proves a subscription beyond its connection token.
#[derive(Clone, Debug, Default)]
pub enum SubscriptionProof<'a> {
    /// Nothing: the backend or the permission rules decide.
    #[default]
    None,
    /// A subscription token, to be verified.
    Token(&'a str),
    /// A subscription token already verified with [`auth::subscription_grant`] (the one-way
    /// transports verify their tokens first to learn which channel each is for).
    Verified(SubscriptionGrant),
}

/// One subscription to decide.
#[derive(Clone, Debug)]
pub struct SubscribeAsk<'a> {
    pub credentials: &'a Credentials,
    pub channel: &'a str,
    pub proof: SubscriptionProof<'a>,
    /// Client data sent with the subscribe, passed to the backend.
    pub data: Option<&'a Payload>,
    /// Who is asking, as the backend sees it (transport name included).
    pub context: &'a ProxyContext,
}

/// Who decided an admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    SubscriptionToken,
    ConnectionToken,
    Backend,
    Rules,
}

/// A granted subscription.
#[derive(Clone, Debug)]
pub struct Admitted {
    pub name: ChannelName,
    pub options: Arc<NamespaceOptions>,
    /// Shown as `chan_info` in presence, join/leave and the client's publications.
    pub chan_info: Option<Box<RawValue>>,
    /// When the grant runs out (Unix seconds): a subscription token's `exp`.
    pub expires_at: Option<u64>,
    pub decided_by: DecidedBy,
}

/// Why an admission was refused. Transports turn it into their own answer (an error reply, an
/// HTTP status, a close code) with [`Refusal::code`] and friends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Herald's own decision, with its code.
    Denied(HeraldError),
    /// The backend refused with its own code and message.
    Backend { code: u32, message: String },
    /// The backend asked to disconnect the client with this code.
    Disconnect { code: u16 },
    /// The backend could not be asked (down, timed out, answered garbage): temporary, the
    /// client may retry.
    Unavailable,
}

impl From<HeraldError> for Refusal {
    fn from(error: HeraldError) -> Self {
        Self::Denied(error)
    }
}

impl Refusal {
    /// The numeric code a client sees.
    pub fn code(&self) -> u32 {
        match self {
            Self::Denied(error) => error.code.as_u32(),
            Self::Backend { code, .. } => *code,
            Self::Disconnect { code } => u32::from(*code),
            Self::Unavailable => ErrorCode::Internal.as_u32(),
        }
    }

    /// The message a client sees.
    pub fn message(&self) -> String {
        match self {
            Self::Denied(error) => error.code.message().to_owned(),
            Self::Backend { message, .. } => message.clone(),
            Self::Disconnect { .. } => "backend disconnect".to_owned(),
            Self::Unavailable => "the backend is unavailable".to_owned(),
        }
    }

    /// Whether asking again later may succeed.
    pub fn temporary(&self) -> bool {
        matches!(self, Self::Unavailable)
    }
}

/// The backend's answer turned into a value or a refusal (logging when it could not be asked).
pub fn backend_decision<T>(answer: Result<ProxyReply<T>, HeraldError>) -> Result<T, Refusal> {
    match answer {
        Ok(ProxyReply::Ok(value)) => Ok(value),
        Ok(ProxyReply::Error { code, message }) => Err(Refusal::Backend { code, message }),
        Ok(ProxyReply::Disconnect { code }) => Err(Refusal::Disconnect { code }),
        Err(error) => {
            tracing::warn!(error = %error, "backend proxy unavailable");
            Err(Refusal::Unavailable)
        }
    }
}

/// A publication a client may send, as the backend or the rules decided.
#[derive(Clone, Debug)]
pub struct AdmittedPublication {
    pub name: ChannelName,
    /// The data to publish: the client's, or the backend's rewrite of it.
    pub data: Payload,
    pub skip_history: bool,
}

impl Admission<'_> {
    /// Decides one subscription (the order is in the module header).
    pub async fn subscribe(&self, ask: SubscribeAsk<'_>) -> Result<Admitted, Refusal> {
        if ask.channel.is_empty() {
            return Err(HeraldError::bad_request("channel is required").into());
        }
        let (name, options) = self.node.resolve(ask.channel)?;
        let user = &ask.credentials.user;
        if !name.user_allowed(user) {
            return Err(HeraldError::new(
                ErrorCode::PermissionDenied,
                "the channel is limited to other users",
            )
            .into());
        }
        let granted = |decided_by, chan_info, expires_at| Admitted {
            name: name.clone(),
            options: options.clone(),
            chan_info,
            expires_at,
            decided_by,
        };
        let verified = match ask.proof {
            SubscriptionProof::None => None,
            SubscriptionProof::Token(token) => {
                Some(auth::subscription_grant(self.authenticator, token, user).await?)
            }
            SubscriptionProof::Verified(grant) => Some(grant),
        };
        if let Some(grant) = verified {
            if grant.user != *user {
                return Err(HeraldError::new(
                    ErrorCode::PermissionDenied,
                    "the subscription token is for another user",
                )
                .into());
            }
            if grant.channel != name.as_str() {
                return Err(HeraldError::new(
                    ErrorCode::PermissionDenied,
                    "the subscription token is for another channel",
                )
                .into());
            }
            return Ok(granted(
                DecidedBy::SubscriptionToken,
                grant.info,
                grant.expires_at,
            ));
        }
        if ask.credentials.channels.iter().any(|c| c == name.as_str()) {
            return Ok(granted(DecidedBy::ConnectionToken, None, None));
        }
        if options.proxy_subscribe {
            let proxy = self
                .proxy
                .filter(|p| p.handles_subscribe())
                .ok_or_else(|| {
                    // Configuration says the backend decides, and there is none: refuse rather
                    // than fall back to the rules (which the operator did not choose).
                    tracing::warn!(
                        channel = name.as_str(),
                        "proxy_subscribe is set but no subscribe endpoint is configured"
                    );
                    Refusal::Unavailable
                })?;
            let answer = proxy.subscribe(ask.context, name.as_str(), ask.data).await;
            let grant = backend_decision(answer)?;
            return Ok(granted(DecidedBy::Backend, grant.info, None));
        }
        auth::check(ask.credentials, &name, &options, Action::Subscribe, false)?;
        Ok(granted(DecidedBy::Rules, None, None))
    }

    /// Decides a pattern subscription to the channels of `namespace` (see the module
    /// header); the namespace's options when granted.
    pub fn subscribe_pattern(
        &self,
        credentials: &Credentials,
        namespace: &str,
    ) -> Result<Arc<NamespaceOptions>, Refusal> {
        // Any plain channel of the namespace stands for all of them: the rules that apply
        // to a pattern do not depend on the rest of the name.
        let (sample, options) = self.node.resolve(&format!("{namespace}:_"))?;
        if options.proxy_subscribe || options.require_subscription_token {
            return Err(HeraldError::new(
                ErrorCode::PermissionDenied,
                "channels of this namespace are granted one at a time (subscription tokens or \
                 the backend): subscribe to each one, without wildcards",
            )
            .into());
        }
        auth::check(credentials, &sample, &options, Action::Subscribe, false)?;
        Ok(options)
    }

    /// Decides a client publication on `channel`: the backend where the namespace has
    /// `proxy_publish` (it may rewrite the data or skip history), the permission rules
    /// otherwise. `subscribed`: the client holds a subscription to the channel.
    pub async fn publish(
        &self,
        credentials: &Credentials,
        channel: &str,
        data: Payload,
        subscribed: bool,
        context: &ProxyContext,
    ) -> Result<AdmittedPublication, Refusal> {
        let (name, options) = self.node.resolve(channel)?;
        if options.proxy_publish {
            let proxy = self.proxy.filter(|p| p.handles_publish()).ok_or_else(|| {
                tracing::warn!(
                    channel = name.as_str(),
                    "proxy_publish is set but no publish endpoint is configured"
                );
                Refusal::Unavailable
            })?;
            if !name.user_allowed(&credentials.user) {
                return Err(HeraldError::new(
                    ErrorCode::PermissionDenied,
                    "the channel is limited to other users",
                )
                .into());
            }
            let answer = proxy.publish(context, name.as_str(), &data).await;
            let grant = backend_decision(answer)?;
            return Ok(AdmittedPublication {
                name,
                data: grant.data.unwrap_or(data),
                skip_history: grant.skip_history,
            });
        }
        auth::check(credentials, &name, &options, Action::Publish, subscribed)?;
        Ok(AdmittedPublication {
            name,
            data,
            skip_history: false,
        })
    }
}
