//! The push pipeline end to end on the in-memory queue and registry: `PushService::send` →
//! the fan-out worker → the delivery workers → a provider. The provider here is a scripted
//! sender that records what it was asked to send and answers as told (the real senders are
//! tested against the emulators and real servers in their own test files); what is under test
//! is what the pipeline does with each answer.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::device::{
    DeviceFilter, DeviceRegistration, DeviceStore, PageRequest, Platform, Provider,
};
use herald_core::memory_devices::MemoryDeviceStore;
use herald_core::memory_outbound::MemoryOutboundQueue;
use herald_core::outbound::{
    JobState, JobStatus, MemberFinished, OutboundQueue, Outcome, StatusFilter,
};
use herald_core::time::now_ms;
use herald_outbound::push::batch::{Batch, BatchHandler, Member, batch_jobs, batch_kind};
use herald_outbound::push::deliver::DeliveryHandler;
use herald_outbound::push::fanout::FanoutHandler;
use herald_outbound::push::request::{
    LimitStrategy, PushNotification, PushRecipient, RateLimit, RatePolicy, RecipientFilter,
};
use herald_outbound::push::{FANOUT_KIND, PushService, PushStats, SendPush, delivery_kind};
use herald_outbound::sender::{
    ApnsNotification, Destination, EmailNotification, SendError, Sender, Sent, Target,
};
use herald_outbound::worker::{
    Backoff, JobHandler, JobResult, Retry, Wakeup, WorkerConfig, run_worker,
};
use parking_lot::Mutex;
use tokio::sync::watch;

/// Records every send; answers from a script per token (then `Sent`).
#[derive(Default)]
struct ScriptedSender {
    sent: Mutex<Vec<(String, serde_json::Value)>>,
    script: Mutex<BTreeMap<String, VecDeque<SendError>>>,
}

impl ScriptedSender {
    fn answer(&self, token: &str, error: SendError) {
        self.script
            .lock()
            .entry(token.to_string())
            .or_default()
            .push_back(error);
    }

    fn sent_to(&self) -> Vec<String> {
        let mut tokens: Vec<String> = self.sent.lock().iter().map(|(t, _)| t.clone()).collect();
        tokens.sort();
        tokens
    }
}

#[async_trait]
impl Sender for ScriptedSender {
    type Notification = serde_json::Value;

    async fn send(
        &self,
        target: &Target,
        notification: &serde_json::Value,
    ) -> Result<Sent, SendError> {
        let Destination::Token(token) = &target.to else {
            return Err(SendError::Rejected {
                reason: "token only".into(),
            });
        };
        if let Some(error) = self
            .script
            .lock()
            .get_mut(token)
            .and_then(VecDeque::pop_front)
        {
            return Err(error);
        }
        self.sent.lock().push((token.clone(), notification.clone()));
        Ok(Sent {
            message_id: format!("id-{token}"),
        })
    }
}

struct Pipeline {
    service: PushService,
    queue: Arc<MemoryOutboundQueue>,
    devices: Arc<MemoryDeviceStore>,
    apns: Arc<ScriptedSender>,
    email: Arc<ScriptedSender>,
    stop: watch::Sender<bool>,
}

