//! Webhook deliveries end to end against a local receiver (axum on 127.0.0.1:0): signatures,
//! the retry schedule with the same `webhook-id`, `Retry-After`, 410 Gone, disabling an
//! endpoint that keeps failing, per-endpoint order, the egress rule, the attempt log and
//! replay — through the real worker loop on an in-memory outbound queue.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use herald_core::memory_outbound::MemoryOutboundQueue;
use herald_core::outbound::{JobState, JobStatus, OutboundQueue, StatusFilter};
use herald_core::webhook_store::{MemoryWebhookStore, WebhookStore};
use herald_outbound::webhook::batch::{BATCH_KIND, WebhookBatchHandler};
use herald_outbound::webhook::deliver::{WebhookHandler, record_attempts};
use herald_outbound::webhook::endpoint::Endpoint;
use herald_outbound::webhook::endpoints::Endpoints;
use herald_outbound::webhook::event::{Event, EventType, KIND};
use herald_outbound::webhook::sign::Secret;
use herald_outbound::webhook::{WebhookService, WebhookSettings, WebhookStats};
use herald_outbound::worker::{JobHandler, Retry, RetrySchedule, Wakeup, WorkerConfig, run_worker};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::Sha256;
use tokio::sync::watch;

/// What the receiver saw: one entry per request.
#[derive(Clone, Debug)]
struct Received {
    at: Instant,
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
}

/// Scripted answers: status and `Retry-After`.
type Script = Arc<Mutex<VecDeque<(u16, Option<&'static str>)>>>;

/// A receiver that answers from a script (then 200), recording every request.
#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Received>>>,
    script: Script,
    /// Answer this status forever once the script is empty (default 200).
    then: Arc<Mutex<u16>>,
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    receiver.seen.lock().push(Received {
        at: Instant::now(),
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        body: body.to_vec(),
    });
    let (status, retry_after) = receiver
        .script
        .lock()
        .pop_front()
        .unwrap_or((*receiver.then.lock(), None));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    match retry_after {
        Some(after) => (status, [("retry-after", after)], "scripted").into_response(),
        None => (status, "scripted").into_response(),
    }
}

impl Receiver {
    async fn start(&self) -> SocketAddr {
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        addr
    }

