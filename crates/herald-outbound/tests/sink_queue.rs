//! Sink deliveries through the real outbound queue and worker, with a broker stand-in that
//! is down for a while: each channel's publications reach it in offset order, each once,
//! and a re-enqueued publication is not delivered twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::memory_outbound::MemoryOutboundQueue;
use herald_core::outbound::{NewJob, OutboundQueue};
use herald_outbound::sink::{
    Sink, SinkError, SinkHandler, SinkMessage, SinkStats, job_id, job_kind, order_key,
};
use herald_outbound::worker::{Backoff, Retry, Wakeup, WorkerConfig, run_worker};
use parking_lot::Mutex;

/// Accepts publishes only while `up`; records what it accepted.
#[derive(Default)]
struct Broker {
    up: AtomicBool,
    accepted: Mutex<Vec<(String, u64)>>,
}

#[async_trait]
impl Sink for Broker {
    async fn publish(&self, _id: &str, message: &SinkMessage) -> Result<String, SinkError> {
        // A little latency, so channels interleave.
        tokio::time::sleep(Duration::from_millis(1)).await;
        if !self.up.load(Ordering::SeqCst) {
            return Err(SinkError::Unavailable("broker down".into()));
        }
        self.accepted
            .lock()
            .push((message.channel.clone(), message.offset));
        Ok(format!("{}", message.offset))
    }
}

fn job(sink: &str, channel: &str, offset: u64) -> NewJob {
    let message = SinkMessage {
        channel: channel.into(),
        epoch: "e".into(),
        offset,
        time_ms: 0,
        data: Bytes::from(format!("{{\"n\":{offset}}}")),
        binary: false,
        tags: BTreeMap::new(),
    };
    NewJob {
        id: job_id(sink, channel, "e", offset),
        kind: job_kind(sink),
        group: sink.into(),
        recipient: channel.into(),
        payload: message.to_payload(),
        not_before: 0,
        expire_at: None,
        order_key: Some(order_key(sink, channel)),
    }
}

#[tokio::test]
async fn a_broker_outage_delays_deliveries_without_reordering_or_losing_any() {
    let queue: Arc<dyn OutboundQueue> = Arc::new(MemoryOutboundQueue::new());
    let broker = Arc::new(Broker::default());
    let stats = Arc::new(SinkStats::default());
    let handler = Arc::new(SinkHandler {
        sink: broker.clone(),
        stats: stats.clone(),
        timeout: Duration::from_secs(5),
    });
    let wakeup = Arc::new(Wakeup::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(run_worker(
        queue.clone(),
        handler,
        WorkerConfig {
            kind: job_kind("s"),
            concurrency: 8,
            batch: 16,
            lease: Duration::from_secs(10),
            poll_interval: Duration::from_millis(10),
            retry: Retry::Exponential(Backoff {
                base: Duration::from_millis(5),
                max: Duration::from_millis(40),
                attempts: u32::MAX,
            }),
        },
        wakeup.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let channels = ["a", "b", "c"];
    // Down from the start: every channel's first job fails and is retried.
    for offset in 1..=20 {
        let jobs = channels.iter().map(|c| job("s", c, offset)).collect();
        queue.enqueue(jobs).await.expect("enqueue");
        wakeup.wake();
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(broker.accepted.lock().is_empty());
    assert!(stats.retried.load(Ordering::Relaxed) >= 3);
    broker.up.store(true, Ordering::SeqCst);
    // The same publications again (an observer re-run): nothing is added.
    let again: Vec<NewJob> = (1..=20)
        .flat_map(|offset| channels.iter().map(move |c| job("s", c, offset)))
        .collect();
    assert_eq!(queue.enqueue(again).await.expect("enqueue"), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while broker.accepted.lock().len() < 60 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            broker.accepted.lock()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(());
    worker.await.expect("worker stops");
    let accepted = broker.accepted.lock().clone();
    assert_eq!(accepted.len(), 60, "{accepted:?}");
    for channel in channels {
        let offsets: Vec<u64> = accepted
            .iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(offsets, (1..=20).collect::<Vec<_>>(), "channel {channel}");
    }
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 60);
    assert_eq!(stats.rejected.load(Ordering::Relaxed), 0);
}

/// A message the broker refuses for good is a dead letter, and the channel goes on.
#[tokio::test]
async fn a_rejected_message_fails_and_the_next_one_goes() {
    struct Picky(Mutex<Vec<u64>>);
    #[async_trait]
    impl Sink for Picky {
        async fn publish(&self, _id: &str, message: &SinkMessage) -> Result<String, SinkError> {
            if message.offset == 2 {
                return Err(SinkError::Rejected("too large".into()));
            }
            self.0.lock().push(message.offset);
            Ok(String::new())
        }
    }
    let queue: Arc<dyn OutboundQueue> = Arc::new(MemoryOutboundQueue::new());
    let picky = Arc::new(Picky(Mutex::new(Vec::new())));
    let stats = Arc::new(SinkStats::default());
    let handler = Arc::new(SinkHandler {
        sink: picky.clone(),
        stats: stats.clone(),
        timeout: Duration::from_secs(5),
    });
    let jobs = (1..=3).map(|offset| job("p", "x", offset)).collect();
    queue.enqueue(jobs).await.expect("enqueue");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(run_worker(
        queue.clone(),
        handler,
        WorkerConfig {
            kind: job_kind("p"),
            concurrency: 4,
            batch: 4,
            lease: Duration::from_secs(10),
            poll_interval: Duration::from_millis(10),
            retry: Retry::Exponential(Backoff {
                base: Duration::from_millis(5),
                max: Duration::from_millis(5),
                attempts: u32::MAX,
            }),
        },
        Arc::new(Wakeup::default()),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while picky.0.lock().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(());
    worker.await.expect("worker stops");
    assert_eq!(*picky.0.lock(), vec![1, 3]);
    assert_eq!(stats.rejected.load(Ordering::Relaxed), 1);
}
