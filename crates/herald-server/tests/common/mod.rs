//! Shared test helpers: in-process servers on 127.0.0.1:0 started through the same entry as
//! `herald serve` ([`herald_server::Server`], this file) and the real binary ([`process`]);
//! redis-server processes owned by a test ([`redis`]) and clusters of real nodes on them
//! ([`cluster`]), some in network namespaces of their own ([`netns`]). Each test binary uses a different subset, hence the dead-code allowance.
#![allow(dead_code)]

pub mod cluster;
pub mod netns;
pub mod process;
pub mod redis;
pub mod subscribe;
pub mod webhooks;
pub mod ws;

use std::sync::Arc;

use herald_server::app::AppState;
use herald_server::config::{Config, Engine};
use herald_server::{RunError, Server};
use serde_json::Value;

pub const API_KEY: &str = "test-api-key-0123456789";

/// `claims` signed with `secret` (HS256), as a connection or subscription token.
pub fn hs256(secret: &str, claims: &impl serde::Serialize) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

pub struct TestServer {
    pub url: String,
    pub http: reqwest::Client,
    pub state: Arc<AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// The server's `run`, finished once it has shut down and flushed.
    running: Option<tokio::task::JoinHandle<Result<(), RunError>>>,
    pub data_dir: Option<tempfile::TempDir>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A config with a small publication limit and a few namespaces.
pub fn test_config(engine: Engine) -> Config {
    let text = r#"
        [server]
        max_publication_size = 1024
        max_body_size = 4096
        [api]
        keys = ["test-api-key-0123456789"]
        [namespace]
        history_size = 100
        history_ttl = "1h"
        [[namespaces]]
        name = "room"
        presence = true
        [[namespaces]]
        name = "live"
        history_size = 0
    "#;
    let mut config: Config = toml::from_str(text).expect("test config");
    config.storage.engine = engine;
    config
}

impl TestServer {
    pub async fn start(engine: Engine) -> Self {
        let mut config = test_config(engine);
        let data_dir = tempfile::tempdir().expect("tempdir");
        config.storage.data_dir = data_dir.path().to_owned();
        Self::start_with(config, Some(data_dir)).await
    }

    pub async fn start_with(config: Config, data_dir: Option<tempfile::TempDir>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = Server::build(config).await.expect("the server builds");
        let state = server.state().clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(listener, async move {
            let _ = rx.await;
        }));
        Self {
            url,
            http: reqwest::Client::new(),
            state,
            shutdown: Some(tx),
            running: Some(running),
            data_dir,
        }
    }

    /// Begins the shutdown (as SIGTERM does) and returns the server's run, which finishes once
    /// it has drained and flushed.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<Result<(), RunError>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.running.take().expect("the server is running")
    }

    /// POSTs raw `body` to `/api/{method}` with the test key; returns status and JSON body.
    pub async fn raw(&self, method: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/api/{method}", self.url))
            .header("X-API-Key", API_KEY)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("non-JSON body {text:?} (HTTP {status})"));
        (status, json)
    }

    pub async fn call(&self, method: &str, params: Value) -> (u16, Value) {
        self.raw(method, params.to_string()).await
    }

    /// Calls a method that must succeed and returns its `result`.
    pub async fn ok(&self, method: &str, params: Value) -> Value {
        let (status, body) = self.call(method, params).await;
        assert_eq!(status, 200, "{method}: {body}");
        assert!(body.get("error").is_none(), "{method}: {body}");
        body["result"].clone()
    }

    /// Calls a method that must fail with `code` and returns the error object.
    pub async fn err(&self, method: &str, params: Value, status: u16, code: u64) -> Value {
        let (got_status, body) = self.call(method, params).await;
        assert_eq!(got_status, status, "{method}: {body}");
        assert_eq!(body["error"]["code"], code, "{method}: {body}");
        assert!(body["error"]["message"].is_string(), "{method}: {body}");
        body["error"].clone()
    }
}