impl Pipeline {
    fn start() -> Self {
        let queue = Arc::new(MemoryOutboundQueue::new());
        let devices = Arc::new(MemoryDeviceStore::new());
        let wakeup = Arc::new(Wakeup::default());
        let stats = Arc::new(PushStats::default());
        let service = PushService::new(
            queue.clone(),
            devices.clone(),
            wakeup.clone(),
            stats.clone(),
        );
        let apns = Arc::new(ScriptedSender::default());
        let email = Arc::new(ScriptedSender::default());
        let (stop, _) = watch::channel(false);
        let config = |kind: &str| WorkerConfig {
            kind: kind.to_string(),
            concurrency: 8,
            batch: 16,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(20),
            retry: Backoff {
                base: Duration::from_millis(20),
                max: Duration::from_millis(100),
                attempts: 3,
            }
            .into(),
        };
        let fanout: Arc<dyn JobHandler> = Arc::new(FanoutHandler {
            queue: queue.clone(),
            devices: devices.clone(),
            wakeup: wakeup.clone(),
            // Small batches, so fan-outs to a few devices go through batches too.
            batch_size: 2,
        });
        let mut workers: Vec<(Arc<dyn JobHandler>, WorkerConfig)> =
            vec![(fanout, config(FANOUT_KIND))];
        for (provider, sender) in [
            (Provider::Apns, apns.clone()),
            (Provider::Email, email.clone()),
        ] {
            let handler = Arc::new(DeliveryHandler {
                provider,
                sender: Some(sender),
                devices: devices.clone(),
                stats: stats.clone(),
                events: None,
                slots: None,
            });
            let batches: Arc<dyn JobHandler> = Arc::new(BatchHandler {
                queue: queue.clone(),
                delivery: handler.clone(),
                retry: config(delivery_kind(provider)).retry,
            });
            workers.push((batches, config(batch_kind(provider))));
            workers.push((handler, config(delivery_kind(provider))));
        }
        for (handler, config) in workers {
            let mut rx = stop.subscribe();
            tokio::spawn(run_worker(
                queue.clone(),
                handler,
                config,
                wakeup.clone(),
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            ));
        }
        Self {
            service,
            queue,
            devices,
            apns,
            email,
            stop,
        }
    }

    async fn device(&self, provider: Provider, token: &str, user: &str) -> String {
        let registration = DeviceRegistration {
            provider: Some(provider),
            token: token.into(),
            platform: Some(Platform::Ios),
            user: user.into(),
            ..DeviceRegistration::default()
        };
        self.devices
            .register(registration, now_ms())
            .await
            .expect("register")
            .id
    }

    async fn statuses(&self, uid: &str) -> Vec<JobStatus> {
        let filter = StatusFilter {
            group: uid.into(),
            ..StatusFilter::default()
        };
        self.queue
            .statuses(
                &filter,
                &PageRequest {
                    limit: 1000,
                    ..PageRequest::default()
                },
            )
            .await
            .expect("statuses")
            .items
    }

