//! Herald's domain, with no network I/O.
//!
//! Owns: channel names and namespace rules, publications and stream positions, the error
//! codes every API shares, the in-process hub that fans publications out to local
//! subscribers, the [`Node`] facade (publish, history, presence, channels) and the small
//! port traits backends implement ([`Engine`], [`HistoryStore`], [`PresenceStore`], the
//! device registry and the outbound queue) with in-memory implementations and the
//! conformance suites every backend must pass.
//!
//! May touch: nothing outside the process. Backends and transports live in other crates and
//! depend on this one, never the other way round.

pub mod admission;
pub mod auth;
pub mod channel;
pub mod client_methods;
pub mod conformance;
pub mod device;
pub mod duration;
pub mod engine;
pub mod error;
pub mod events;
pub mod fanout;
pub mod hub;
pub mod idempotency;
pub mod integer;
pub mod memory;
pub mod memory_devices;
pub mod memory_outbound;
pub mod namespace;
pub mod node;
pub mod outbound;
pub mod presence;
pub mod proxy;
pub mod publication;
pub mod rate;
pub mod sequence;
pub mod store;
pub mod time;
pub mod webhook_store;

pub use channel::{ChannelName, ChannelRules};
pub use engine::{Engine, LocalEngine, Publish, Published};
pub use error::{ErrorCode, HeraldError};
pub use hub::{ChannelInterest, Delivery, Hub, Subscriber, SubscriberId};
pub use namespace::{NamespaceOptions, Namespaces};
pub use node::{Node, NodeConfig, PublishRequest, PublishResult};
pub use presence::{PresenceStats, PresenceStore};
pub use publication::{
    ChannelEvent, ClientInfo, Payload, Publication, PublicationEvent, StreamPosition,
};
pub use store::{
    AppendRequest, Appended, CommitListener, HistoryPage, HistoryQuery, HistoryStore, Retention,
    StoreError,
};
