//! The `herald` binary end to end: the no-config quick start, the CLI commands, restart
//! persistence, graceful shutdown and start-up errors.

mod common;

use std::time::Duration;

use common::process::{ServerProcess, run};
use serde_json::{Value, json};

const SIGTERM: i32 = 15;
const SIGINT: i32 = 2;

fn api_key_from_banner(banner: &[String]) -> String {
    banner
        .iter()
        .find_map(|line| line.trim().strip_prefix("API key: "))
        .expect("banner shows the API key")
        .trim()
        .to_owned()
}

async fn post(url: &str, key: &str, method: &str, body: Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{url}/api/{method}"))
        .header("X-API-Key", key)
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.expect("json")
}

/// Opens a WebSocket to `url`'s server and sends `connect` with `token`: true when it is
/// accepted, false when the server closes with 3500 (unauthorized).
async fn ws_connects(url: &str, token: &str) -> bool {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws_url = format!("{}/connection/websocket", url.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url).await.expect("ws");
    socket
        .send(Message::text(
            json!({"id": 1, "connect": {"token": token}}).to_string(),
        ))
        .await
        .expect("send");
    match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => text.as_str().contains("\"connect\""),
        Ok(Some(Ok(Message::Close(Some(frame))))) => {
            assert_eq!(u16::from(frame.code), 3500, "refused as unauthorized");
            false
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// An HS256 token with `claims`, signed with `secret`, its header naming `kid` if given.
fn sign_hs256(secret: &str, kid: Option<&str>, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test]
async fn quick_start_without_config_persists_across_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(&["--listen", "127.0.0.1:0"], dir.path());
    let key = api_key_from_banner(&server.banner);
    assert!(
        server
            .banner
            .iter()
            .any(|l| l.contains("curl -X POST") && l.contains(&key)),
        "{:?}",
        server.banner
    );
    assert!(
        dir.path().join("herald-data/secrets.toml").exists(),
        "secrets kept in ./herald-data"
    );

    // Anonymous publishing is refused.
    let anonymous = reqwest::Client::new()
        .post(format!("{}/api/publish", server.url))
        .json(&json!({"channel": "news", "data": 1}))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status().as_u16(), 401);

    // The CLI finds the server and key from the same folder.
    let url = server.url.clone();
    for n in 1..=3 {
        let (code, stdout, stderr) = run(
            &["publish", "news", &format!("{{\"n\":{n}}}"), "--url", &url],
            dir.path(),
        );
        assert_eq!(code, 0, "publish failed: {stderr}");
        let result: Value = serde_json::from_str(stdout.trim()).expect("publish prints JSON");
        assert_eq!(result["offset"], n);
    }
    let (code, stdout, _) = run(&["publish", "news", "hello", "--url", &url], dir.path());
    assert_eq!(code, 0);
    assert!(stdout.contains("\"offset\":4"));

    server.signal(SIGTERM);
    assert_eq!(
        server.wait(Duration::from_secs(10)),
        Some(0),
        "graceful shutdown exits 0"
    );

    let server = ServerProcess::start(&["--listen", "127.0.0.1:0"], dir.path());
    assert_eq!(
        api_key_from_banner(&server.banner),
        key,
        "the generated key is reused"
    );
    let (code, stdout, stderr) = run(&["history", "news", "--url", &server.url], dir.path());
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["data"], json!({"n": 1}));
    assert_eq!(lines[3]["data"], json!("hello"));
    let next = post(
        &server.url,
        &key,
        "publish",
        json!({"channel": "news", "data": 5}),
    )
    .await;
    assert_eq!(
        next["result"]["offset"], 5,
        "offsets continue after restart"
    );
}

