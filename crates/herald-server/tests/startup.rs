//! Start-up and shutdown through the one entry the binary uses ([`herald_server::run`] /
//! [`herald_server::Server`]): what does not build stops start-up with an error naming it
//! (instead of a server that degrades), and `/ready` answers 503 from the moment shutdown
//! begins while in-flight work still finishes.

mod common;

use std::time::Duration;

use common::TestServer;
use herald_core::duration::HumanDuration;
use herald_server::build::BuildError;
use herald_server::config::{Config, Engine, TokenKey};
use herald_server::{RunError, run};
use serde_json::{Value, json};

const SECRET: &str = "startup-test-secret-0123456789abcdef";

fn config() -> Config {
    let mut config = common::test_config(Engine::Memory);
    config.token.hmac_secret = SECRET.into();
    config
}

/// Runs `config` through [`run`]: it must fail before serving; returns the error's text.
async fn start_up_error(config: Config) -> (RunError, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        run(listener, config, std::future::pending()),
    )
    .await
    .expect("start-up fails at once instead of serving");
    let error = result.expect_err("start-up must fail");
    let text = error.to_string();
    (error, text)
}

#[tokio::test]
async fn a_bad_tls_file_stops_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").expect("write");
    std::fs::write(dir.path().join("key.pem"), "not a key").expect("write");
    let mut config = config();
    config.server.tls_cert_file = dir.path().join("cert.pem");
    config.server.tls_key_file = dir.path().join("key.pem");
    let (error, text) = start_up_error(config.clone()).await;
    assert!(
        matches!(error, RunError::Build(BuildError::Tls(_))),
        "{error:?}"
    );
    assert!(text.contains("cert.pem"), "names the file: {text}");
    // A file that is missing altogether is the same error.
    config.server.tls_cert_file = dir.path().join("missing.pem");
    let (_, text) = start_up_error(config).await;
    assert!(text.contains("missing.pem"), "{text}");
}

#[tokio::test]
async fn a_bad_proxy_url_stops_start_up() {
    for (url, key) in [
        ("http://", "proxy.connect_endpoint"),
        ("http://exa mple.com/connect", "proxy.connect_endpoint"),
    ] {
        let mut config = config();
        config.proxy.connect_endpoint = url.into();
        let (error, text) = start_up_error(config).await;
        assert!(
            matches!(error, RunError::Build(BuildError::Proxy { .. })),
            "{url}: {error:?}"
        );
        assert!(text.contains(key) && text.contains(url), "{url}: {text}");
    }
}

#[tokio::test]
async fn a_bad_token_key_stops_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A key file that does not exist (deleted after `check-config`, say): before, the server
    // started with a verifier that refused every token.
    let mut config = config();
    config.token.keys.push(TokenKey {
        kid: "gone".into(),
        algorithm: "RS256".into(),
        public_key_file: dir.path().join("gone.pem"),
        ..TokenKey::default()
    });
    let (error, text) = start_up_error(config).await;
    assert!(
        matches!(error, RunError::Build(BuildError::TokenKeys(_))),
        "{error:?}"
    );
    assert!(text.contains("gone"), "names the key: {text}");
    // Garbage PEM and an unknown algorithm, too.
    let mut config = self::config();
    config.token.keys.push(TokenKey {
        kid: "garbage".into(),
        algorithm: "ES256".into(),
        public_key: "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n".into(),
        ..TokenKey::default()
    });
    let (_, text) = start_up_error(config).await;
    assert!(text.contains("garbage"), "{text}");
    let mut config = self::config();
    config.token.hmac_algorithm = "HS999".into();
    let (_, text) = start_up_error(config).await;
    assert!(text.contains("HS999"), "{text}");
}

/// The binary reports the same errors and exits non-zero, before printing its banner.
#[test]
fn the_binary_stops_on_what_does_not_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("herald.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nengine = \"memory\"\n[proxy]\nrpc_endpoint = \"http://\"\n",
    )
    .expect("write");
    let (code, stdout, stderr) = common::process::run(&["serve"], dir.path());
    assert_ne!(code, 0);
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(stderr.contains("proxy.rpc_endpoint"), "{stderr}");
    let (code, _, stderr) = common::process::run(&["check-config"], dir.path());
    assert_ne!(code, 0, "check-config builds the same parts");
    assert!(stderr.contains("proxy.rpc_endpoint"), "{stderr}");
}

fn token() -> String {
    let now = herald_core::time::now_ms() / 1000;
    common::hs256(SECRET, &json!({"sub": "alice", "exp": now + 3600}))
}

async fn get(url: &str) -> Result<(u16, Value), reqwest::Error> {
    // A fresh connection each time, as a load balancer's probe makes.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let response = client.get(url).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

#[tokio::test]
async fn ready_answers_503_once_shutdown_begins_while_work_drains() {
    let mut config = config();
    config.server.shutdown_delay = HumanDuration::from_secs(2);
    let mut server = TestServer::start_with(config, None).await;
    let ready_url = format!("{}/ready", server.url);
    let (status, body) = get(&ready_url).await.expect("ready");
    assert_eq!((status, body), (200, json!({"status": "ready"})));

    // In-flight work: a long-poll waiting for the next publication on `a`.
    let poll = {
        let url = format!("{}/connection/poll?channel=a&timeout=30", server.url);
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .get(url)
                .bearer_auth(token())
                .send()
                .await
                .expect("poll");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("JSON"))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let running = server.begin_shutdown();

    // From now on probes see 503, while the process is healthy and still serving.
    let (status, body) = get(&ready_url).await.expect("ready while shutting down");
    assert_eq!(
        (status, body),
        (503, json!({"status": "shutting down"})),
        "the ready flag must be cleared as soon as shutdown begins"
    );
    let (status, _) = get(&format!("{}/health", server.url))
        .await
        .expect("health");
    assert_eq!(status, 200);
    // The in-flight poll still completes with what is published now.
    server
        .ok("publish", json!({"channel": "a", "data": "late"}))
        .await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the poll answers")
        .expect("poll task");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["publications"][0]["data"], "late", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "within the delay"
    );

    // After the delay the listener closes and the run ends cleanly (history flushed).
    let result = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("run ends after the delay")
        .expect("run task");
    result.expect("clean shutdown");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the delay is kept"
    );
    assert!(get(&ready_url).await.is_err(), "no longer listening");
}

/// A Redis engine that cannot be reached stops start-up with an error naming it; nothing
/// falls back to another engine.
#[tokio::test]
async fn an_unreachable_redis_stops_start_up() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut config = config();
    config.storage.engine = Engine::Redis;
    config.api.keys = vec!["startup-test-api-key".into()];
    config.redis.addresses = vec![format!("redis://127.0.0.1:{port}")];
    config.redis.connect_timeout = HumanDuration::from_secs(1);
    let (error, text) = start_up_error(config).await;
    assert!(
        matches!(error, RunError::Build(BuildError::Store(_))),
        "{error:?}"
    );
    assert!(
        text.contains(&port.to_string()),
        "names the address: {text}"
    );
}
