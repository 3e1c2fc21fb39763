//! The push side on Redis: the device registry and the outbound queue pass their
//! conformance suites, hold across two nodes (two engines on one Redis), and fail with
//! `Unavailable` — not a panic — while Redis is gone.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use herald_core::device::{
    DeviceError, DeviceFilter, DeviceRegistration, DeviceStore, PageRequest,
};
use herald_core::device::{Platform, Provider};
use herald_core::duration::HumanDuration;
use herald_core::fanout;
use herald_core::outbound::StatusFilter;
use herald_core::outbound::{Finished, JobState, NewJob, OutboundQueue, Outcome, QueueError};
use herald_store::redis::{RedisConfig, RedisDeviceStore, RedisEngine, RedisOutboundQueue};

use super::redis_url;

const KIND: &str = "push.fcm";
const T0: u64 = 1_700_000_000_000;
const LEASE: Duration = Duration::from_secs(60);

/// The keys of one test: every store it builds is under `root`, and all of them are
/// deleted when it ends (also when it fails).
struct Namespace {
    root: String,
    url: String,
    next: AtomicUsize,
}

impl Namespace {
    fn new(name: &str) -> Self {
        Self::on(name, &redis_url())
    }

    fn on(name: &str, url: &str) -> Self {
        Self {
            root: format!(
                "herald-test-push-{name}-{}",
                herald_core::publication::new_epoch()
            ),
            url: url.to_owned(),
            next: AtomicUsize::new(0),
        }
    }

    /// A configuration under a prefix no other store of the test uses.
    fn fresh(&self) -> RedisConfig {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.config(&format!("{}-{n}", self.root))
    }

    fn config(&self, prefix: &str) -> RedisConfig {
        RedisConfig {
            addresses: vec![self.url.clone()],
            prefix: prefix.to_owned(),
            ..RedisConfig::default()
        }
    }

    /// One node's queue and registry under `config`.
    async fn node(&self, config: &RedisConfig) -> (RedisOutboundQueue, RedisDeviceStore) {
        let (feed, _queue) = fanout::channel();
        let (engine, _presence) = RedisEngine::connect(config, feed)
            .await
            .unwrap_or_else(|e| panic!("redis at {} must be reachable: {e}", self.url));
        engine.outbound()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut connection) = client.get_connection() else {
            return;
        };
        let pattern = format!("{}-*", self.root);
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query(&mut connection)
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: redis::RedisResult<()> = redis::cmd("UNLINK").arg(chunk).query(&mut connection);
        }
    }
}

fn job(id: &str) -> NewJob {
    NewJob {
        id: id.to_owned(),
        kind: KIND.to_owned(),
        group: "g".to_owned(),
        recipient: format!("r-{id}"),
        payload: Bytes::from(format!("payload of {id}")),
        not_before: T0,
        expire_at: None,
        order_key: None,
    }
}