#[tokio::test]
async fn memory_mode_and_sigint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(&["--memory", "--listen", "127.0.0.1:0"], dir.path());
    let key = api_key_from_banner(&server.banner);
    assert!(server.banner.iter().any(|l| l.contains("memory")));
    assert!(
        !dir.path().join("herald-data").exists(),
        "--memory writes nothing"
    );
    let result = post(
        &server.url,
        &key,
        "publish",
        json!({"channel": "a", "data": 1}),
    )
    .await;
    assert_eq!(result["result"]["offset"], 1);
    server.signal(SIGINT);
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
}

#[test]
fn unwritable_data_dir_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"not a folder").expect("write");
    let data_dir = blocker.join("data");
    let data_dir = data_dir.to_str().expect("utf-8 path");
    let (code, stdout, stderr) = run(
        &["serve", "--data-dir", data_dir, "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    assert_ne!(code, 0, "must not start: {stdout}");
    assert!(
        stderr.contains(data_dir),
        "error names the folder: {stderr}"
    );
    assert!(!stdout.contains("listening"), "{stdout}");
}

#[test]
fn genconfig_check_config_and_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, _, stderr) = run(&["genconfig", "-o", "herald.toml"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    let text = std::fs::read_to_string(dir.path().join("herald.toml")).expect("config written");
    let (code, _, _) = run(&["genconfig", "-o", "herald.toml"], dir.path());
    assert_ne!(code, 0, "refuses to overwrite");
    let (_, _, _) = run(&["genconfig", "-o", "other.toml"], dir.path());
    let other = std::fs::read_to_string(dir.path().join("other.toml")).expect("second config");
    assert_ne!(text, other, "secrets are fresh each time");

    let (code, stdout, stderr) = run(&["check-config", "--config", "herald.toml"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok"));

    std::fs::write(dir.path().join("bad.toml"), "[server]\nlisen = \"x\"\n").expect("write");
    let (code, _, stderr) = run(&["check-config", "--config", "bad.toml"], dir.path());
    assert_ne!(code, 0);
    assert!(
        stderr.contains("lisen") && stderr.contains("bad.toml"),
        "{stderr}"
    );

    let (code, stdout, stderr) = run(
        &[
            "token",
            "--config",
            "herald.toml",
            "--user",
            "alice",
            "--channels",
            "a,b",
            "--ttl",
            "1h",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let token = stdout.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("hmac_secret = "))
        .expect("secret in config")
        .trim_matches('"');
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let claims = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .expect("token verifies with the configured secret")
    .claims;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["channels"], json!(["a", "b"]));

    let (code, stdout, _) = run(&["version"], dir.path());
    assert_eq!(code, 0);
    assert!(stdout.starts_with("herald "));
}

#[test]
fn environment_overrides_and_unknown_env_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(common::process::herald_bin())
        .args(["check-config"])
        .env("HERALD_SERVER__LISEN", "x")
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("lisen") && stderr.contains("HERALD_"),
        "names key and source: {stderr}"
    );
}

#[test]
fn config_path_and_test_variables_are_not_config_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("custom.toml"),
        "[server]\nname = \"from-file\"\n",
    )
    .expect("write");
    let output = std::process::Command::new(common::process::herald_bin())
        .args(["check-config"])
        .env("HERALD_CONFIG", "custom.toml")
        .env("HERALD_TEST_REDIS_URL", "redis://127.0.0.1:6379")
        .current_dir(dir.path())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("custom.toml: ok"));
}

