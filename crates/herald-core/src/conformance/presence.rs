//! The presence suite: the rules a shared [`PresenceStore`] keeps, seen from two nodes.
//!
//! Owns: [`run_presence_suite`]. Cluster backends run it with the [`ClusterBackend`] they
//! give the cluster suite; a one-node store (memory) has nothing shared to check.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::presence::{PresenceStats, PresenceStore};
use crate::publication::ClientInfo;

use super::{ClusterBackend, WAIT, client};

const VISIBLE: &str = "presence: an entry added on one node is visible from the others";
const STATS: &str = "presence: stats count distinct clients and users";
const REPLACE: &str = "presence: adding a client again replaces its entry";
const REMOVED: &str = "presence: an entry removed on one node disappears on the others";
const CHANNELS: &str = "presence: channels are independent";
const REFRESH_READDS: &str = "presence: refresh re-adds entries that are gone";
const EXPIRES: &str = "presence: an entry nobody refreshes expires";
const STAYS: &str = "presence: an entry refreshed every refresh interval stays";
const SHORT_EXPIRY: &str =
    "presence: the store under test must be built with a short expiry (about a second)";

/// Longest refresh interval the suite accepts: it waits for an entry to expire.
pub const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// Runs every presence rule against two stores (nodes A and B) of each fresh backend.
///
/// Rules:
/// - what A adds, B gets (`get`, with the client info as added) and counts (`stats`: distinct
///   clients and distinct users); adding a client again replaces its entry;
/// - what A removes disappears for B, and an empty channel has default stats;
/// - channels are independent;
/// - `refresh` re-adds an entry that is gone (one that expired while its node was cut off);
/// - for stores with [`PresenceStore::refresh_interval`] `Some(interval)` (at most
///   [`MAX_REFRESH_INTERVAL`]; build the backend with an expiry of about a second): an entry
///   nobody refreshes disappears within about three intervals (the suite waits up to
///   `4 × interval + WAIT`), while one refreshed every interval stays.
///
/// Panics with a message that starts with the broken rule.
pub async fn run_presence_suite<F, Fut, B>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = B>,
    B: ClusterBackend,
{
    let backend = fresh().await;
    let (a, b) = two_stores(&backend).await;
    shared_entries(&*a, &*b).await;
    refresh_readds(&*a, &*b).await;
    let backend = fresh().await;
    let (a, b) = two_stores(&backend).await;
    expiry(&*a, &*b).await;
}

async fn two_stores(
    backend: &impl ClusterBackend,
) -> (Arc<dyn PresenceStore>, Arc<dyn PresenceStore>) {
    let store = |node: &'static str| async move {
        backend.presence().await.unwrap_or_else(|err| {
            panic!("presence: the backend must give {node} a presence store: {err}")
        })
    };
    (store("node A").await, store("node B").await)
}

async fn get(store: &dyn PresenceStore, channel: &str, rule: &str) -> HashMap<String, ClientInfo> {
    store
        .get(channel)
        .await
        .unwrap_or_else(|err| panic!("{rule}: get of {channel:?} failed: {err}"))
}

async fn stats(store: &dyn PresenceStore, channel: &str, rule: &str) -> PresenceStats {
    store
        .stats(channel)
        .await
        .unwrap_or_else(|err| panic!("{rule}: stats of {channel:?} failed: {err}"))
}

async fn add(store: &dyn PresenceStore, channel: &str, info: &ClientInfo, rule: &str) {
    store
        .add(channel, info.clone())
        .await
        .unwrap_or_else(|err| panic!("{rule}: add to {channel:?} failed: {err}"));
}

async fn remove(store: &dyn PresenceStore, channel: &str, client: &str, rule: &str) {
    store
        .remove(channel, client)
        .await
        .unwrap_or_else(|err| panic!("{rule}: remove from {channel:?} failed: {err}"));
}

fn clients(entries: &HashMap<String, ClientInfo>) -> Vec<&str> {
    let mut ids: Vec<&str> = entries.keys().map(String::as_str).collect();
    ids.sort_unstable();
    ids
}

