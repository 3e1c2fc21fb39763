//! Durability under SIGKILL: every publish that got a success response is in history after a
//! restart, in order, with contiguous offsets and the same epoch (guarantees 1 and 2).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::process::ServerProcess;
use serde_json::{Value, json};

const SIGKILL: i32 = 9;
const KEY: &str = "crash-test-key-0123456789";
const CHANNELS: usize = 4;
const PUBLISHERS: usize = 32;

fn write_config(dir: &std::path::Path, sync: &str) -> String {
    let path = dir.join("herald.toml");
    let text = format!(
        "[api]\nkeys = [\"{KEY}\"]\n[storage]\nengine = \"sqlite\"\nsync = \"{sync}\"\ndata_dir = \"{}\"\n[namespace]\nhistory_size = 1000000\nhistory_ttl = \"1d\"\n",
        dir.join("data").display()
    );
    std::fs::write(&path, text).expect("write config");
    path.to_str().expect("utf-8").to_owned()
}

/// (channel, offset, epoch, payload id) for each acknowledged publish.
type Acked = Vec<(String, u64, String, u64)>;

async fn publish_until_killed(
    url: String,
    publisher: usize,
    acked: Arc<parking_lot::Mutex<Acked>>,
) {
    let http = reqwest::Client::new();
    for seq in 0u64.. {
        let channel = format!("crash-{}", (publisher + seq as usize) % CHANNELS);
        let id = (publisher as u64) << 32 | seq;
        let response = http
            .post(format!("{url}/api/publish"))
            .header("X-API-Key", KEY)
            .json(&json!({"channel": channel, "data": {"id": id}}))
            .send()
            .await;
        let Ok(response) = response else { return };
        let Ok(body) = response.json::<Value>().await else {
            return;
        };
        let result = &body["result"];
        let (Some(offset), Some(epoch)) = (result["offset"].as_u64(), result["epoch"].as_str())
        else {
            panic!("publish failed before the kill: {body}");
        };
        acked.lock().push((channel, offset, epoch.to_owned(), id));
    }
}

async fn crash_round(sync: &str, round: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), sync);
    let server = ServerProcess::start(
        &["--config", &config, "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|p| tokio::spawn(publish_until_killed(server.url.clone(), p, acked.clone())))
        .collect();
    // Kill mid-burst once a good number of publishes have been acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked.lock().len() < 2000 + round * 500 {
        assert!(
            std::time::Instant::now() < deadline,
            "publishing too slow: {} acked",
            acked.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.signal(SIGKILL);
    for task in tasks {
        task.await.expect("publisher task");
    }
    drop(server);
    let acked = acked.lock().clone();

    let server = ServerProcess::start(
        &["--config", &config, "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    let http = reqwest::Client::new();
    let mut stored: HashMap<String, (String, Vec<(u64, u64)>)> = HashMap::new();
    for c in 0..CHANNELS {
        let channel = format!("crash-{c}");
        let body: Value = http
            .post(format!("{}/api/history", server.url))
            .header("X-API-Key", KEY)
            .json(&json!({"channel": channel, "limit": -1}))
            .send()
            .await
            .expect("history")
            .json()
            .await
            .expect("json");
        let result = &body["result"];
        let publications: Vec<(u64, u64)> = result["publications"]
            .as_array()
            .expect("publications")
            .iter()
            .map(|p| {
                (
                    p["offset"].as_u64().expect("offset"),
                    p["data"]["id"].as_u64().expect("id"),
                )
            })
            .collect();
        let offsets: Vec<u64> = publications.iter().map(|(o, _)| *o).collect();
        let expected: Vec<u64> = (1..=offsets.len() as u64).collect();
        assert_eq!(
            offsets, expected,
            "{channel}: offsets must be contiguous from 1 after a crash"
        );
        assert_eq!(
            result["offset"].as_u64(),
            offsets.last().copied().or(Some(0)),
            "{channel}: top matches history"
        );
        stored.insert(
            channel,
            (
                result["epoch"].as_str().expect("epoch").to_owned(),
                publications,
            ),
        );
    }
    for (channel, offset, epoch, id) in &acked {
        let (stored_epoch, publications) = &stored[channel];
        assert_eq!(stored_epoch, epoch, "{channel}: epoch survives the crash");
        let found = publications.get((*offset - 1) as usize);
        assert_eq!(
            found,
            Some(&(*offset, *id)),
            "{channel}: acknowledged publish {id} at offset {offset} is lost or moved"
        );
    }
    eprintln!(
        "sync={sync} round {round}: {} acknowledged publishes all present",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_publishes_survive_sigkill_normal_sync() {
    for round in 0..3 {
        crash_round("normal", round).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_publishes_survive_sigkill_full_sync() {
    crash_round("full", 0).await;
}
