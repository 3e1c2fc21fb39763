//! Client lifecycle events — connected, disconnected, subscribed, unsubscribed, presence
//! join and leave — for whoever outside the real-time path wants to hear of them (webhooks).
//!
//! Owns: [`ClientEvent`] and the [`ClientEventObserver`] port. The node holds the observers
//! ([`crate::Node::observe_client_events`]) and tells them of presence itself
//! ([`crate::Node::join`] / [`crate::Node::leave`]); the transports report the rest, each at
//! one place shared by every transport (`herald_transport::realtime` for connections,
//! `herald_transport::subscription` for subscriptions).
//!
//! Observers must not block: they are called on the connection's own task. They hear events
//! on a best-effort basis (what a crash loses before the observer stored it is lost).
//!
//! May touch: nothing outside the process.

use std::sync::Arc;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientEventKind {
    Connected,
    Disconnected,
    Subscribed,
    Unsubscribed,
    /// A client entered a channel's presence (namespaces that track presence).
    PresenceJoin,
    PresenceLeave,
}

impl ClientEventKind {
    pub const ALL: [ClientEventKind; 6] = [
        ClientEventKind::Connected,
        ClientEventKind::Disconnected,
        ClientEventKind::Subscribed,
        ClientEventKind::Unsubscribed,
        ClientEventKind::PresenceJoin,
        ClientEventKind::PresenceLeave,
    ];

    /// The event type's name on the wire (webhook `type`).
    pub fn as_str(self) -> &'static str {
        match self {
            ClientEventKind::Connected => "client.connected",
            ClientEventKind::Disconnected => "client.disconnected",
            ClientEventKind::Subscribed => "client.subscribed",
            ClientEventKind::Unsubscribed => "client.unsubscribed",
            ClientEventKind::PresenceJoin => "presence.join",
            ClientEventKind::PresenceLeave => "presence.leave",
        }
    }

    /// Whether events of this kind name a channel.
    pub fn has_channel(self) -> bool {
        !matches!(
            self,
            ClientEventKind::Connected | ClientEventKind::Disconnected
        )
    }
}

/// One lifecycle event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientEvent {
    pub kind: ClientEventKind,
    pub client: String,
    /// Empty for anonymous clients.
    pub user: String,
    /// The channel, for subscription and presence events.
    pub channel: Option<Arc<str>>,
    /// The transport, for connection events (`websocket`, `sse`, …); empty otherwise.
    pub transport: &'static str,
    /// When it happened, ms since the Unix epoch.
    pub time_ms: u64,
}

/// Hears lifecycle events.
pub trait ClientEventObserver: Send + Sync + 'static {
    /// Whether it wants events of `kind` on `channel` (`None` for connection events), asked
    /// before an event is built, so events nobody wants cost nothing.
    fn wants(&self, kind: ClientEventKind, channel: Option<&str>) -> bool;

    /// Told of an event it wanted; must not block.
    fn observe(&self, event: ClientEvent);
}
