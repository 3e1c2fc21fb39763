//! The WAL stays bounded under a sustained append load, and a closed store leaves its data
//! in the database file. Checkpoints run on their own thread; these tests check what they
//! achieve (sizes), never how fast.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use herald_core::store::{HistoryQuery, HistoryStore, Retention};
use herald_store::sqlite::{SqliteHistoryStore, WAL_HARD_LIMIT_BYTES};

use crate::common::{config, listener, request};

const PRODUCERS: usize = 32;
const CHANNELS: usize = 16;
const APPENDS: usize = 112_000;
const PAYLOAD: usize = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_stays_bounded_under_sustained_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&dir);
    let wal = config.database_path().with_extension("db-wal");
    let store = Arc::new(SqliteHistoryStore::open(&config, listener()).expect("open"));
    let data = format!("\"{}\"", "x".repeat(PAYLOAD - 2));
    let written = (APPENDS * data.len()) as u64;
    assert!(
        written > WAL_HARD_LIMIT_BYTES * 3 / 2,
        "the load must outgrow the hard limit by half"
    );

    // Samples the WAL's size while the load runs: a sample can miss a peak, which makes
    // this test weaker but never flaky.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak, wal) = (done.clone(), peak.clone(), wal.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                peak.fetch_max(len, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (store, data) = (store.clone(), data.clone());
            tokio::spawn(async move {
                for i in 0..APPENDS / PRODUCERS {
                    let channel = format!("wal-{}", (p + i) % CHANNELS);
                    let mut req = request(&channel, &data);
                    req.retention = Retention {
                        size: 100,
                        ttl: Duration::from_secs(3600),
                    };
                    store.append(req).await.expect("append");
                    // Short reads now and then, as a live server has.
                    if i % 100 == 0 {
                        let page = store
                            .read(&channel, HistoryQuery::default())
                            .await
                            .expect("read");
                        assert!(page.publications.len() <= 100);
                    }
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.expect("producer");
    }
    done.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");

    let peak = peak.load(Ordering::Relaxed);
    assert!(peak > 0, "the WAL was in use");
    // The writer checks the WAL between batches every few milliseconds, so what it writes
    // in that time (a few MB at most) can land on top of the hard limit.
    let bound = WAL_HARD_LIMIT_BYTES + 8 * 1024 * 1024;
    assert!(
        peak <= bound,
        "the WAL grew to {peak} bytes ({written} bytes appended); the bound is {bound}"
    );
    let stats = store.stats();
    assert!(stats.checkpoints > 0, "{stats:?}");

    // Closing copies everything into the database file and empties the WAL; reads still
    // work and see every channel's last 100 publications.
    store.close();
    assert_eq!(
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0),
        0,
        "a closed store leaves an empty WAL"
    );
    let page = store
        .read("wal-0", HistoryQuery::default())
        .await
        .expect("read after close");
    assert_eq!(page.publications.len(), 100);
    assert_eq!(page.position.offset, (APPENDS / CHANNELS) as u64);
}
