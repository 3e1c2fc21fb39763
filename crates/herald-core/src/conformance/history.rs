//! The history suite: the rules every [`HistoryStore`] backend keeps.
//!
//! Owns: [`run_history_suite`] and [`RecordingListener`]. Backends call the suite from their
//! tests with a factory that builds a fresh, empty store (a new database for durable
//! backends) wired to the given listener. Panics with a message naming the broken rule.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::publication::{ClientInfo, Payload, Publication, PublicationEvent, StreamPosition};
use crate::store::{
    AppendRequest, CommitListener, HistoryQuery, HistoryStore, Retention, StoreError,
};

/// Records what a store hands to its listener.
#[derive(Debug, Default)]
pub struct RecordingListener {
    pub events: Mutex<Vec<(String, u64)>>,
}

impl CommitListener for RecordingListener {
    fn committed(&self, event: Arc<PublicationEvent>) {
        self.events
            .lock()
            .push((event.channel.to_string(), event.publication.offset));
    }
}

const KEEP: Retention = Retention {
    size: 1000,
    ttl: Duration::from_secs(3600),
};

fn publication(data: &str) -> Publication {
    Publication {
        offset: 0,
        time_ms: crate::time::now_ms(),
        data: Payload::Json(Bytes::from(data.to_owned())),
        tags: BTreeMap::new(),
        info: None,
    }
}

fn request(channel: &str, data: &str, retention: Retention) -> AppendRequest {
    AppendRequest {
        channel: Arc::from(channel),
        publication: publication(data),
        retention,
        idempotency: None,
    }
}

async fn append(
    store: &dyn HistoryStore,
    channel: &str,
    data: &str,
    retention: Retention,
) -> StreamPosition {
    store
        .append(request(channel, data, retention))
        .await
        .expect("append must succeed")
        .position
}

async fn read(
    store: &dyn HistoryStore,
    channel: &str,
    query: HistoryQuery,
) -> (Vec<u64>, StreamPosition) {
    let page = store.read(channel, query).await.expect("read must succeed");
    (
        page.publications.iter().map(|p| p.offset).collect(),
        page.position,
    )
}

fn all() -> HistoryQuery {
    HistoryQuery::default()
}

