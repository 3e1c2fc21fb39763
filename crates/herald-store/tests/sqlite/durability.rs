//! What the conformance suite cannot see: state surviving a reopen, opening failures,
//! writer failures, batching across many channels, pruning and shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::conformance::RecordingListener;
use herald_core::publication::StreamPosition;
use herald_core::store::{HistoryQuery, HistoryStore, Retention, StoreError};
use herald_store::sqlite::{SqliteConfig, SqliteHistoryStore};

use crate::common::{config, keyed, listener, request};

fn offsets(page: &herald_core::store::HistoryPage) -> Vec<u64> {
    page.publications.iter().map(|p| p.offset).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let epoch = {
        let store = SqliteHistoryStore::open(&config(&dir), listener()).expect("open");
        for i in 1..=100 {
            let appended = store
                .append(request("persist", &format!("{i}")))
                .await
                .expect("append");
            assert_eq!(appended.position.offset, i);
        }
        store.default_epoch().to_owned()
    };

    let recorder = listener();
    let store = SqliteHistoryStore::open(&config(&dir), recorder.clone()).expect("reopen");
    assert_eq!(
        store.default_epoch(),
        epoch,
        "reopening keeps the database's epoch"
    );
    let page = store
        .read("persist", HistoryQuery::default())
        .await
        .expect("read");
    assert_eq!(page.position, StreamPosition::new(100, epoch.clone()));
    assert_eq!(offsets(&page), (1..=100).collect::<Vec<_>>());
    for (i, publication) in page.publications.iter().enumerate() {
        assert_eq!(
            publication.data.bytes().as_ref(),
            format!("{}", i + 1).as_bytes()
        );
    }
    let next = store
        .append(request("persist", "101"))
        .await
        .expect("append");
    assert_eq!(next.position, StreamPosition::new(101, epoch));
    assert_eq!(*recorder.events.lock(), vec![("persist".to_owned(), 101)]);
}

