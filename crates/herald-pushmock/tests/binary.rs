//! The `herald-pushmock` binary and its control API, as a Python test would use them: start
//! the process, read the one JSON line, script behaviour over HTTP, read the records back.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_prints_its_addresses_and_obeys_the_control_api() {
    let dir = tempfile_dir();
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_herald-pushmock"))
            .args(["--generate-apns", "KEY1:TEAM1:com.example.app"])
            .args(["--generate-fcm", "proj-a", "--out-dir"])
            .arg(&dir)
            .args(["--max-records", "100"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn herald-pushmock"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .expect("join")
    .expect("read the address line");
    let info: Value = serde_json::from_str(&line).expect("one JSON line");
    for field in ["apns", "fcm", "token_uri", "control"] {
        assert!(
            info[field]
                .as_str()
                .is_some_and(|u| u.starts_with("http://127.0.0.1:")),
            "{field}"
        );
    }
    let key_file = info["apns_keys"][0]["key_file"].as_str().expect("key file");
    assert!(
        std::fs::read_to_string(key_file)
            .expect("p8")
            .contains("BEGIN PRIVATE KEY")
    );
    let credentials = info["fcm_accounts"][0]["credentials_file"]
        .as_str()
        .expect("file");
    let account: Value =
        serde_json::from_str(&std::fs::read_to_string(credentials).expect("json")).expect("json");
    assert_eq!(account["token_uri"], info["token_uri"]);
    assert_eq!(account["project_id"], "proj-a");

    let control = info["control"].as_str().expect("control").to_owned();
    let client = reqwest::Client::new();
    let post = |path: &str, body: Value| client.post(format!("{control}{path}")).json(&body).send();
    let get = |path: &str| client.get(format!("{control}{path}")).send();
    assert_eq!(get("/health").await.expect("health").status().as_u16(), 200);
    for (path, body) in [
        (
            "/apns/unregistered",
            json!({"token": "ab".repeat(32), "timestamp": 5}),
        ),
        ("/apns/unknown-tokens", json!({"token": "cd".repeat(32)})),
        (
            "/apns/token-topics",
            json!({"token": "ef".repeat(32), "topic": "com.other"}),
        ),
        (
            "/apns/failures",
            json!({"status": 429, "reason": "TooManyRequests", "retry_after": 3}),
        ),
        ("/apns/expire-next", json!({"count": 1})),
        ("/apns/latency", json!({"ms": 0})),
        ("/fcm/unregistered", json!({"token": "t1"})),
        (
            "/fcm/token-projects",
            json!({"token": "t2", "project": "proj-b"}),
        ),
        (
            "/fcm/failures",
            json!({"error": "QUOTA_EXCEEDED", "retry_after": 3}),
        ),
        ("/fcm/token-expires-in", json!({"secs": 60})),
        ("/fcm/latency", json!({"ms": 0})),
        ("/fcm/revoke-tokens", json!({})),
        ("/clock/advance", json!({"secs": 10})),
        ("/reset", json!({})),
    ] {
        let response = post(path, body).await.expect("answer");
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
    let bad = post("/apns/failures", json!({"status": "soon"}))
        .await
        .expect("answer");
    assert_eq!(bad.status().as_u16(), 400);
    let missing = post("/nowhere", json!({})).await.expect("answer");
    assert_eq!(missing.status().as_u16(), 404);

    let generated: Value = post(
        "/apns/generate-key",
        json!({"key_id": "KEY2", "team_id": "TEAM2", "topics": ["com.two"]}),
    )
    .await
    .expect("answer")
    .json()
    .await
    .expect("json");
    assert!(
        generated["private_key_pem"]
            .as_str()
            .expect("pem")
            .contains("PRIVATE KEY")
    );
    let records: Value = get("/apns/records")
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    assert_eq!(records["records"], json!([]));
    let stats: Value = get("/fcm/stats")
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["accepted"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-pushmock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