#[test]
fn herald_toml_in_the_working_folder_is_picked_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("herald.toml"), "[server]\nlisen = 1\n").expect("write");
    let (code, _, stderr) = run(&["check-config"], dir.path());
    assert_ne!(code, 0, "the broken ./herald.toml must be read");
    assert!(stderr.contains("lisen"), "{stderr}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(common::process::herald_bin())
        .args(["serve", "--memory", "--listen", "127.0.0.1:0"])
        .env("HERALD_LOG__FORMAT", "json")
        .env("HERALD_LOG__LEVEL", "info")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    // A warning about foreign HERALD_* variables (the test suite sets HERALD_BIN) may come
    // first: every line must be JSON, up to the start-up line.
    let mut started = None;
    for text in BufReader::new(stderr).lines().take(5) {
        let text = text.expect("utf-8");
        let line: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        if line["fields"]["message"] == "herald started" {
            started = Some(line);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = started.expect("a `herald started` line");
    assert_eq!(line["level"], "INFO", "{line}");
}

/// Deployment tooling sets variables such as `HERALD_BIN`: `serve` names them in one warning
/// line and starts; keys inside a section (`HERALD_SERVER__LISEN`) stay errors.
#[test]
fn foreign_herald_variables_are_named_in_one_warning() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(common::process::herald_bin())
        .args(["serve", "--memory", "--listen", "127.0.0.1:0"])
        .env("HERALD_BIN", "/usr/bin/herald")
        .env("HERALD_DEPLOY_ID", "42")
        .env("HERALD_LOG__LEVEL", "info")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let listening = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|line| line.contains("listening on"));
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(listening.is_some(), "serve did not start: {stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("HERALD_BIN"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("HERALD_DEPLOY_ID"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("HERALD_LOG__LEVEL"),
        "config keys are not named: {stderr}"
    );

    // The other commands warn too, and a key inside a section is still checked.
    let output = std::process::Command::new(common::process::herald_bin())
        .args(["check-config"])
        .env("HERALD_BIN", "/usr/bin/herald")
        .current_dir(dir.path())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: ") && stderr.contains("HERALD_BIN"),
        "{stderr}"
    );
    let output = std::process::Command::new(common::process::herald_bin())
        .args(["check-config"])
        .env("HERALD_BIN", "/usr/bin/herald")
        .env("HERALD_SERVER__LISEN", "x")
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("lisen"));
}