fn sent(id: &str, attempt: u32) -> Finished {
    Finished {
        id: id.to_owned(),
        attempt,
        outcome: Outcome::Sent {
            detail: format!("sent by attempt {attempt}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_devices_pass_the_device_suite() {
    let space = Namespace::new("devices");
    herald_core::conformance::run_device_suite(|| async {
        let (_, devices) = space.node(&space.fresh()).await;
        Ok(devices)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_passes_the_outbound_suite() {
    let space = Namespace::new("queue");
    herald_core::conformance::run_outbound_suite(|| async {
        let (queue, _) = space.node(&space.fresh()).await;
        Ok(queue)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_store_passes_conformance() {
    let space = Namespace::new("webhooks");
    herald_core::conformance::run_webhook_store_suite(|| async {
        let config = space.fresh();
        let (feed, _queue) = herald_core::fanout::channel();
        let (engine, _presence) = RedisEngine::connect(&config, feed)
            .await
            .expect("redis for the webhook store");
        std::sync::Arc::new(engine.webhooks())
            as std::sync::Arc<dyn herald_core::webhook_store::WebhookStore>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_claiming_at_once_never_get_the_same_job() {
    let space = Namespace::new("race");
    let config = space.fresh();
    let (a, _) = space.node(&config).await;
    let (b, _) = space.node(&config).await;
    const JOBS: usize = 3_000;
    let jobs: Vec<NewJob> = (0..JOBS).map(|i| job(&format!("j{i:05}"))).collect();
    assert_eq!(a.enqueue(jobs).await.expect("enqueue"), JOBS);
    let mut tasks = Vec::new();
    for queue in [a.clone(), b.clone(), a.clone(), b.clone()] {
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = queue.claim(KIND, 64, LEASE, T0).await.expect("claim");
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch.into_iter().map(|j| (j.id, j.attempt)));
            }
        }));
    }
    let mut seen = BTreeSet::new();
    let mut per_node = Vec::new();
    for task in tasks {
        let mine = task.await.expect("claimer");
        per_node.push(mine.len());
        for (id, attempt) in mine {
            assert_eq!(attempt, 1, "{id}: a first claim");
            assert!(seen.insert(id.clone()), "{id} was handed to two claimers");
        }
    }
    assert_eq!(seen.len(), JOBS, "between them the nodes claim every job");
    assert!(
        per_node.iter().all(|n| *n > 0),
        "every claimer got some jobs: {per_node:?}"
    );
}

#[tokio::test]
async fn a_dead_nodes_jobs_are_claimed_by_another_after_the_lease() {
    let space = Namespace::new("dead");
    let config = space.fresh();
    let (b, _) = space.node(&config).await;
    let ids: Vec<String> = (0..50).map(|i| format!("d{i:02}")).collect();
    {
        // Node A claims everything and dies without finishing: its handles (and its
        // engine's connections) are gone when this block ends.
        let (a, _) = space.node(&config).await;
        a.enqueue(ids.iter().map(|id| job(id)).collect())
            .await
            .expect("enqueue");
        let claimed = a.claim(KIND, 100, LEASE, T0).await.expect("claim");
        assert_eq!(claimed.len(), 50);
    }
    let lease_ms = LEASE.as_millis() as u64;
    assert!(
        b.claim(KIND, 100, LEASE, T0 + lease_ms - 1)
            .await
            .expect("claim")
            .is_empty(),
        "nothing while A's leases hold"
    );
    let reclaimed = b
        .claim(KIND, 100, LEASE, T0 + lease_ms)
        .await
        .expect("claim");
    let mut got: Vec<(String, u32, String)> = reclaimed
        .into_iter()
        .map(|j| (j.id, j.attempt, j.last_error))
        .collect();
    got.sort();
    let expected: Vec<(String, u32, String)> = ids
        .iter()
        .map(|id| (id.clone(), 2, "lease expired".to_owned()))
        .collect();
    assert_eq!(got, expected, "B gets every job as the second attempt");

    // A late finish of A's attempt changes nothing: B holds the jobs now.
    let (late, _) = space.node(&config).await;
    late.finish(
        ids.iter().map(|id| sent(id, 1)).collect(),
        T0 + lease_ms + 1,
    )
    .await
    .expect("finish");
    let sending = StatusFilter {
        states: vec![JobState::Sending],
        ..StatusFilter::default()
    };
    let page = PageRequest {
        include_total: true,
        ..PageRequest::default()
    };
    let still = b.statuses(&sending, &page).await.expect("statuses");
    assert_eq!(still.total, Some(50), "A's late finish was fenced off");
    b.finish(
        ids.iter().map(|id| sent(id, 2)).collect(),
        T0 + lease_ms + 2,
    )
    .await
    .expect("finish");
    let done = b
        .statuses(
            &StatusFilter {
                states: vec![JobState::Sent],
                ..StatusFilter::default()
            },
            &page,
        )
        .await
        .expect("statuses");
    assert_eq!(done.total, Some(50));
    assert!(
        done.items
            .iter()
            .all(|s| s.reason == "sent by attempt 2" && s.attempts == 2),
        "B's finish counts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_registering_one_token_make_one_device() {
    let space = Namespace::new("token");
    let config = space.fresh();
    let (_, a) = space.node(&config).await;
    let (_, b) = space.node(&config).await;
    let registration = |user: usize| DeviceRegistration {
        provider: Some(Provider::Apns),
        token: "shared-token".to_owned(),
        platform: Some(Platform::Ios),
        user: format!("user-{user}"),
        topics: vec![format!("topic-{user}")],
        ..DeviceRegistration::default()
    };
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let registration = registration(i);
        tasks.push(tokio::spawn(async move {
            store.register(registration, T0 + i as u64).await
        }));
    }
    let mut ids = BTreeSet::new();
    for task in tasks {
        let device = task.await.expect("task").expect("register");
        ids.insert(device.id);
    }
    assert_eq!(
        ids.len(),
        1,
        "every registration found the one device: {ids:?}"
    );
    let listed = a
        .list(&DeviceFilter::default(), false, &PageRequest::default())
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
    let device = &listed.items[0];
    // Whichever registration came last, the indexes agree with the device.
    let by_topic = b
        .list(
            &DeviceFilter {
                topics: device.topics.clone(),
                users: vec![device.user.clone()],
                ..DeviceFilter::default()
            },
            false,
            &PageRequest::default(),
        )
        .await
        .expect("list");
    assert_eq!(by_topic.items.len(), 1, "{device:?}");
    let stale_topics = (0..20)
        .map(|i| format!("topic-{i}"))
        .filter(|t| !device.topics.contains(t))
        .collect();
    let stale = b
        .list(
            &DeviceFilter {
                topics: stale_topics,
                ..DeviceFilter::default()
            },
            false,
            &PageRequest::default(),
        )
        .await
        .expect("list");
    assert!(
        stale.items.is_empty(),
        "no index keeps an old topic: {stale:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_goes_away_gives_unavailable_and_comes_back() {
    let mut server = super::server::RedisServer::start();
    let space = Namespace::on("outage", &server.url());
    let mut config = space.fresh();
    config.command_timeout = HumanDuration(Duration::from_millis(500));
    config.connect_timeout = HumanDuration(Duration::from_millis(500));
    let (queue, devices) = space.node(&config).await;
    queue.enqueue(vec![job("before")]).await.expect("enqueue");
    server.kill();

    let started = std::time::Instant::now();
    let enqueued = queue.enqueue(vec![job("during")]).await;
    assert!(
        matches!(enqueued, Err(QueueError::Unavailable(_))),
        "enqueue: {enqueued:?}"
    );
    let claimed = queue.claim(KIND, 10, LEASE, T0).await;
    assert!(
        matches!(claimed, Err(QueueError::Unavailable(_))),
        "claim: {claimed:?}"
    );
    let rate = queue
        .take_rate("user:a", 1, Duration::from_secs(1), T0)
        .await;
    assert!(
        matches!(rate, Err(QueueError::Unavailable(_))),
        "take_rate: {rate:?}"
    );
    let registered = devices
        .register(
            DeviceRegistration {
                provider: Some(Provider::Fcm),
                token: "t".to_owned(),
                platform: Some(Platform::Android),
                ..DeviceRegistration::default()
            },
            T0,
        )
        .await;
    assert!(
        matches!(registered, Err(DeviceError::Unavailable(_))),
        "register: {registered:?}"
    );
    let listed = devices
        .list(&DeviceFilter::default(), false, &PageRequest::default())
        .await;
    assert!(
        matches!(listed, Err(DeviceError::Unavailable(_))),
        "list: {listed:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failures come within the timeouts, took {:?}",
        started.elapsed()
    );

    // Back (empty: this server keeps nothing): the same handles work again.
    server.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match queue.enqueue(vec![job("after")]).await {
            Ok(added) => {
                assert_eq!(added, 1);
                break;
            }
            Err(QueueError::Unavailable(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("enqueue after the restart: {other:?}"),
        }
    }
    let claimed = queue.claim(KIND, 10, LEASE, T0).await.expect("claim");
    assert_eq!(
        claimed.into_iter().map(|j| j.id).collect::<Vec<_>>(),
        vec!["after"]
    );
    devices
        .list(&DeviceFilter::default(), false, &PageRequest::default())
        .await
        .expect("list after the restart");
}

#[tokio::test]
async fn an_enqueue_no_replica_confirmed_is_unavailable_and_safe_to_repeat() {
    let space = Namespace::new("wait");
    let mut config = space.fresh();
    config.wait_replicas = 1;
    config.wait_timeout = HumanDuration(Duration::from_millis(100));
    let (queue, _) = space.node(&config).await;
    let result = queue.enqueue(vec![job("w")]).await;
    match result {
        Err(QueueError::Unavailable(detail)) => {
            assert!(detail.contains("confirmed by 0 of 1 replicas"), "{detail}");
        }
        other => panic!("the test Redis has no replica: expected unavailable, got {other:?}"),
    }
    // Stored on the primary all the same: the retry adds nothing, and the job is there once.
    let again = queue.enqueue(vec![job("w")]).await;
    assert!(
        matches!(again, Err(QueueError::Unavailable(_))),
        "{again:?}"
    );
    config.wait_replicas = 0;
    let (plain, _) = space.node(&config).await;
    assert_eq!(plain.enqueue(vec![job("w")]).await.expect("enqueue"), 0);
    let claimed = plain.claim(KIND, 10, LEASE, T0).await.expect("claim");
    assert_eq!(claimed.len(), 1);
}

/// Every device id `filter` lists, `limit` at a time, checking order and that no id comes
/// twice; and the total the first page reports.
async fn list_ids(
    store: &RedisDeviceStore,
    filter: &DeviceFilter,
    limit: usize,
) -> (Vec<String>, Option<u64>) {
    let mut ids: Vec<String> = Vec::new();
    let mut cursor = String::new();
    let mut total = None;
    loop {
        let page = store
            .list(
                filter,
                false,
                &PageRequest {
                    cursor: cursor.clone(),
                    limit,
                    include_total: cursor.is_empty(),
                },
            )
            .await
            .expect("list");
        if cursor.is_empty() {
            total = page.total;
        }
        assert!(page.items.len() <= limit);
        for device in page.items {
            assert!(
                ids.last().is_none_or(|last| *last < device.id),
                "{} after {:?}: out of order or twice",
                device.id,
                ids.last()
            );
            ids.push(device.id);
        }
        if page.next_cursor.is_empty() {
            return (ids, total);
        }
        cursor = page.next_cursor;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_listings_over_big_and_many_sets_page_without_gaps() {
    let space = Namespace::new("topics");
    let (_, store) = space.node(&space.fresh()).await;
    let register = |store: RedisDeviceStore, token: String, user: String, own: Vec<String>| async move {
        store
            .register(
                DeviceRegistration {
                    provider: Some(Provider::Fcm),
                    token,
                    platform: Some(Platform::Android),
                    user,
                    topics: own,
                    ..DeviceRegistration::default()
                },
                T0,
            )
            .await
            .expect("register")
            .id
    };
    // "big": 600 devices with it as their own topic and 600 devices of one user who has it,
    // so the walk merges two sets longer than one read of either.
    // "wide": one device each of 150 users who have it: too many users to merge their sets,
    // so the walk goes over every device.
    let mut tasks = Vec::new();
    for i in 0..1_350 {
        let (token, user, own) = match i {
            0..600 => (format!("own-{i}"), String::new(), vec!["big".to_owned()]),
            600..1_200 => (format!("heavy-{i}"), "heavy".to_owned(), vec![]),
            _ => (format!("wide-{i}"), format!("user-{i}"), vec![]),
        };
        tasks.push(tokio::spawn(register(store.clone(), token, user, own)));
    }
    let mut big = Vec::new();
    let mut wide = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let id = task.await.expect("task");
        if i < 1_200 {
            big.push(id);
        } else {
            wide.push(id);
        }
    }
    big.sort();
    wide.sort();
    store
        .update_user_topics(
            "heavy",
            herald_core::device::TopicOp::Set,
            &["big".to_owned()],
        )
        .await
        .expect("user topics");
    for i in 1_200..1_350 {
        store
            .update_user_topics(
                &format!("user-{i}"),
                herald_core::device::TopicOp::Add,
                &["wide".to_owned()],
            )
            .await
            .expect("user topics");
    }
    for (topic, expected) in [("big", &big), ("wide", &wide)] {
        let filter = DeviceFilter {
            topics: vec![topic.to_owned()],
            ..DeviceFilter::default()
        };
        for limit in [7, 499, 500, 1_000] {
            let (ids, total) = list_ids(&store, &filter, limit).await;
            assert_eq!(&ids, expected, "{topic}, pages of {limit}");
            assert_eq!(total, Some(expected.len() as u64), "{topic}: total");
        }
    }
    let (all, total) = list_ids(&store, &DeviceFilter::default(), 333).await;
    assert_eq!((all.len(), total), (1_350, Some(1_350)));
}

#[tokio::test]
async fn rate_windows_are_shared_by_nodes_and_count_only_uses_that_went_through() {
    let space = Namespace::new("rate");
    let config = space.fresh();
    let (a, _) = space.node(&config).await;
    let (b, _) = space.node(&config).await;
    let window = Duration::from_secs(10);
    let take = |queue: &RedisOutboundQueue, limit: u32, at: u64| {
        let queue = queue.clone();
        async move {
            queue
                .take_rate("user:alice", limit, window, at)
                .await
                .expect("take_rate")
        }
    };
    assert!(take(&a, 2, T0).await);
    assert!(
        take(&b, 2, T0 + 1).await,
        "the second use, on the other node"
    );
    assert!(
        !take(&a, 2, T0 + 2).await,
        "the window is full on every node"
    );
    assert!(!take(&b, 2, T0 + 3).await);
    assert!(
        take(&b, 3, T0 + 4).await,
        "refused uses were not counted: a higher limit has room for one more"
    );
    assert!(!take(&a, 3, T0 + 5).await);
    assert!(take(&a, 2, T0 + 10_000).await, "the next window");
}
