//! The bidirectional WebSocket transport at `/connection/websocket`, compatible with the
//! Centrifugo client protocol v2 in JSON and in Protobuf (so its official SDKs connect
//! unchanged).
//!
//! Owns the protocol types and JSON encoding ([`protocol`]), the Protobuf encoding
//! ([`proto`]), the choice between them ([`codec`]) and the per-connection session
//! ([`session`]): the command loop, subscriptions with recovery, pings, and disconnects with
//! protocol codes.

pub mod codec;
pub mod proto;
pub mod protocol;
pub mod session;

pub use session::websocket_handler;