    /// Waits until every delivery of `uid` is final and returns them (fan-out excluded).
    async fn settled(&self, uid: &str) -> Vec<JobStatus> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let all = self.statuses(uid).await;
            // No push.fanout entry: the request was expanded when it was accepted. Batches
            // (`push.<provider>.batch`) stand for deliveries, which have statuses of their own.
            let is_delivery = |s: &JobStatus| s.kind != FANOUT_KIND && !s.kind.ends_with(".batch");
            let fanout_done = all
                .iter()
                .filter(|s| !is_delivery(s))
                .all(|s| s.state.is_final());
            let deliveries: Vec<JobStatus> = all.into_iter().filter(is_delivery).collect();
            if fanout_done && deliveries.iter().all(|s| s.state.is_final()) {
                return deliveries;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "push {uid} did not settle: {deliveries:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn to_users(users: &[&str], uid: &str) -> SendPush {
    SendPush {
        recipient: PushRecipient {
            filter: Some(RecipientFilter {
                users: users.iter().map(|u| u.to_string()).collect(),
                ..RecipientFilter::default()
            }),
            ..PushRecipient::default()
        },
        notification: PushNotification {
            apns: Some(ApnsNotification {
                headers: BTreeMap::new(),
                payload: serde_json::json!({"aps": {"alert": "hi"}}),
            }),
            email: Some(EmailNotification {
                subject: "hi".into(),
                text: "hello".into(),
                html: None,
            }),
            ..PushNotification::default()
        },
        uid: Some(uid.into()),
        ..SendPush::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_reaches_every_device_of_its_users_once_even_when_sent_again() {
    let p = Pipeline::start();
    p.device(Provider::Apns, "a1", "alice").await;
    p.device(Provider::Apns, "a2", "alice").await;
    p.device(Provider::Apns, "b1", "bob").await;
    p.device(Provider::Apns, "c1", "carol").await;
    p.service
        .send(to_users(&["alice", "bob"], "u1"))
        .await
        .expect("send");
    p.service
        .send(to_users(&["alice", "bob"], "u1"))
        .await
        .expect("send again");
    let deliveries = p.settled("u1").await;
    assert_eq!(deliveries.len(), 3, "{deliveries:?}");
    assert!(
        deliveries.iter().all(|s| s.state == JobState::Sent),
        "{deliveries:?}"
    );
    assert_eq!(p.apns.sent_to(), vec!["a1", "a2", "b1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_few_device_ids_is_expanded_when_accepted_and_sent_once() {
    let p = Pipeline::start();
    let a1 = p.device(Provider::Apns, "a1", "alice").await;
    let b1 = p.device(Provider::Apns, "b1", "bob").await;
    p.device(Provider::Apns, "c1", "carol").await;
    let mut push = to_users(&[], "ids");
    push.recipient.filter = Some(RecipientFilter {
        ids: vec![a1.clone(), b1.clone(), "no-such-device".into()],
        ..RecipientFilter::default()
    });
    p.service.send(push.clone()).await.expect("send");
    // Its deliveries are stored when `send` returns, and there is no fan-out job.
    let accepted = p.statuses("ids").await;
    let mut recipients: Vec<&str> = accepted.iter().map(|s| s.recipient.as_str()).collect();
    recipients.sort_unstable();
    let mut expected = vec![a1.as_str(), b1.as_str()];
    expected.sort_unstable();
    assert_eq!(recipients, expected, "{accepted:?}");
    assert!(
        accepted.iter().all(|s| s.kind != FANOUT_KIND),
        "{accepted:?}"
    );
    // Sent again with the same uid, before and after delivery: nothing is sent twice.
    p.service.send(push.clone()).await.expect("send again");
    let deliveries = p.settled("ids").await;
    assert!(
        deliveries.iter().all(|s| s.state == JobState::Sent),
        "{deliveries:?}"
    );
    p.service.send(push).await.expect("send after it was sent");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(p.apns.sent_to(), vec!["a1", "b1"]);

    // A scheduled push to the same ids still waits in a fan-out job.
    let mut later = to_users(&[], "ids-later");
    later.recipient.filter = Some(RecipientFilter {
        ids: vec![a1],
        ..RecipientFilter::default()
    });
    later.send_at = Some(now_ms() / 1000 + 3600);
    p.service.send(later).await.expect("send later");
    let waiting = p.statuses("ids-later").await;
    assert_eq!(
        waiting.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>(),
        vec![FANOUT_KIND],
        "{waiting:?}"
    );
    assert!(p.service.cancel("ids-later").await.expect("cancel") == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_is_the_fallback_for_users_without_another_device() {
    let p = Pipeline::start();
    p.device(Provider::Apns, "a1", "alice").await;
    p.device(Provider::Email, "alice@example.com", "alice")
        .await;
    p.device(Provider::Email, "bob@example.com", "bob").await;
    p.service
        .send(to_users(&["alice", "bob"], "u2"))
        .await
        .expect("send");
    p.settled("u2").await;
    assert_eq!(p.apns.sent_to(), vec!["a1"]);
    assert_eq!(
        p.email.sent_to(),
        vec!["bob@example.com"],
        "alice has an APNs device"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_sent_and_a_dead_token_removes_its_device() {
    let p = Pipeline::start();
    p.device(Provider::Apns, "flaky", "alice").await;
    let dead = p.device(Provider::Apns, "dead", "alice").await;
    p.device(Provider::Apns, "bad-payload", "alice").await;
    p.apns.answer(
        "flaky",
        SendError::Retry {
            reason: "503".into(),
            after: None,
        },
    );
    p.apns.answer(
        "flaky",
        SendError::Retry {
            reason: "429".into(),
            after: Some(Duration::from_millis(10)),
        },
    );
    p.apns.answer(
        "dead",
        SendError::Unregistered {
            reason: "Unregistered".into(),
            since: None,
        },
    );
    p.apns.answer(
        "bad-payload",
        SendError::Rejected {
            reason: "PayloadTooLarge".into(),
        },
    );
    p.service
        .send(to_users(&["alice"], "u3"))
        .await
        .expect("send");
    let deliveries = p.settled("u3").await;
    let by_token = |id_suffix: &str| {
        deliveries
            .iter()
            .find(|s| s.recipient == id_suffix)
            .cloned()
            .expect("status")
    };
    let flaky = deliveries
        .iter()
        .find(|s| s.state == JobState::Sent)
        .expect("sent");
    assert_eq!(flaky.attempts, 3, "two retries, then sent: {flaky:?}");
    let dead_status = by_token(&dead);
    assert_eq!(dead_status.state, JobState::Failed);
    assert!(
        dead_status.reason.contains("device removed"),
        "{dead_status:?}"
    );
    let left = p
        .devices
        .list(&DeviceFilter::default(), false, &PageRequest::default())
        .await
        .expect("list");
    assert_eq!(
        left.items.len(),
        2,
        "only the dead token's device is removed"
    );
    let removals = p
        .devices
        .removals(&PageRequest::default())
        .await
        .expect("removals");
    assert_eq!(removals.items.len(), 1);
    assert_eq!(removals.items[0].reason, "Unregistered");
    let rejected = deliveries
        .iter()
        .find(|s| s.reason.contains("PayloadTooLarge"))
        .expect("rejected");
    assert_eq!(
        (rejected.state, rejected.attempts),
        (JobState::Failed, 1),
        "never retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_max_attempts_with_the_last_reason() {
    let p = Pipeline::start();
    p.device(Provider::Apns, "down", "alice").await;
    for _ in 0..5 {
        p.apns.answer(
            "down",
            SendError::Retry {
                reason: "503 ServiceUnavailable".into(),
                after: None,
            },
        );
    }
    p.service
        .send(to_users(&["alice"], "u4"))
        .await
        .expect("send");
    let deliveries = p.settled("u4").await;
    assert_eq!(deliveries[0].state, JobState::Failed);
    assert_eq!(deliveries[0].attempts, 3);
    assert!(
        deliveries[0]
            .reason
            .contains("gave up after 3 attempts: 503"),
        "{:?}",
        deliveries[0]
    );
    assert!(p.apns.sent_to().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_push_can_be_cancelled_before_it_is_sent() {
    let p = Pipeline::start();
    p.device(Provider::Apns, "a1", "alice").await;
    let mut later = to_users(&["alice"], "u5");
    later.send_at = Some(now_ms() / 1000 + 3600);
    p.service.send(later).await.expect("send");
    assert_eq!(p.service.cancel("u5").await.expect("cancel"), 1);
    let statuses = p.statuses("u5").await;
    assert_eq!(statuses.len(), 1, "nothing expanded: {statuses:?}");
    assert_eq!(statuses[0].state, JobState::Cancelled);
    // A push sent now still goes: the cancelled one did not poison the device.
    p.service
        .send(to_users(&["alice"], "u6"))
        .await
        .expect("send");
    p.settled("u6").await;
    assert_eq!(p.apns.sent_to(), vec!["a1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_drops_pushes_over_it_when_asked() {
    let p = Pipeline::start();
    p.device(Provider::Apns, "a1", "alice").await;
    let limited = |uid: &str| {
        let mut push = to_users(&["alice"], uid);
        push.limit_strategy = Some(LimitStrategy {
            rate_limit: Some(RateLimit {
                key: Some("{user}".into()),
                policies: vec![RatePolicy {
                    rate: 1,
                    interval_ms: 3_600_000,
                }],
                drop_if_rate_limited: true,
            }),
            time_limit: None,
        });
        push
    };
    p.service.send(limited("r1")).await.expect("send");
    p.settled("r1").await;
    p.service.send(limited("r2")).await.expect("send");
    let dropped = p.settled("r2").await;
    assert!(
        dropped.is_empty(),
        "the second push in the hour is dropped: {dropped:?}"
    );
    let fanout = p.statuses("r2").await;
    assert!(fanout[0].reason.contains("1 rate limited"), "{fanout:?}");
    assert_eq!(p.apns.sent_to(), vec!["a1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_past_its_expiry_is_not_sent() {
    let p = Pipeline::start();
    p.device(Provider::Apns, "slow", "alice").await;
    for _ in 0..2 {
        p.apns.answer(
            "slow",
            SendError::Retry {
                reason: "503".into(),
                after: Some(Duration::from_secs(5)),
            },
        );
    }
    let mut push = to_users(&["alice"], "u7");
    push.notification.expire_at = Some(now_ms() / 1000 + 2);
    p.service.send(push).await.expect("send");
    let deliveries = p.settled("u7").await;
    assert_eq!(deliveries[0].state, JobState::Expired, "{deliveries:?}");
    assert!(p.apns.sent_to().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_claimed_again_sends_only_the_devices_not_yet_settled_and_hands_retries_on() {
    // What a node that died mid-batch leaves: a batch whose first member was settled.
    let queue = Arc::new(MemoryOutboundQueue::new());
    let apns = Arc::new(ScriptedSender::default());
    let delivery = Arc::new(DeliveryHandler {
        provider: Provider::Apns,
        sender: Some(apns.clone()),
        devices: Arc::new(MemoryDeviceStore::new()),
        stats: Arc::new(PushStats::default()),
        events: None,
        slots: None,
    });
    let retry: Retry = Backoff {
        base: Duration::from_millis(20),
        max: Duration::from_millis(100),
        attempts: 3,
    }
    .into();
    let handler = BatchHandler {
        queue: queue.clone(),
        delivery,
        retry,
    };
    let member = |token: &str| Member {
        id: format!("b:{token}"),
        target: Target {
            provider: Provider::Apns,
            app: String::new(),
            to: Destination::Token(token.into()),
        },
        device: None,
    };
    let batch = Batch {
        provider: Provider::Apns,
        notification: serde_json::value::RawValue::from_string(r#"{"aps":{"alert":"hi"}}"#.into())
            .expect("raw"),
        expire_at: None,
        members: vec![member("t1"), member("t2"), member("t3")],
    };
    let now = now_ms();
    let recipients = vec!["t1".into(), "t2".into(), "t3".into()];
    let (job, members) = batch_jobs("b", &batch, recipients, now).expect("batch jobs");
    assert_eq!(queue.enqueue_batch(job, members).await.expect("enqueue"), 3);
    queue
        .finish_members(
            vec![MemberFinished {
                id: "b:t1".into(),
                outcome: Outcome::Sent {
                    detail: "sent before the crash".into(),
                },
                payload: bytes::Bytes::new(),
            }],
            now,
        )
        .await
        .expect("settle t1");
    apns.answer(
        "t3",
        SendError::Retry {
            reason: "503".into(),
            after: Some(Duration::from_millis(10)),
        },
    );
    let claimed = queue
        .claim(batch_kind(Provider::Apns), 10, Duration::from_secs(30), now)
        .await
        .expect("claim the batch");
    assert_eq!(claimed.len(), 1);
    let result = handler.run(&claimed[0]).await;
    assert!(
        matches!(&result, JobResult::Done { detail } if detail.contains("1 sent, 1 to retry")),
        "{result:?}"
    );
    assert_eq!(
        apns.sent_to(),
        vec!["t2"],
        "t1 was settled before, t3 is retried"
    );

    // t3 goes on as an ordinary delivery job, with its own payload.
    let retried = queue
        .claim(
            delivery_kind(Provider::Apns),
            10,
            Duration::from_secs(30),
            now_ms() + 1_000,
        )
        .await
        .expect("claim the retry");
    assert_eq!(retried.len(), 1, "{retried:?}");
    assert_eq!(retried[0].id, "b:t3");
    assert_eq!(retried[0].attempt, 2);
    let delivery: herald_outbound::push::Delivery =
        serde_json::from_slice(&retried[0].payload).expect("a delivery payload");
    assert_eq!(delivery.target.to, Destination::Token("t3".into()));
    let filter = StatusFilter {
        group: "b".into(),
        ..StatusFilter::default()
    };
    let statuses = queue
        .statuses(&filter, &PageRequest::default())
        .await
        .expect("statuses")
        .items;
    let state = |id: &str| {
        statuses
            .iter()
            .find(|s| s.id == id)
            .map(|s| (s.state, s.reason.clone()))
    };
    assert_eq!(
        state("b:t1"),
        Some((JobState::Sent, "sent before the crash".into()))
    );
    assert_eq!(state("b:t2"), Some((JobState::Sent, "id-t2".into())));
    assert_eq!(state("b:t3").map(|s| s.0), Some(JobState::Sending));
}