async fn shared_entries(a: &dyn PresenceStore, b: &dyn PresenceStore) {
    let channel = "conf:presence";
    let c1 = client("c1", "alice");
    let c2 = client("c2", "alice");
    let c3 = client("c3", "bob");
    for info in [&c1, &c2, &c3] {
        add(a, channel, info, VISIBLE).await;
    }
    let seen = get(b, channel, VISIBLE).await;
    assert_eq!(clients(&seen), ["c1", "c2", "c3"], "{VISIBLE}: B's view");
    for info in [&c1, &c2, &c3] {
        assert_eq!(
            seen.get(&info.client),
            Some(info),
            "{VISIBLE}: B reads {:?} as added",
            info.client
        );
    }
    assert_eq!(
        stats(b, channel, STATS).await,
        PresenceStats {
            num_clients: 3,
            num_users: 2
        },
        "{STATS}: 3 clients of 2 users"
    );

    let c2_as_carol = client("c2", "carol");
    add(a, channel, &c2_as_carol, REPLACE).await;
    let seen = get(b, channel, REPLACE).await;
    assert_eq!(seen.len(), 3, "{REPLACE}: still 3 clients");
    assert_eq!(seen.get("c2"), Some(&c2_as_carol), "{REPLACE}");
    assert_eq!(
        stats(b, channel, STATS).await,
        PresenceStats {
            num_clients: 3,
            num_users: 3
        },
        "{STATS}: after c2 became carol's"
    );

    let other = "conf:presence-other";
    add(b, other, &c1, CHANNELS).await;
    assert_eq!(
        clients(&get(a, other, CHANNELS).await),
        ["c1"],
        "{CHANNELS}"
    );
    assert_eq!(
        get(a, "conf:presence-none", CHANNELS).await.len(),
        0,
        "{CHANNELS}"
    );

    remove(a, channel, "c1", REMOVED).await;
    assert_eq!(
        clients(&get(b, channel, REMOVED).await),
        ["c2", "c3"],
        "{REMOVED}"
    );
    assert_eq!(
        clients(&get(a, other, CHANNELS).await),
        ["c1"],
        "{CHANNELS}: removing from another channel"
    );
    assert_eq!(
        stats(b, channel, STATS).await,
        PresenceStats {
            num_clients: 2,
            num_users: 2
        },
        "{STATS}: after removing c1"
    );
    remove(a, channel, "c2", REMOVED).await;
    remove(a, channel, "c3", REMOVED).await;
    assert!(
        get(b, channel, REMOVED).await.is_empty(),
        "{REMOVED}: all gone"
    );
    assert_eq!(
        stats(b, channel, REMOVED).await,
        PresenceStats::default(),
        "{REMOVED}: an empty channel counts nothing"
    );
    remove(b, channel, "never-there", REMOVED).await;
}

async fn refresh_readds(a: &dyn PresenceStore, b: &dyn PresenceStore) {
    let channel: Arc<str> = Arc::from("conf:presence-refresh");
    let dave = Arc::new(client("c4", "dave"));
    a.refresh(&[(channel.clone(), dave.clone())])
        .await
        .unwrap_or_else(|err| panic!("{REFRESH_READDS}: refresh failed: {err}"));
    assert_eq!(
        get(b, &channel, REFRESH_READDS).await.get("c4"),
        Some(&*dave),
        "{REFRESH_READDS}"
    );
    remove(a, &channel, "c4", REFRESH_READDS).await;
}

async fn expiry(a: &dyn PresenceStore, b: &dyn PresenceStore) {
    let Some(interval) = a.refresh_interval() else {
        return;
    };
    assert!(
        !interval.is_zero() && interval <= MAX_REFRESH_INTERVAL,
        "{SHORT_EXPIRY}: its refresh interval is {interval:?}, the suite waits for at most \
         {MAX_REFRESH_INTERVAL:?}"
    );
    let channel: Arc<str> = Arc::from("conf:presence-expiry");
    let stale = client("c5", "erin");
    let kept = Arc::new(client("c6", "frank"));
    add(a, &channel, &stale, EXPIRES).await;
    add(a, &channel, &kept, STAYS).await;
    assert_eq!(
        clients(&get(b, &channel, EXPIRES).await),
        ["c5", "c6"],
        "{VISIBLE}: before expiry"
    );
    let started = tokio::time::Instant::now();
    let deadline = started + interval * 4 + WAIT;
    loop {
        tokio::time::sleep(interval).await;
        a.refresh(&[(channel.clone(), kept.clone())])
            .await
            .unwrap_or_else(|err| panic!("{STAYS}: refresh failed: {err}"));
        let seen = get(b, &channel, EXPIRES).await;
        assert!(
            seen.contains_key("c6"),
            "{STAYS}: c6, refreshed every {interval:?}, is gone after {:?}",
            started.elapsed()
        );
        if !seen.contains_key("c5") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{EXPIRES}: c5, never refreshed, is still there after {:?} (refresh interval \
             {interval:?})",
            started.elapsed()
        );
    }
    // Stays through a few more intervals too, and is counted alone.
    for _ in 0..3 {
        tokio::time::sleep(interval).await;
        a.refresh(&[(channel.clone(), kept.clone())])
            .await
            .unwrap_or_else(|err| panic!("{STAYS}: refresh failed: {err}"));
    }
    assert_eq!(
        clients(&get(b, &channel, STAYS).await),
        ["c6"],
        "{STAYS}: after more intervals"
    );
    assert_eq!(
        stats(b, &channel, STATS).await,
        PresenceStats {
            num_clients: 1,
            num_users: 1
        },
        "{STATS}: an expired entry is not counted"
    );
}
