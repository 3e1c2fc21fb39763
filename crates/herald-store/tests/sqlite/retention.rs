//! Retention as the store lays it out on disk: size retention deletes in chunks but reads
//! never return more than `size`; the top offset survives every way publications are deleted
//! (size 0, TTL, remove), also across a reopen; and a database with another schema version is
//! refused untouched.

use std::time::{Duration, Instant};

use herald_core::store::{HistoryPage, HistoryQuery, HistoryStore, Retention};
use herald_store::sqlite::{SCHEMA_VERSION, SqliteConfig, SqliteHistoryStore};

use crate::common::{config, listener, request};

fn offsets(page: &HistoryPage) -> Vec<u64> {
    page.publications.iter().map(|p| p.offset).collect()
}

fn with_retention(channel: &str, size: u32, ttl: Duration) -> herald_core::store::AppendRequest {
    let mut req = request(channel, "1");
    req.retention = Retention { size, ttl };
    req
}

fn stored_rows(config: &SqliteConfig) -> i64 {
    let conn = rusqlite::Connection::open(config.database_path()).expect("raw open");
    conn.query_row("SELECT COUNT(*) FROM publications", [], |row| row.get(0))
        .expect("count")
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn reads_return_at_most_size_while_trimming_runs_in_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&dir);
    let store = SqliteHistoryStore::open(&config, listener()).expect("open");
    let size = 10u64;
    let mut most_stored = 0;
    for top in 1..=300u64 {
        store
            .append(with_retention("c", size as u32, HOUR))
            .await
            .expect("append");
        let page = store
            .read("c", HistoryQuery::default())
            .await
            .expect("read");
        let first = top.saturating_sub(size) + 1;
        assert_eq!(
            offsets(&page),
            (first..=top).collect::<Vec<_>>(),
            "at {top}"
        );
        let newest = store
            .read(
                "c",
                HistoryQuery {
                    limit: Some(3),
                    reverse: true,
                    ..HistoryQuery::default()
                },
            )
            .await
            .expect("read");
        assert_eq!(offsets(&newest).first(), Some(&top));
        most_stored = most_stored.max(stored_rows(&config));
    }
    assert!(
        most_stored > size as i64,
        "trimming is done in chunks, so more than size rows are stored at times"
    );
    assert!(
        most_stored <= size as i64 + 32 + 1,
        "but never more than a chunk more: {most_stored}"
    );

    // Reading from a position inside the trimmed-but-stored rows gives only the last `size`.
    let page = store
        .read(
            "c",
            HistoryQuery {
                since: Some(herald_core::publication::StreamPosition::new(250, "")),
                ..HistoryQuery::default()
            },
        )
        .await
        .expect("read");
    assert_eq!(offsets(&page), (291..=300).collect::<Vec<_>>());

    // A smaller size applies to reads from the next append on.
    store
        .append(with_retention("c", 4, HOUR))
        .await
        .expect("append");
    let page = store
        .read("c", HistoryQuery::default())
        .await
        .expect("read");
    assert_eq!(offsets(&page), vec![298, 299, 300, 301]);
    drop(store);
    let store = SqliteHistoryStore::open(&config, listener()).expect("reopen");
    let page = store
        .read("c", HistoryQuery::default())
        .await
        .expect("read");
    assert_eq!(
        offsets(&page),
        vec![298, 299, 300, 301],
        "the size of the last append survives a reopen"
    );
}

#[tokio::test]
async fn size_zero_keeps_nothing_but_the_top() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&dir);
    {
        let store = SqliteHistoryStore::open(&config, listener()).expect("open");
        for _ in 0..100 {
            store
                .append(with_retention("z", 0, HOUR))
                .await
                .expect("append");
        }
        let page = store
            .read("z", HistoryQuery::default())
            .await
            .expect("read");
        assert!(page.publications.is_empty());
        assert_eq!(page.position.offset, 100);
    }
    assert!(stored_rows(&config) <= 33, "size 0 trims in chunks too");
    let store = SqliteHistoryStore::open(&config, listener()).expect("reopen");
    let page = store
        .read("z", HistoryQuery::default())
        .await
        .expect("read");
    assert_eq!(page.position.offset, 100);
    let next = store
        .append(with_retention("z", 0, HOUR))
        .await
        .expect("append");
    assert_eq!(next.position.offset, 101);
}