#[tokio::test]
async fn scoped_api_keys_and_rotation_on_sighup() {
    const SIGHUP: i32 = 1;
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = "admin-key-0123456789abcdef";
    let publisher = "publisher-key-0123456789abcdef";
    let reader = "reader-key-0123456789abcdef";
    let reader_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(reader.as_bytes()))
    };
    let config = |admin_key: &str| {
        format!(
            r#"
[api]
keys = ["{admin_key}"]

[[api.named_keys]]
name = "ci-publisher"
key = "{publisher}"
scope = "publish"

[[api.named_keys]]
name = "dashboard"
sha256 = "{reader_sha}"
scope = "read"

[token]
hmac_secret = "0123456789abcdef0123456789abcdef0123"

[storage]
engine = "memory"
"#
        )
    };
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, config(admin)).expect("write config");
    let path_s = path.to_str().expect("utf-8").to_owned();
    let mut server = ServerProcess::start(
        &["--config", &path_s, "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    let call = |key: &'static str, method: &'static str, body: Value| {
        let url = format!("{}/api/{method}", server.url);
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("X-API-Key", key)
                .json(&body)
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };
    let publish = json!({"channel": "news", "data": 1});
    let history = json!({"channel": "news", "limit": 10});
    // The publisher key publishes but cannot read; the reader (given by its digest) reads
    // but cannot publish; refusals are 403 with error 103 naming the key.
    assert_eq!(call(publisher, "publish", publish.clone()).await.0, 200);
    let (status, body) = call(publisher, "history", history.clone()).await;
    assert_eq!(
        (status, body["error"]["code"].as_u64()),
        (403, Some(103)),
        "{body}"
    );
    assert!(
        body["error"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("ci-publisher"))
    );
    let (status, body) = call(reader, "history", history.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"]["publications"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(call(reader, "publish", publish.clone()).await.0, 403);
    assert_eq!(
        call(reader, "disconnect", json!({"user": "x"})).await.0,
        403
    );
    // In a batch, each command is checked on its own.
    let (status, body) = call(
        publisher,
        "batch",
        json!({"commands": [{"publish": {"channel": "news", "data": 2}}, {"history": {"channel": "news"}}]}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body["replies"][0]["publish"].is_object(), "{body}");
    assert_eq!(body["replies"][1]["error"]["code"], 103, "{body}");

    // Rotate the admin key: edit the file, SIGHUP, and the old key stops working at once.
    let rotated = "rotated-admin-key-0123456789";
    std::fs::write(&path, config(rotated)).expect("rewrite config");
    server.signal(SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call(admin, "info", json!({})).await.0 != 401 {
        assert!(
            std::time::Instant::now() < deadline,
            "the old key still works after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call(rotated, "info", json!({})).await.0, 200);
    assert_eq!(call(publisher, "publish", publish.clone()).await.0, 200);
    // A broken config on SIGHUP keeps the keys in use (and the server up).
    std::fs::write(&path, "[api]\nkeys = [\"short\"]\n").expect("break config");
    server.signal(SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(call(rotated, "info", json!({})).await.0, 200);

    server.signal(SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
}

/// With only `[[token.keys]]` configured, the HMAC secret that `serve` generates into the data
/// folder must not verify tokens: whoever can read the folder could mint any user's token.
#[tokio::test]
async fn a_generated_hmac_secret_is_not_a_key_when_keys_are_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let configured = "configured-hs256-secret-0123456789abcdef";
    let config = format!(
        r#"
[api]
keys = ["admin-key-0123456789abcdef"]

[[token.keys]]
kid = "main"
algorithm = "HS256"
secret = "{configured}"
"#
    );
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, config).expect("write config");
    let path_s = path.to_str().expect("utf-8").to_owned();
    let mut server = ServerProcess::start(
        &["--config", &path_s, "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    let secrets = std::fs::read_to_string(dir.path().join("herald-data/secrets.toml"))
        .expect("serve writes generated secrets");
    let generated: toml::Value = toml::from_str(&secrets).expect("toml");
    let generated = generated["hmac_secret"]
        .as_str()
        .expect("hmac_secret")
        .to_owned();
    let mallory = json!({"sub": "mallory"});
    for kid in [None, Some("main")] {
        assert!(
            !ws_connects(&server.url, &sign_hs256(&generated, kid, &mallory)).await,
            "the generated secret was accepted"
        );
    }
    assert!(
        ws_connects(&server.url, &sign_hs256(configured, Some("main"), &mallory)).await,
        "the configured key was refused"
    );
    // The data folder is private to its owner.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("herald-data"))
            .expect("data dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
    }
    server.signal(SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
}

/// A revoked token stays revoked across a restart (SQLite engine: the revocations are kept
/// in the data folder), and a damaged revocations file stops the start instead of being
/// forgotten.
#[tokio::test]
async fn revocations_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = "revocation-admin-key-0123456789";
    // Generated per run: no secret in the repository.
    let secret = format!("{:032x}", rand_u128());
    std::fs::write(
        dir.path().join("herald.toml"),
        format!("[api]\nkeys = [\"{key}\"]\n[token]\nhmac_secret = \"{secret}\"\n"),
    )
    .expect("write config");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let sign = |claims: Value| sign_hs256(&secret, None, &claims);
    let connects = |url: String, token: String| async move { ws_connects(&url, &token).await };
    let revoked = sign(json!({"sub": "alice", "exp": now + 600, "jti": "t-1", "iat": now}));
    let bobs_old = sign(json!({"sub": "bob", "exp": now + 600, "iat": now - 10}));

    let mut server = ServerProcess::start(&["--listen", "127.0.0.1:0"], dir.path());
    assert!(connects(server.url.clone(), revoked.clone()).await);
    post(
        &server.url,
        key,
        "revoke_token",
        json!({"uid": "t-1", "expire_at": now + 600}),
    )
    .await;
    post(
        &server.url,
        key,
        "invalidate_user_tokens",
        json!({"user": "bob", "issued_before": now, "expire_at": now + 600}),
    )
    .await;
    assert!(!connects(server.url.clone(), revoked.clone()).await);
    server.signal(SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));

    let mut server = ServerProcess::start(&["--listen", "127.0.0.1:0"], dir.path());
    assert!(
        !connects(server.url.clone(), revoked.clone()).await,
        "still revoked after the restart"
    );
    assert!(
        !connects(server.url.clone(), bobs_old).await,
        "bob's older tokens still invalidated"
    );
    let fresh = sign(json!({"sub": "alice", "exp": now + 600, "jti": "t-2", "iat": now}));
    assert!(
        connects(server.url.clone(), fresh).await,
        "other tokens work"
    );
    server.signal(SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));

    let file = dir.path().join("herald-data/revocations.jsonl");
    let kept = std::fs::read_to_string(&file).expect("revocations file");
    assert_eq!(kept.lines().count(), 2, "{kept}");
    std::fs::write(&file, format!("garbage\n{kept}")).expect("damage it");
    let (code, stdout, stderr) = run(&["serve", "--listen", "127.0.0.1:0"], dir.path());
    assert_ne!(code, 0, "must not start without its revocations: {stdout}");
    assert!(
        stderr.contains("revocations.jsonl") && stderr.contains("line 1"),
        "{stderr}"
    );
}

/// A random number from the OS (tests generate their secrets at run time).
fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    let mut file = std::fs::File::open("/dev/urandom").expect("urandom");
    std::io::Read::read_exact(&mut file, &mut bytes).expect("read");
    u128::from_le_bytes(bytes)
}

/// SIGHUP swaps in the config's token keys: tokens signed with the old secret are refused
/// from then on, the new one's accepted; a token config that does not build keeps the keys
/// in use.
#[tokio::test]
async fn token_keys_rotate_on_sighup() {
    const SIGHUP: i32 = 1;
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (
        format!("{:032x}", rand_u128()),
        format!("{:032x}", rand_u128()),
    );
    let config = |token: &str| {
        format!(
            "[api]\nkeys = [\"admin-key-0123456789abcdef\"]\n[storage]\nengine = \"memory\"\n[token]\n{token}\n"
        )
    };
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, config(&format!("hmac_secret = \"{old}\""))).expect("write config");
    let path_s = path.to_str().expect("utf-8").to_owned();
    let mut server = ServerProcess::start(
        &["--config", &path_s, "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    let alice = json!({"sub": "alice"});
    let (with_old, with_new) = (
        sign_hs256(&old, None, &alice),
        sign_hs256(&new, None, &alice),
    );
    assert!(ws_connects(&server.url, &with_old).await);
    assert!(!ws_connects(&server.url, &with_new).await);

    std::fs::write(&path, config(&format!("hmac_secret = \"{new}\""))).expect("rotate");
    server.signal(SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ws_connects(&server.url, &with_old).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the old secret still verifies tokens after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ws_connects(&server.url, &with_new).await);

    // An HMAC secret with a non-HMAC algorithm does not build: the new secret stays in use.
    std::fs::write(
        &path,
        config(&format!(
            "hmac_secret = \"{old}\"\nhmac_algorithm = \"RS256\""
        )),
    )
    .expect("break the token config");
    server.signal(SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(ws_connects(&server.url, &with_new).await);
    assert!(!ws_connects(&server.url, &with_old).await);

    server.signal(SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(10)), Some(0));
}

/// Whoever starts Herald may signal it the moment the banner appears: the signals are watched
/// before the banner is printed, so SIGHUP then reloads (the process stays) and SIGTERM is a
/// graceful exit 0 — never the default action, which kills the process.
#[test]
fn signals_sent_as_soon_as_the_banner_appears_are_handled() {
    const SIGHUP: i32 = 1;
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = ServerProcess::start(&["--listen", "127.0.0.1:0"], dir.path());
        server.signal(SIGHUP);
        server.signal(SIGTERM);
        assert_eq!(
            server.wait(Duration::from_secs(10)),
            Some(0),
            "SIGHUP then SIGTERM right after the banner: a reload, then a graceful exit"
        );
    }
}
