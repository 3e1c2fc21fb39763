//! Herald's storage backends, each behind a cargo feature.
//!
//! Owns: implementations of the port traits in `herald_core::store` that keep state outside
//! process memory. Today that is `sqlite` (embedded, durable, the default).
//!
//! May touch: the filesystem under a configured data directory. Never the network, the hub or
//! the node: backends only store and hand committed publications to their `CommitListener`.

#[cfg(feature = "sqlite")]
pub mod sqlite;
