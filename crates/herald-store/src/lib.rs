//! Herald's storage backends, each behind a cargo feature.
//!
//! Owns: implementations of the ports in `herald_core` that keep state outside process
//! memory: `sqlite` (embedded, durable, the default; a `HistoryStore` the node wraps in its
//! single-node engine) and `redis` (the cluster engine: history, fan-out between nodes,
//! presence and the node registry, shared by every node).
//!
//! May touch: the filesystem under a configured data directory (`sqlite`) and the configured
//! Redis servers (`redis`). Never the hub or the node: backends store and hand what they
//! deliver to the node's `FanoutFeed`.

pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
