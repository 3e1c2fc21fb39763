//! The Herald server: configuration, the server HTTP API, metrics and operations endpoints,
//! and the wiring from config to running objects. The `herald` binary (`main.rs`) is the CLI
//! on top of this library; tests start servers in-process through [`app::serve`].

pub mod api;
pub mod app;
pub mod auth;
pub mod build;
pub mod config;
pub mod jwt;
pub mod listener;
pub mod metrics;
pub mod origin;
pub mod proxy;
pub mod secrets;
pub mod tls;
pub mod token;