#[tokio::test]
async fn the_top_survives_expiry_and_remove_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SqliteConfig {
        prune_interval: Duration::from_millis(20),
        ..config(&dir)
    };
    {
        let store = SqliteHistoryStore::open(&config, listener()).expect("open");
        for _ in 0..7 {
            store
                .append(with_retention("ttl", 100, Duration::from_millis(1)))
                .await
                .expect("append");
        }
        for _ in 0..5 {
            store
                .append(with_retention("gone", 100, HOUR))
                .await
                .expect("append");
        }
        store.remove("gone").await.expect("remove");
        // Polled with a generous deadline: this checks that pruning happens, not how fast.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stored_rows(&config) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            stored_rows(&config),
            0,
            "expired and removed rows are deleted"
        );
    }
    let store = SqliteHistoryStore::open(&config, listener()).expect("reopen");
    for (channel, top) in [("ttl", 7), ("gone", 5)] {
        let page = store
            .read(channel, HistoryQuery::default())
            .await
            .expect("read");
        assert!(page.publications.is_empty());
        assert_eq!(page.position.offset, top, "{channel}: the top stays");
        let next = store
            .append(with_retention(channel, 100, HOUR))
            .await
            .expect("append");
        assert_eq!(next.position.offset, top + 1, "{channel}: offsets continue");
    }
}

#[tokio::test]
async fn expiry_is_pruned_per_stream_from_the_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SqliteConfig {
        prune_interval: Duration::from_millis(20),
        ..config(&dir)
    };
    let store = SqliteHistoryStore::open(&config, listener()).expect("open");
    // Old, short-lived publications, then long-lived ones on the same stream.
    for _ in 0..50 {
        store
            .append(with_retention("mixed", 1000, Duration::from_millis(1)))
            .await
            .expect("append");
    }
    for _ in 0..10 {
        store
            .append(with_retention("mixed", 1000, HOUR))
            .await
            .expect("append");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_rows(&config) > 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored_rows(&config), 10, "the expired head is deleted");
    let page = store
        .read("mixed", HistoryQuery::default())
        .await
        .expect("read");
    assert_eq!(offsets(&page), (51..=60).collect::<Vec<_>>());
}

#[test]
fn an_older_schema_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&dir);
    drop(SqliteHistoryStore::open(&config, listener()).expect("open"));
    let conn = rusqlite::Connection::open(config.database_path()).expect("raw open");
    conn.execute(
        "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
        [],
    )
    .expect("update");
    let tables = |conn: &rusqlite::Connection| -> Vec<String> {
        conn.prepare("SELECT sql FROM sqlite_schema ORDER BY name")
            .expect("prepare")
            .query_map([], |row| row.get::<_, Option<String>>(0))
            .expect("query")
            .map(|sql| sql.expect("row").unwrap_or_default())
            .collect()
    };
    let before = tables(&conn);
    drop(conn);
    let error = SqliteHistoryStore::open(&config, listener()).expect_err("must refuse");
    let message = error.to_string();
    assert!(message.contains("schema version 1"), "{message}");
    assert!(message.contains("older"), "{message}");
    assert!(
        message.contains(&format!("version {SCHEMA_VERSION}")),
        "{message}"
    );
    assert!(
        message.contains(&config.database_path().display().to_string()),
        "{message}"
    );
    let conn = rusqlite::Connection::open(config.database_path()).expect("raw open");
    assert_eq!(tables(&conn), before, "the refused database is not changed");
}
