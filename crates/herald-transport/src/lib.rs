//! Herald's real-time transports: wire formats and connection loops around the core.
//!
//! Owns: per-connection outbound queues ([`outbound`]), the index of connections by user
//! ([`registry`]), and one module per transport (MQTT in [`mqtt`]). A
//! transport talks to [`herald_core::Node`] (subscribe, recover, publish, history, presence)
//! and to the core's permission check; it never touches a store.

pub mod budget;
pub mod chanmap;
pub mod mqtt;
pub mod oneway;
pub mod outbound;
pub mod poll;
pub mod realtime;
pub mod registry;
pub mod sse;
pub mod stream;
pub mod subscription;
pub mod uniws;
pub mod ws;