    fn script(&self, answers: &[(u16, Option<&'static str>)]) {
        self.script.lock().extend(answers.iter().copied());
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().clone()
    }
}

struct Harness {
    service: Arc<WebhookService>,
    queue: Arc<dyn OutboundQueue>,
    store: Arc<dyn WebhookStore>,
    stop: watch::Sender<bool>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn endpoint(id: &str, url: String, secrets: Vec<String>) -> Endpoint {
    Endpoint {
        id: id.into(),
        url,
        events: vec!["*".into()],
        channels: Vec::new(),
        secrets,
        enabled: true,
        rate_limit: 0,
        ordered: false,
        timeout: None,
        description: String::new(),
    }
}

struct Options {
    schedule: Vec<Duration>,
    allow_private: bool,
    disable_after: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            schedule: vec![Duration::from_millis(100); 3],
            allow_private: true,
            disable_after: Duration::from_secs(3600),
        }
    }
}

async fn harness(endpoints: &[Endpoint], options: Options) -> Harness {
    let queue: Arc<dyn OutboundQueue> = Arc::new(MemoryOutboundQueue::new());
    let store: Arc<dyn WebhookStore> = Arc::new(MemoryWebhookStore::new());
    let schedule = RetrySchedule::new(options.schedule);
    let service = Arc::new(WebhookService {
        endpoints: Arc::new(
            Endpoints::load(store.clone(), endpoints)
                .await
                .expect("load"),
        ),
        queue: queue.clone(),
        store: store.clone(),
        wakeup: Arc::new(Wakeup::default()),
        stats: Arc::new(WebhookStats::default()),
        settings: WebhookSettings {
            allow_private_addresses: options.allow_private,
            timeout: Duration::from_secs(5),
            disable_after: options.disable_after,
            attempts: schedule.attempts(),
            batch: 4,
        },
    });
    let (handler, log) = WebhookHandler::new(service.clone(), 8).expect("handler");
    let handler = Arc::new(handler);
    let (stop, _) = watch::channel(false);
    let retry = Retry::Schedule(schedule);
    // Single deliveries, and batches of several events to an endpoint (the harness's
    // `batch = 4`), as the server runs them.
    let batches: Arc<dyn JobHandler> = Arc::new(WebhookBatchHandler {
        queue: queue.clone(),
        handler: handler.clone(),
        retry: retry.clone(),
    });
    for (kind, handler) in [
        (KIND, handler.clone() as Arc<dyn JobHandler>),
        (BATCH_KIND, batches),
    ] {
        let mut stopped = stop.subscribe();
        tokio::spawn(run_worker(
            queue.clone(),
            handler,
            WorkerConfig {
                kind: kind.into(),
                concurrency: 16,
                batch: 16,
                lease: Duration::from_secs(30),
                poll_interval: Duration::from_millis(20),
                retry: retry.clone(),
            },
            service.wakeup.clone(),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));
    }
    tokio::spawn(record_attempts(store.clone(), log));
    Harness {
        service,
        queue,
        store,
        stop,
    }
}

fn event(n: u64, channel: &str) -> Event {
    Event::new(
        EventType::Publication,
        format!("publication:{channel}:e:{n}"),
        Some(channel.into()),
        1_700_000_000_000 + n,
        &serde_json::json!({"channel": channel, "offset": n}),
    )
    .expect("event")
}

/// Waits until `done` holds (bounded).
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the queue's statuses under `filter` until `done` holds for them (bounded).
async fn statuses_until(
    queue: &Arc<dyn OutboundQueue>,
    filter: StatusFilter,
    what: &str,
    done: impl Fn(&[JobStatus]) -> bool,
) -> Vec<JobStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = queue
            .statuses(&filter, &Default::default())
            .await
            .expect("statuses");
        if done(&page.items) {
            return page.items;
        }
        assert!(Instant::now() < deadline, "{what}: {:?}", page.items);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn of_endpoint(endpoint: &str) -> StatusFilter {
    StatusFilter {
        recipient: endpoint.into(),
        ..StatusFilter::default()
    }
}

fn all_in(state: JobState) -> impl Fn(&[JobStatus]) -> bool {
    move |items| !items.is_empty() && items.iter().all(|s| s.state == state)
}

/// An independent check of the Standard Webhooks signature (HMAC-SHA256 over
/// `id.timestamp.body`, base64), for each `v1,` entry.
fn verifies(secret: &str, received: &Received) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("key");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("hmac");
    mac.update(format!("{}.{}.", received.id, received.timestamp).as_bytes());
    mac.update(&received.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    received.signature.split(' ').any(|entry| entry == expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_with_every_secret_and_carry_the_event() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let (old, new) = (Secret::generate(), Secret::generate());
    let h = harness(
        &[endpoint(
            "a",
            format!("http://{addr}/hook"),
            vec![new.clone(), old.clone()],
        )],
        Options::default(),
    )
    .await;
    let e = event(1, "orders:1");
    assert_eq!(
        h.service
            .enqueue(std::slice::from_ref(&e))
            .await
            .expect("enqueue"),
        1
    );
    until("the delivery", || receiver.seen().len() == 1).await;
    let got = &receiver.seen()[0];
    assert_eq!(got.id, e.message_id("a"));
    assert!(verifies(&old, got) && verifies(&new, got), "{got:?}");
    assert!(!verifies(&Secret::generate(), got));
    let now = herald_core::time::now_ms() / 1000;
    let ts: u64 = got.timestamp.parse().expect("timestamp");
    assert!(now.abs_diff(ts) <= 5, "timestamp {ts} vs now {now}");
    let body: serde_json::Value = serde_json::from_slice(&got.body).expect("json body");
    assert_eq!(body["type"], "publication");
    assert_eq!(body["data"]["channel"], "orders:1");
    assert_eq!(body["id"], e.id());
    statuses_until(
        &h.queue,
        of_endpoint("a"),
        "recorded as sent",
        all_in(JobState::Sent),
    )
    .await;
    // The same event again (a re-run) is the same job: nothing new is sent.
    assert_eq!(h.service.enqueue(&[e]).await.expect("enqueue"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_on_the_schedule_with_the_same_id_and_are_logged() {
    let receiver = Receiver::default();
    receiver.script(&[(500, None), (502, None)]);
    let addr = receiver.start().await;
    let h = harness(
        &[endpoint(
            "a",
            format!("http://{addr}/hook"),
            vec![Secret::generate()],
        )],
        Options {
            schedule: vec![Duration::from_millis(300), Duration::from_millis(600)],
            ..Options::default()
        },
    )
    .await;
    let e = event(1, "c");
    h.service
        .enqueue(std::slice::from_ref(&e))
        .await
        .expect("enqueue");
    until("three attempts", || receiver.seen().len() == 3).await;
    let seen = receiver.seen();
    assert!(
        seen.iter().all(|r| r.id == e.message_id("a")),
        "same webhook-id on every retry"
    );
    let first_gap = seen[1].at - seen[0].at;
    let second_gap = seen[2].at - seen[1].at;
    assert!(first_gap >= Duration::from_millis(300), "{first_gap:?}");
    assert!(second_gap >= Duration::from_millis(600), "{second_gap:?}");
    assert!(first_gap < Duration::from_millis(2000), "{first_gap:?}");
    let message = e.message_id("a");
    let store = h.store.clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = store.attempts(&message).await.expect("attempts");
        if log.len() == 3 {
            let statuses: Vec<u16> = log.iter().map(|a| a.status).collect();
            assert_eq!(statuses, vec![500, 502, 200]);
            assert_eq!(
                log.iter().map(|a| a.attempt).collect::<Vec<_>>(),
                vec![1, 2, 3]
            );
            assert!(log[0].error.contains("HTTP 500"), "{:?}", log[0]);
            break;
        }
        assert!(Instant::now() < deadline, "attempt log: {log:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_exhausted_retries_become_replayable_dead_letters() {
    let receiver = Receiver::default();
    receiver.script(&[(503, Some("1"))]);
    let addr = receiver.start().await;
    let h = harness(
        &[endpoint(
            "a",
            format!("http://{addr}/hook"),
            vec![Secret::generate()],
        )],
        Options {
            schedule: vec![Duration::from_millis(50)],
            ..Options::default()
        },
    )
    .await;
    h.service.enqueue(&[event(1, "c")]).await.expect("enqueue");
    until("the retry", || receiver.seen().len() == 2).await;
    let seen = receiver.seen();
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After: 1 was not honoured: {gap:?}"
    );

    // Two attempts in all: 500, 500 → a dead letter, replayed with the same webhook-id.
    *receiver.then.lock() = 500;
    let e = event(2, "c");
    h.service
        .enqueue(std::slice::from_ref(&e))
        .await
        .expect("enqueue");
    let group = StatusFilter {
        group: e.id(),
        ..StatusFilter::default()
    };
    let failed = statuses_until(&h.queue, group, "the delivery fails for good", |items| {
        items.iter().any(|s| s.state == JobState::Failed)
    })
    .await
    .remove(0);
    assert!(
        failed.reason.contains("gave up after 2 attempts"),
        "{failed:?}"
    );
    *receiver.then.lock() = 200;
    let before = receiver.seen().len();
    assert_eq!(
        h.service
            .replay("a", Some(&e.message_id("a")))
            .await
            .expect("replay"),
        1
    );
    until("the replay", || receiver.seen().len() == before + 1).await;
    assert_eq!(
        receiver.seen().last().map(|r| r.id.clone()),
        Some(e.message_id("a"))
    );
    assert_eq!(
        h.service
            .replay("a", Some(&e.message_id("a")))
            .await
            .expect("replay"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_and_later_deliveries_become_dead_letters() {
    let receiver = Receiver::default();
    receiver.script(&[(410, None)]);
    let addr = receiver.start().await;
    let watcher = Receiver::default();
    let watcher_addr = watcher.start().await;
    let mut watching = endpoint(
        "watch",
        format!("http://{watcher_addr}/hook"),
        vec![Secret::generate()],
    );
    watching.events = vec!["webhook.endpoint_disabled".into()];
    let h = harness(
        &[
            endpoint("a", format!("http://{addr}/hook"), vec![Secret::generate()]),
            watching,
        ],
        Options::default(),
    )
    .await;
    h.service.enqueue(&[event(1, "c")]).await.expect("enqueue");
    let endpoints = h.service.endpoints.clone();
    until("the endpoint disabled", || {
        endpoints
            .get("a")
            .is_some_and(|e| e.state.disabled.is_some())
    })
    .await;
    let reason = endpoints
        .get("a")
        .and_then(|e| e.state.disabled.clone())
        .expect("disabled");
    assert!(reason.reason.contains("410"), "{reason:?}");
    until("the endpoint-disabled event", || watcher.seen().len() == 1).await;
    let body: serde_json::Value = serde_json::from_slice(&watcher.seen()[0].body).expect("json");
    assert_eq!(body["type"], "webhook.endpoint_disabled");
    assert_eq!(body["data"]["endpoint"], "a");
    // A disabled endpoint is no longer chosen for new events, and gets nothing.
    assert_eq!(
        h.service.enqueue(&[event(2, "c")]).await.expect("enqueue"),
        0
    );
    assert_eq!(receiver.seen().len(), 1);
    assert_eq!(
        h.service
            .stats
            .disabled_endpoints
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_longer_than_disable_after_is_disabled() {
    let receiver = Receiver::default();
    *receiver.then.lock() = 500;
    let addr = receiver.start().await;
    let h = harness(
        &[endpoint(
            "a",
            format!("http://{addr}/hook"),
            vec![Secret::generate()],
        )],
        Options {
            schedule: vec![Duration::from_millis(200); 20],
            disable_after: Duration::from_millis(500),
            ..Options::default()
        },
    )
    .await;
    h.service.enqueue(&[event(1, "c")]).await.expect("enqueue");
    let endpoints = h.service.endpoints.clone();
    until("failing recorded", || {
        endpoints
            .get("a")
            .is_some_and(|e| e.state.failing_since.is_some())
    })
    .await;
    let started = Instant::now();
    until("disabled for failing too long", || {
        endpoints
            .get("a")
            .is_some_and(|e| e.state.disabled.is_some())
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "disabled too early"
    );
    let disabled = endpoints
        .get("a")
        .and_then(|e| e.state.disabled.clone())
        .expect("state");
    assert!(disabled.reason.contains("disable_after"), "{disabled:?}");
    let attempts = receiver.seen().len();
    assert!((3..=6).contains(&attempts), "{attempts} attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_endpoint_gets_events_in_order_through_failures() {
    let receiver = Receiver::default();
    receiver.script(&[(500, None), (200, None), (503, None), (500, None)]);
    let addr = receiver.start().await;
    let mut ordered = endpoint("o", format!("http://{addr}/hook"), vec![Secret::generate()]);
    ordered.ordered = true;
    let h = harness(
        &[ordered],
        Options {
            schedule: vec![Duration::from_millis(30); 5],
            ..Options::default()
        },
    )
    .await;
    let events: Vec<Event> = (1..=20).map(|n| event(n, "c")).collect();
    for chunk in events.chunks(3) {
        h.service.enqueue(chunk).await.expect("enqueue");
    }
    until("every event delivered", || {
        let mut ids: Vec<String> = receiver.seen().into_iter().map(|r| r.id).collect();
        ids.dedup();
        ids.len() == 20
    })
    .await;
    let mut delivered: Vec<String> = receiver.seen().into_iter().map(|r| r.id).collect();
    delivered.dedup();
    let expected: Vec<String> = events.iter().map(|e| e.message_id("o")).collect();
    assert_eq!(
        delivered, expected,
        "one at a time, in enqueue order, retries included"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_unless_allowed() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let h = harness(
        &[
            endpoint(
                "literal",
                format!("http://{addr}/hook"),
                vec![Secret::generate()],
            ),
            endpoint(
                "name",
                format!("http://localhost:{}/hook", addr.port()),
                vec![Secret::generate()],
            ),
        ],
        Options {
            allow_private: false,
            ..Options::default()
        },
    )
    .await;
    h.service.enqueue(&[event(1, "c")]).await.expect("enqueue");
    let items = statuses_until(&h.queue, StatusFilter::default(), "both refused", |items| {
        items.len() == 2 && all_in(JobState::Failed)(items)
    })
    .await;
    assert!(
        items.iter().all(|s| s.reason.contains("egress refused")),
        "{items:?}"
    );
    assert_eq!(
        items.iter().map(|s| s.attempts).max(),
        Some(1),
        "not retried"
    );
    assert!(
        receiver.seen().is_empty(),
        "nothing reached the loopback receiver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_spreads_deliveries_without_failing_them() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let mut limited = endpoint("r", format!("http://{addr}/hook"), vec![Secret::generate()]);
    limited.rate_limit = 4;
    let h = harness(
        &[limited],
        Options {
            schedule: vec![Duration::from_millis(30)],
            ..Options::default()
        },
    )
    .await;
    let started = Instant::now();
    let events: Vec<Event> = (1..=10).map(|n| event(n, "c")).collect();
    h.service.enqueue(&events).await.expect("enqueue");
    until("all ten", || receiver.seen().len() == 10).await;
    // Fixed one-second windows: 4 + 4 + 2 needs two window boundaries, so at least a second
    // whatever part of a window the burst started in.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "10 at 4/s took {:?}",
        started.elapsed()
    );
    let items = statuses_until(&h.queue, of_endpoint("r"), "all ten settled", |items| {
        items.len() == 10 && items.iter().all(|s| s.state.is_final())
    })
    .await;
    assert!(
        items.iter().all(|s| s.state == JobState::Sent),
        "none failed: {items:?}"
    );
}

#[tokio::test]
async fn an_endpoint_dropped_from_the_config_file_is_removed_and_api_ones_stay() {
    let store: Arc<dyn WebhookStore> = Arc::new(MemoryWebhookStore::new());
    let url = || "https://example.com/hook".to_string();
    let first = Endpoints::load(
        store.clone(),
        &[
            endpoint("keep", url(), vec![Secret::generate()]),
            endpoint("drop", url(), vec![Secret::generate()]),
        ],
    )
    .await
    .expect("load");
    first
        .put(endpoint("api", url(), vec![Secret::generate()]), true)
        .await
        .expect("api endpoint");
    let second = Endpoints::load(
        store.clone(),
        &[endpoint("keep", url(), vec![Secret::generate()])],
    )
    .await
    .expect("reload");
    let ids: Vec<String> = second.all().keys().cloned().collect();
    assert_eq!(ids, vec!["api".to_string(), "keep".to_string()]);
    assert!(second.get("keep").is_some_and(|e| e.from_config));
    assert!(second.get("api").is_some_and(|e| !e.from_config));
}

#[tokio::test]
async fn events_queued_together_go_as_a_batch_and_a_failed_one_is_retried_on_its_own() {
    let receiver = Receiver::default();
    // The first request of the batch fails; the others are accepted.
    receiver.script(&[(503, None)]);
    let addr = receiver.start().await;
    let h = harness(
        &[endpoint(
            "b",
            format!("http://{addr}/hook"),
            vec![Secret::generate()],
        )],
        Options {
            schedule: vec![Duration::from_millis(50)],
            ..Options::default()
        },
    )
    .await;
    let events: Vec<Event> = (1..=3).map(|n| event(n, "c")).collect();
    assert_eq!(h.service.enqueue(&events).await.expect("enqueue"), 3);
    until("three deliveries and one retry", || {
        receiver.seen().len() == 4
    })
    .await;
    let items = statuses_until(&h.queue, of_endpoint("b"), "all settled", |items| {
        items.iter().filter(|s| s.kind == KIND).count() == 3
            && items.iter().all(|s| s.state.is_final())
    })
    .await;
    // One batch job stood for the three; each delivery has its own row, all sent.
    let batches: Vec<_> = items.iter().filter(|s| s.kind == BATCH_KIND).collect();
    assert_eq!(batches.len(), 1, "{items:?}");
    let deliveries: Vec<_> = items.iter().filter(|s| s.kind == KIND).collect();
    assert!(
        deliveries.iter().all(|s| s.state == JobState::Sent),
        "{items:?}"
    );
    let mut attempts: Vec<u32> = deliveries.iter().map(|s| s.attempts).collect();
    attempts.sort_unstable();
    assert_eq!(
        attempts,
        vec![1, 1, 2],
        "the failed one went on as a single job"
    );
    // Every event arrived once under its own webhook-id, the retried one twice.
    let seen = receiver.seen();
    for e in &events {
        let id = e.message_id("b");
        assert!(seen.iter().any(|r| r.id == id), "{id} never arrived");
    }
    let retried = &seen[0].id;
    assert_eq!(seen.iter().filter(|r| &r.id == retried).count(), 2);
    let log = h.store.attempts(retried).await.expect("attempts");
    let statuses: Vec<u16> = log.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![503, 200], "both attempts are logged");
}