#[tokio::test]
async fn idempotency_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let window = Duration::from_secs(600);
    let first = {
        let store = SqliteHistoryStore::open(&config(&dir), listener()).expect("open");
        store
            .append(keyed("idem", "1", "order-42", window))
            .await
            .expect("append")
    };
    let recorder = listener();
    let store = SqliteHistoryStore::open(&config(&dir), recorder.clone()).expect("reopen");
    let again = store
        .append(keyed("idem", "1", "order-42", window))
        .await
        .expect("append");
    assert!(
        again.duplicate,
        "a key stored before the restart is still a duplicate"
    );
    assert_eq!(again.position, first.position);
    assert!(
        recorder.events.lock().is_empty(),
        "a duplicate is not fanned out"
    );
    let page = store
        .read("idem", HistoryQuery::default())
        .await
        .expect("read");
    assert_eq!(offsets(&page), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_keys_in_one_batch_store_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = listener();
    let store = Arc::new(SqliteHistoryStore::open(&config(&dir), recorder.clone()).expect("open"));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append(keyed("same", "x", "k", Duration::from_secs(60)))
                    .await
                    .expect("append")
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task"));
    }
    assert_eq!(
        results.iter().filter(|r| !r.duplicate).count(),
        1,
        "exactly one append stores"
    );
    assert!(results.iter().all(|r| r.position.offset == 1));
    assert_eq!(recorder.events.lock().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_batches_keep_every_channel_contiguous_and_ordered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = listener();
    let config = SqliteConfig {
        max_batch: 7,
        ..config(&dir)
    };
    let store = Arc::new(SqliteHistoryStore::open(&config, recorder.clone()).expect("open"));
    let channels = ["a", "b", "c", "d"];
    let mut tasks = Vec::new();
    for i in 0..400 {
        let store = store.clone();
        let channel = channels[i % channels.len()];
        tasks.push(tokio::spawn(async move {
            store.append(request(channel, "1")).await.expect("append")
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let events = recorder.events.lock().clone();
    for channel in channels {
        let seen: Vec<u64> = events
            .iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(
            seen,
            (1..=100).collect::<Vec<_>>(),
            "channel {channel} in order, once each"
        );
        let page = store
            .read(channel, HistoryQuery::default())
            .await
            .expect("read");
        assert_eq!(offsets(&page), (1..=100).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn size_retention_applies_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = Retention {
        size: 5,
        ttl: Duration::from_secs(3600),
    };
    for round in 0..2 {
        let store = SqliteHistoryStore::open(&config(&dir), listener()).expect("open");
        for _ in 0..10 {
            let mut req = request("trim", "1");
            req.retention = small;
            store.append(req).await.expect("append");
        }
        let page = store
            .read("trim", HistoryQuery::default())
            .await
            .expect("read");
        let top = 10 * (round + 1);
        assert_eq!(offsets(&page), (top - 4..=top).collect::<Vec<_>>());
    }
}

#[test]
fn data_dir_under_a_regular_file_is_refused_with_its_path() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let data_dir = file.path().join("sub");
    let error =
        SqliteHistoryStore::open(&SqliteConfig::new(&data_dir), listener()).expect_err("must fail");
    let message = error.to_string();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    assert!(
        message.contains(&data_dir.display().to_string()),
        "message names the path: {message}"
    );
    assert!(message.contains("data directory"), "{message}");
}

#[test]
fn invalid_config_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SqliteConfig {
        readers: 0,
        ..config(&dir)
    };
    let error = SqliteHistoryStore::open(&config, listener()).expect_err("must fail");
    assert!(error.to_string().contains("readers"), "{error}");
}

#[test]
fn a_data_dir_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = SqliteHistoryStore::open(&config(&dir), listener()).expect("open");
    let error =
        SqliteHistoryStore::open(&config(&dir), listener()).expect_err("second open must fail");
    assert!(error.to_string().contains("in use"), "{error}");
    drop(_first);
    SqliteHistoryStore::open(&config(&dir), listener()).expect("open after the first is dropped");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&dir);
    drop(SqliteHistoryStore::open(&config, listener()).expect("open"));
    let conn = rusqlite::Connection::open(config.database_path()).expect("raw open");
    conn.execute(
        "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
        [],
    )
    .expect("update");
    drop(conn);
    let error = SqliteHistoryStore::open(&config, listener()).expect_err("must refuse");
    let message = error.to_string();
    assert!(message.contains("schema version 99"), "{message}");
    assert!(
        message.contains(&config.database_path().display().to_string()),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_its_callers_and_keeps_offsets_contiguous() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = listener();
    let store = SqliteHistoryStore::open(&config(&dir), recorder.clone()).expect("open");
    for _ in 0..3 {
        store.append(request("f", "1")).await.expect("append");
    }
    // Another connection holding the write lock makes the writer's BEGIN time out, the
    // nearest reproducible stand-in for a disk error.
    let blocker = rusqlite::Connection::open(dir.path().join("herald.db")).expect("raw open");
    blocker.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let failed = store.append(request("f", "lost")).await;
    assert!(matches!(failed, Err(StoreError::Backend(_))), "{failed:?}");
    blocker.execute_batch("ROLLBACK").expect("unlock");

    let next = store
        .append(request("f", "2"))
        .await
        .expect("append after recovery");
    assert_eq!(
        next.position.offset, 4,
        "a failed append consumes no offset"
    );
    let page = store
        .read("f", HistoryQuery::default())
        .await
        .expect("read");
    assert_eq!(offsets(&page), vec![1, 2, 3, 4]);
    let seen: Vec<u64> = recorder.events.lock().iter().map(|(_, o)| *o).collect();
    assert_eq!(
        seen,
        vec![1, 2, 3, 4],
        "nothing from the failed batch is fanned out"
    );
}

#[tokio::test]
async fn expired_rows_are_pruned_from_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SqliteConfig {
        prune_interval: Duration::from_millis(50),
        ..config(&dir)
    };
    let store = SqliteHistoryStore::open(&config, listener()).expect("open");
    for i in 0..5 {
        let mut req = keyed("ttl", "1", &format!("k{i}"), Duration::from_millis(1));
        req.retention = Retention {
            size: 100,
            ttl: Duration::from_millis(1),
        };
        store.append(req).await.expect("append");
    }
    let conn = rusqlite::Connection::open(config.database_path()).expect("raw open");
    let count = |table: &str| -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .expect("count")
    };
    // Polled with a generous deadline: this checks that pruning happens, not how fast.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (count("publications") > 0 || count("idempotency") > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count("publications"), 0, "expired publications are deleted");
    assert_eq!(
        count("idempotency"),
        0,
        "expired idempotency keys are deleted"
    );
    let page = store
        .read("ttl", HistoryQuery::default())
        .await
        .expect("read");
    assert_eq!(page.position.offset, 5, "pruning keeps the top offset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_commits_queued_work_then_refuses_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = Arc::new(RecordingListener::default());
    let store = Arc::new(SqliteHistoryStore::open(&config(&dir), recorder.clone()).expect("open"));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.append(request("bye", "1")).await })
        })
        .collect();
    // Close while appends are still arriving: each one either committed or was refused.
    let closer = store.clone();
    tokio::task::spawn_blocking(move || closer.close())
        .await
        .expect("close");
    let mut stored = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => stored += 1,
            Err(error) => assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}"),
        }
    }
    assert!(matches!(
        store.append(request("bye", "1")).await,
        Err(StoreError::Unavailable(_))
    ));
    store
        .flush()
        .await
        .expect("flush after close has nothing to wait for");
    let page = store
        .read("bye", HistoryQuery::default())
        .await
        .expect("reads work after close");
    assert_eq!(
        page.publications.len(),
        stored,
        "every acknowledged append is stored"
    );
    assert_eq!(recorder.events.lock().len(), stored, "and fanned out");
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_inside_a_batch_rolls_back_all_of_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = listener();
    let store = Arc::new(SqliteHistoryStore::open(&config(&dir), recorder.clone()).expect("open"));
    store.append(request("f", "1")).await.expect("append");
    // A trigger makes one particular insert fail after others in its batch succeeded: the
    // rollback must undo them all, including a brand-new channel's stream row.
    let conn = rusqlite::Connection::open(dir.path().join("herald.db")).expect("raw open");
    conn.execute_batch(
        "CREATE TRIGGER inject BEFORE INSERT ON publications WHEN NEW.data = CAST('\"lost\"' AS BLOB)
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .expect("trigger");
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = store.clone();
            let channel = if i % 2 == 0 { "f" } else { "g" };
            let data = if i == 21 { "\"lost\"" } else { "1" };
            tokio::spawn(async move { (channel, data, store.append(request(channel, data)).await) })
        })
        .collect();
    let mut stored: Vec<(&str, u64)> = Vec::new();
    for task in tasks {
        let (channel, data, result) = task.await.expect("task");
        match result {
            Ok(appended) => {
                assert_eq!(data, "1", "the poisoned append cannot succeed");
                stored.push((channel, appended.position.offset));
            }
            Err(StoreError::Backend(message)) => assert!(message.contains("injected"), "{message}"),
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert!(stored.len() < 40, "the poisoned append failed");
    conn.execute_batch("DROP TRIGGER inject")
        .expect("drop trigger");

    for channel in ["f", "g"] {
        let mut acknowledged: Vec<u64> = stored
            .iter()
            .filter(|(c, _)| *c == channel)
            .map(|(_, o)| *o)
            .collect();
        acknowledged.sort_unstable();
        let first = if channel == "f" { 2 } else { 1 };
        let expected: Vec<u64> = (first..first + acknowledged.len() as u64).collect();
        assert_eq!(
            acknowledged, expected,
            "channel {channel}: acknowledged offsets are contiguous"
        );
        let page = store
            .read(channel, HistoryQuery::default())
            .await
            .expect("read");
        let mut history = offsets(&page);
        if channel == "f" {
            history.retain(|o| *o > 1);
        }
        assert_eq!(
            history, expected,
            "channel {channel}: history holds exactly the acknowledged"
        );
        let seen: Vec<u64> = recorder
            .events
            .lock()
            .iter()
            .filter(|(c, o)| c == channel && *o >= first)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(
            seen, expected,
            "channel {channel}: only committed publications are fanned out"
        );
        let next = store
            .append(request(channel, "1"))
            .await
            .expect("append after recovery");
        assert_eq!(
            next.position.offset,
            first + acknowledged.len() as u64,
            "no offset is skipped"
        );
        assert_eq!(next.position.epoch, store.default_epoch());
    }
}
