//! The SQLite device registry and outbound queue (`outbound.db`): the shared conformance
//! suites under both sync policies and on a single-threaded runtime, and what the suites
//! cannot see: state surviving a reopen, leases surviving a restart, closing, and refusing a
//! database from a newer Herald.
//!
//! May touch: temporary directories only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_core::conformance::{run_device_suite, run_outbound_suite, run_webhook_store_suite};
use herald_core::device::{
    DeviceError, DeviceFilter, DeviceRegistration, DeviceStore, PageRequest, Platform, Provider,
};
use herald_core::outbound::{
    Finished, JobState, NewJob, OutboundQueue, Outcome, QueueError, StatusFilter,
};
use herald_store::sqlite::{
    OUTBOUND_FILE, OUTBOUND_SCHEMA_VERSION, OpenError, OutboundDb, SyncPolicy,
};
use parking_lot::Mutex;
use tempfile::TempDir;

/// Temporary directories of one test, removed when it ends (after the suites dropped their
/// stores).
#[derive(Default, Clone)]
struct Dirs(Arc<Mutex<Vec<TempDir>>>);

impl Dirs {
    fn open(&self, sync: SyncPolicy) -> Result<OutboundDb, OpenError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = OutboundDb::open_dir(dir.path(), sync)?;
        self.0.lock().push(dir);
        Ok(db)
    }
}

