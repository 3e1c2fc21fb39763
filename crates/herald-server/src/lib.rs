//! The Herald server: configuration, the server HTTP API, metrics and operations endpoints,
//! and the wiring from config to running objects. The `herald` binary (`main.rs`) is the CLI
//! on top of this library. The binary and the tests start servers the same way: [`run`], or
//! [`Server::build`] then [`Server::run`]; [`build`] is the one place that makes objects from
//! config.

pub mod api;
pub mod app;
pub mod auth;
pub mod bridge;
pub mod build;
pub mod cluster;
pub mod config;
pub mod forwarded;
pub mod grpc;
pub mod jwt;
pub mod listener;
pub mod metrics;
pub mod mqtt;
pub mod origin;
pub mod outbound;
pub mod proxy;
pub mod push;
pub mod secrets;
pub mod server;
pub mod sink;
pub mod tls;
pub mod token;
pub mod webhook;

pub use server::{RunError, Server, run};
