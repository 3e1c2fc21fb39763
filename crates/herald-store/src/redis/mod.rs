//! The cluster engine: several Herald nodes sharing one order per channel through Redis.
//!
//! Owns: `[redis]` configuration ([`RedisConfig`], always compiled so every build reads the
//! same configuration file) and, with the `redis` feature, the engine itself.
//!
//! May touch: the configured Redis servers.

mod config;

pub use config::{RedisConfig, SentinelConfig};