/// Runs every rule against fresh stores from `factory`.
pub async fn run_history_suite<F, Fut>(factory: F)
where
    F: Fn(Arc<dyn CommitListener>) -> Fut,
    Fut: Future<Output = Result<Arc<dyn HistoryStore>, StoreError>>,
{
    let fresh = || async {
        let listener = Arc::new(RecordingListener::default());
        let store = factory(listener.clone())
            .await
            .expect("factory must build a store");
        (store, listener)
    };

    // Offsets are contiguous from 1 under concurrency, and the listener sees them in order.
    {
        let (store, listener) = fresh().await;
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                append(&*store, "c:a", &format!("{i}"), KEEP).await.offset
            }));
        }
        let mut offsets = Vec::new();
        for task in tasks {
            offsets.push(task.await.expect("task"));
        }
        offsets.sort_unstable();
        assert_eq!(
            offsets,
            (1..=200).collect::<Vec<_>>(),
            "offsets must be contiguous from 1"
        );
        let seen: Vec<u64> = listener
            .events
            .lock()
            .iter()
            .filter(|(c, _)| c == "c:a")
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(
            seen,
            (1..=200).collect::<Vec<_>>(),
            "listener must see offsets in order, once each"
        );
        let other = append(&*store, "c:b", "x", KEEP).await;
        assert_eq!(other.offset, 1, "channels have independent offsets");
    }

    // Epochs: stable for a stream, visible before the first append, new for a new store.
    {
        let (store, _) = fresh().await;
        let (_, empty) = read(&*store, "e", all()).await;
        assert_eq!(empty.offset, 0, "an unknown channel is at offset 0");
        assert!(
            !empty.epoch.is_empty(),
            "an unknown channel still has an epoch"
        );
        let (_, again) = read(&*store, "e", all()).await;
        assert_eq!(
            empty.epoch, again.epoch,
            "reading must not change the epoch"
        );
        let first = append(&*store, "e", "1", KEEP).await;
        assert_eq!(
            first.epoch, empty.epoch,
            "the first append keeps the epoch readers saw"
        );
        let (other_store, _) = fresh().await;
        let (_, other) = read(&*other_store, "e", all()).await;
        assert_ne!(
            other.epoch, first.epoch,
            "a reset stream must report a new epoch"
        );
    }

    // Retention by size.
    {
        let (store, _) = fresh().await;
        let small = Retention {
            size: 3,
            ttl: Duration::from_secs(3600),
        };
        for i in 0..10 {
            append(&*store, "s", &format!("{i}"), small).await;
        }
        let (offsets, top) = read(&*store, "s", all()).await;
        assert_eq!(offsets, vec![8, 9, 10], "size retention keeps the newest");
        assert_eq!(top.offset, 10);
    }

    // Retention by TTL: expired publications disappear, the offset stays.
    {
        let (store, _) = fresh().await;
        let short = Retention {
            size: 100,
            ttl: Duration::from_millis(300),
        };
        for i in 0..3 {
            append(&*store, "t", &format!("{i}"), short).await;
        }
        assert_eq!(read(&*store, "t", all()).await.0.len(), 3);
        tokio::time::sleep(Duration::from_millis(450)).await;
        let (offsets, top) = read(&*store, "t", all()).await;
        assert!(
            offsets.is_empty(),
            "TTL must expire publications, got {offsets:?}"
        );
        assert_eq!(top.offset, 3, "expiry keeps the top offset");
        assert_eq!(
            append(&*store, "t", "next", short).await.offset,
            4,
            "offsets continue after expiry"
        );
    }

    // Paging forwards and backwards from a position.
    {
        let (store, _) = fresh().await;
        for i in 0..10 {
            append(&*store, "p", &format!("{i}"), KEEP).await;
        }
        let (_, top) = read(&*store, "p", all()).await;
        let at = |offset: u64| Some(StreamPosition::new(offset, top.epoch.clone()));
        let q = |since, limit, reverse| HistoryQuery {
            since,
            limit,
            reverse,
        };
        assert_eq!(
            read(&*store, "p", q(None, Some(3), false)).await.0,
            vec![1, 2, 3]
        );
        assert_eq!(
            read(&*store, "p", q(None, Some(3), true)).await.0,
            vec![10, 9, 8]
        );
        assert_eq!(
            read(&*store, "p", q(at(4), Some(3), false)).await.0,
            vec![5, 6, 7]
        );
        assert_eq!(
            read(&*store, "p", q(at(4), None, true)).await.0,
            vec![3, 2, 1]
        );
        assert_eq!(
            read(&*store, "p", q(at(10), None, false)).await.0,
            Vec::<u64>::new()
        );
        assert_eq!(
            read(&*store, "p", q(None, Some(0), false)).await.0,
            Vec::<u64>::new(),
            "limit 0 = position only"
        );
        let no_epoch = Some(StreamPosition::new(8, ""));
        assert_eq!(
            read(&*store, "p", q(no_epoch, None, false)).await.0,
            vec![9, 10],
            "empty epoch is not checked"
        );

        let page = store
            .read("p", q(at(0), Some(1), false))
            .await
            .expect("read");
        let first = &page.publications[0];
        assert_eq!(
            first.data,
            Payload::Json(Bytes::from_static(b"0")),
            "data round-trips"
        );

        let stale = Some(StreamPosition::new(4, "not-the-epoch"));
        assert!(
            matches!(
                store.read("p", q(stale, None, false)).await,
                Err(StoreError::UnrecoverablePosition(_))
            ),
            "a stale epoch is unrecoverable"
        );
        assert!(
            matches!(
                store.read("p", q(at(11), None, false)).await,
                Err(StoreError::UnrecoverablePosition(_))
            ),
            "an offset from the future is unrecoverable"
        );
    }

    // Idempotency window.
    {
        let (store, listener) = fresh().await;
        let keyed = |channel: &str, key: &str, window_ms: u64| AppendRequest {
            idempotency: Some((key.to_owned(), Duration::from_millis(window_ms))),
            ..request(channel, "\"k\"", KEEP)
        };
        let first = store.append(keyed("i", "k1", 400)).await.expect("append");
        assert!(!first.duplicate);
        let again = store.append(keyed("i", "k1", 400)).await.expect("append");
        assert!(
            again.duplicate,
            "a repeated key inside the window is a duplicate"
        );
        assert_eq!(
            again.position, first.position,
            "a duplicate returns the first result"
        );
        assert_eq!(
            read(&*store, "i", all()).await.0,
            vec![1],
            "a duplicate stores nothing"
        );
        assert_eq!(
            listener.events.lock().len(),
            1,
            "a duplicate is not fanned out"
        );
        let elsewhere = store.append(keyed("j", "k1", 400)).await.expect("append");
        assert!(!elsewhere.duplicate, "keys are per channel");
        tokio::time::sleep(Duration::from_millis(550)).await;
        let later = store.append(keyed("i", "k1", 400)).await.expect("append");
        assert!(!later.duplicate, "a key is forgotten after its window");
        assert_eq!(later.position.offset, 2);
    }

    // Remove keeps offset and epoch; payload kinds, tags and info round-trip.
    {
        let (store, _) = fresh().await;
        let mut tags = BTreeMap::new();
        tags.insert("kind".to_owned(), "bin".to_owned());
        let info = ClientInfo {
            client: "c1".into(),
            user: "alice".into(),
            conn_info: serde_json::value::RawValue::from_string("{\"a\":1}".into()).ok(),
            chan_info: None,
        };
        let binary = Publication {
            data: Payload::Binary(Bytes::from_static(&[0, 159, 146, 150])),
            tags: tags.clone(),
            info: Some(Arc::new(info.clone())),
            ..publication("null")
        };
        let first = store
            .append(AppendRequest {
                publication: binary,
                ..request("r", "", KEEP)
            })
            .await
            .expect("append");
        let page = store.read("r", all()).await.expect("read");
        assert_eq!(
            page.publications[0].data,
            Payload::Binary(Bytes::from_static(&[0, 159, 146, 150]))
        );
        assert_eq!(page.publications[0].tags, tags);
        assert_eq!(page.publications[0].info.as_deref(), Some(&info));
        store.remove("r").await.expect("remove");
        let (offsets, top) = read(&*store, "r", all()).await;
        assert!(offsets.is_empty(), "remove deletes publications");
        assert_eq!(top, first.position, "remove keeps offset and epoch");
        assert_eq!(append(&*store, "r", "1", KEEP).await.offset, 2);
        store.flush().await.expect("flush");
    }
}
