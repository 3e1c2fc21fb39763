//! A quick throughput check, not a benchmark and not an assertion on speed: N APNs sends
//! (default 20,000; `HERALD_PUSH_THROUGHPUT_N`) with 256 in flight through one
//! [`ApnsSender`] against the emulator in the same process, printing sends/s. Run with
//! `--nocapture` (nextest: `--no-capture`) to see the number.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use common::*;
use futures::StreamExt;
use herald_outbound::apns::ApnsSender;
use herald_outbound::sender::{ApnsNotification, Sender};
use serde_json::json;

const CONCURRENCY: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_sends_per_second() {
    let n: u32 = std::env::var("HERALD_PUSH_THROUGHPUT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mock = mock().await;
    mock.apns.set_max_records(1_000);
    let sender = Arc::new(ApnsSender::new(&apns_config(&mock)).expect("sender"));
    let notification = Arc::new(ApnsNotification {
        headers: BTreeMap::new(),
        payload: json!({"aps": {"alert": {"title": "Herald", "body": "a new message"}}, "room": "r1"}),
    });
    let targets: Vec<_> = (0..n).map(|i| apns_target("", &device(i))).collect();

    let started = Instant::now();
    let failures = futures::stream::iter(targets)
        .map(|target| {
            let sender = sender.clone();
            let notification = notification.clone();
            async move { sender.send(&target, &notification).await }
        })
        .buffer_unordered(CONCURRENCY)
        .filter(|result| std::future::ready(result.is_err()))
        .count()
        .await;
    let elapsed = started.elapsed();

    let rate = f64::from(n) / elapsed.as_secs_f64();
    println!(
        "apns throughput: {n} sends, {CONCURRENCY} in flight, {:.2} s, {rate:.0} sends/s \
         ({} connection(s); sender and emulator share this process)",
        elapsed.as_secs_f64(),
        mock.apns.stats().connections
    );
    assert_eq!(failures, 0);
    assert_eq!(mock.apns.accepted(), u64::from(n));
    assert_eq!(
        mock.apns.records().len(),
        1_000,
        "the record list stays bounded"
    );
}
