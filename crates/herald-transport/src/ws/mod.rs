//! The bidirectional WebSocket transport at `/connection/websocket`, compatible with the
//! Centrifugo client protocol v2 in JSON (so its official SDKs connect unchanged).
//!
//! Owns the protocol codec ([`protocol`]) and the per-connection session ([`session`]): the
//! command loop, subscriptions with recovery, pings, and disconnects with protocol codes.

pub mod protocol;
pub mod session;

pub use session::{RealtimeConfig, RealtimeState, websocket_handler};