async fn suites(sync: SyncPolicy) {
    let dirs = Dirs::default();
    run_device_suite(|| {
        let dirs = dirs.clone();
        async move {
            let db = dirs
                .open(sync)
                .map_err(|e| DeviceError::Unavailable(e.to_string()))?;
            Ok(db.devices())
        }
    })
    .await;
    run_outbound_suite(|| {
        let dirs = dirs.clone();
        async move {
            let db = dirs
                .open(sync)
                .map_err(|e| QueueError::Unavailable(e.to_string()))?;
            Ok(db.queue())
        }
    })
    .await;
    run_webhook_store_suite(|| {
        let dirs = dirs.clone();
        async move {
            let db = dirs.open(sync).expect("open outbound.db");
            std::sync::Arc::new(db.webhooks())
                as std::sync::Arc<dyn herald_core::webhook_store::WebhookStore>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_outbound_normal_sync_passes_conformance() {
    suites(SyncPolicy::Normal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_outbound_full_sync_passes_conformance() {
    suites(SyncPolicy::Full).await;
}

#[tokio::test(flavor = "current_thread")]
async fn sqlite_outbound_passes_conformance_on_a_single_threaded_runtime() {
    suites(SyncPolicy::Normal).await;
}

const T0: u64 = 1_700_000_000_000;
const LEASE: Duration = Duration::from_secs(30);

fn job(id: &str, not_before: u64) -> NewJob {
    NewJob {
        id: id.to_owned(),
        kind: "push.fcm".to_owned(),
        group: "push-1".to_owned(),
        recipient: format!("device-{id}"),
        payload: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
        not_before,
        expire_at: None,
        order_key: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_devices_and_leases_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let device_id = {
        let db = OutboundDb::open_dir(dir.path(), SyncPolicy::Normal).expect("open");
        let queue = db.queue();
        let jobs = (0..100).map(|i| job(&format!("j{i:03}"), T0)).collect();
        assert_eq!(queue.enqueue(jobs).await.expect("enqueue"), 100);
        let leased = queue.claim("push.fcm", 1, LEASE, T0).await.expect("claim");
        assert_eq!(leased[0].id, "j000");
        let sent = queue.claim("push.fcm", 1, LEASE, T0).await.expect("claim");
        queue
            .finish(
                vec![Finished {
                    id: sent[0].id.clone(),
                    attempt: 1,
                    outcome: Outcome::Sent {
                        detail: "msg-1".to_owned(),
                    },
                }],
                T0 + 1,
            )
            .await
            .expect("finish");
        let device = db
            .devices()
            .register(
                DeviceRegistration {
                    provider: Some(Provider::Apns),
                    token: "apns-token".to_owned(),
                    platform: Some(Platform::Ios),
                    user: "alice".to_owned(),
                    topics: vec!["news".to_owned()],
                    ..DeviceRegistration::default()
                },
                T0,
            )
            .await
            .expect("register");
        // Dropped without close(): the last handle closes the database.
        device.id
    };

    let db = OutboundDb::open_dir(dir.path(), SyncPolicy::Normal).expect("reopen");
    let queue = db.queue();
    let all = queue
        .statuses(
            &StatusFilter::default(),
            &PageRequest {
                limit: 1000,
                include_total: true,
                ..PageRequest::default()
            },
        )
        .await
        .expect("statuses");
    assert_eq!(all.total, Some(100), "every job is still there");
    let state = |id: &str| all.items.iter().find(|s| s.id == id).map(|s| s.state);
    assert_eq!(state("j000"), Some(JobState::Sending));
    assert_eq!(state("j001"), Some(JobState::Sent));
    assert_eq!(state("j099"), Some(JobState::Queued));

    let before_lease = queue
        .claim("push.fcm", 1000, LEASE, T0 + 1_000)
        .await
        .expect("claim");
    assert_eq!(
        before_lease.len(),
        98,
        "the queued jobs, not the leased or the sent one"
    );
    assert!(before_lease.iter().all(|j| j.id != "j000"));
    let after_lease = queue
        .claim("push.fcm", 1000, LEASE, T0 + 30_000)
        .await
        .expect("claim");
    assert_eq!(
        after_lease
            .iter()
            .map(|j| (j.id.as_str(), j.attempt, j.payload.as_ref()))
            .collect::<Vec<_>>(),
        vec![("j000", 2, b"{\"id\":\"j000\"}".as_slice())],
        "the job claimed before the restart is claimable once its lease ran out"
    );

    let devices = db
        .devices()
        .list(&DeviceFilter::default(), true, &PageRequest::default())
        .await
        .expect("list");
    assert_eq!(devices.items.len(), 1);
    assert_eq!(devices.items[0].id, device_id);
    assert_eq!(devices.items[0].topics, vec!["news".to_owned()]);
}

#[tokio::test]
async fn a_closed_database_refuses_writes_and_still_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = OutboundDb::open_dir(dir.path(), SyncPolicy::Normal).expect("open");
    let queue = db.queue();
    queue.enqueue(vec![job("a", T0)]).await.expect("enqueue");
    db.close();
    db.close();
    let result = queue.enqueue(vec![job("b", T0)]).await;
    assert!(
        matches!(result, Err(QueueError::Unavailable(_))),
        "a write after close is Unavailable, got {result:?}"
    );
    let result = db
        .devices()
        .update_user_topics("u", herald_core::device::TopicOp::Add, &[])
        .await;
    assert!(
        matches!(result, Err(DeviceError::Unavailable(_))),
        "{result:?}"
    );
    let due = queue.due(T0).await.expect("reads still work");
    assert_eq!(due, vec![("push.fcm".to_owned(), 1)]);
}

/// A version-1 database (before webhooks) is migrated forward, its jobs kept.
#[tokio::test]
async fn a_version_1_database_is_migrated_with_its_jobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = OutboundDb::open_dir(dir.path(), SyncPolicy::Normal).expect("create");
        db.queue()
            .enqueue(vec![job("kept", T0)])
            .await
            .expect("enqueue");
        db.close();
    }
    let path = dir.path().join(OUTBOUND_FILE);
    {
        let conn = rusqlite::Connection::open(&path).expect("raw open");
        conn.execute_batch(
            "DROP TABLE webhook_documents; DROP TABLE webhook_attempts;
             UPDATE meta SET value = '1' WHERE key = 'schema_version';",
        )
        .expect("make it version 1");
    }
    let db = OutboundDb::open_dir(dir.path(), SyncPolicy::Normal).expect("migrate");
    assert_eq!(db.queue().due(T0).await.expect("due").len(), 1, "jobs kept");
    use herald_core::webhook_store::WebhookStore;
    db.webhooks()
        .put_document("endpoints", "e", bytes::Bytes::from_static(b"{}"))
        .await
        .expect("webhook tables exist");
    drop(db);
    let conn = rusqlite::Connection::open(&path).expect("raw open");
    let version: String = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .expect("version");
    assert_eq!(version, OUTBOUND_SCHEMA_VERSION.to_string());
}

#[tokio::test]
async fn a_database_from_a_newer_herald_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(OutboundDb::open_dir(dir.path(), SyncPolicy::Normal).expect("create"));
    let path = dir.path().join(OUTBOUND_FILE);
    {
        let conn = rusqlite::Connection::open(&path).expect("raw open");
        conn.execute(
            "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
            [],
        )
        .expect("bump version");
    }
    let error = OutboundDb::open_dir(dir.path(), SyncPolicy::Normal).expect_err("newer schema");
    assert!(
        matches!(error, OpenError::NewerSchema { found: 99, .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );
}

/// Calls from many tasks are group-committed together; one that fails inside the writer
/// (an unknown device id) is rolled back alone and every caller gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_fail_alone_and_all_get_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = OutboundDb::open_dir(dir.path(), SyncPolicy::Full).expect("open");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (queue, devices) = (db.queue(), db.devices());
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let id = format!("t{t}-{i}");
                let (enqueued, registered, rate) = tokio::join!(
                    queue.enqueue(vec![job(&id, T0)]),
                    devices.register(
                        DeviceRegistration {
                            id: Some(format!("missing-{id}")),
                            ..DeviceRegistration::default()
                        },
                        T0,
                    ),
                    queue.take_rate(&id, 1, LEASE, T0),
                );
                assert_eq!(enqueued.expect("enqueue"), 1);
                assert!(
                    matches!(registered, Err(DeviceError::NotFound(_))),
                    "{registered:?}"
                );
                assert!(rate.expect("rate"));
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let due = db.queue().due(T0).await.expect("due");
    assert_eq!(due, vec![("push.fcm".to_owned(), 400)]);
}
