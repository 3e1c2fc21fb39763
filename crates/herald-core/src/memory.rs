//! In-memory backends: history and presence for a single ephemeral node (`--memory`) and for
//! tests. History here is lost on restart, and a new process reports new epochs, as the
//! contract in [`crate::store`] requires.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::idempotency::IdempotencyWindow;
use crate::presence::{PresenceError, PresenceStats, PresenceStore};
use crate::publication::{ClientInfo, Publication, PublicationEvent, StreamPosition, new_epoch};
use crate::store::{
    AppendRequest, Appended, CommitListener, HistoryPage, HistoryQuery, HistoryStore, StoreError,
    check_since, select_range,
};
use crate::time::now_ms;

struct Stream {
    epoch: Arc<str>,
    top: u64,
    /// Retained publications with their expiry time (ms), oldest first, offsets contiguous.
    retained: VecDeque<(Publication, u64)>,
}

impl Stream {
    fn drop_expired(&mut self, now: u64) {
        while self
            .retained
            .front()
            .is_some_and(|(_, expires)| *expires <= now)
        {
            self.retained.pop_front();
        }
    }
}

struct State {
    streams: HashMap<Arc<str>, Stream>,
    idempotency: IdempotencyWindow<StreamPosition>,
}

/// History kept in process memory.
pub struct MemoryHistoryStore {
    /// Epoch of every stream this store creates: a new process means new epochs.
    epoch: Arc<str>,
    state: Mutex<State>,
    listener: Arc<dyn CommitListener>,
}

impl std::fmt::Debug for MemoryHistoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHistoryStore")
            .field("epoch", &self.epoch)
            .finish()
    }
}

/// Most idempotency keys remembered at once per store.
pub const IDEMPOTENCY_CAPACITY: usize = 1_000_000;

impl MemoryHistoryStore {
    pub fn new(listener: Arc<dyn CommitListener>) -> Self {
        Self {
            epoch: Arc::from(new_epoch()),
            state: Mutex::new(State {
                streams: HashMap::new(),
                idempotency: IdempotencyWindow::new(IDEMPOTENCY_CAPACITY),
            }),
            listener,
        }
    }
}

#[async_trait]
impl HistoryStore for MemoryHistoryStore {
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        let now = now_ms();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if let Some((key, _)) = &request.idempotency
            && let Some(position) = state.idempotency.get(&request.channel, key, now)
        {
            return Ok(Appended {
                position,
                duplicate: true,
            });
        }
        let stream = state
            .streams
            .entry(request.channel.clone())
            .or_insert_with(|| Stream {
                epoch: self.epoch.clone(),
                top: 0,
                retained: VecDeque::new(),
            });
        stream.top += 1;
        let mut publication = request.publication;
        publication.offset = stream.top;
        let ttl_ms = u64::try_from(request.retention.ttl.as_millis()).unwrap_or(u64::MAX);
        stream
            .retained
            .push_back((publication.clone(), now.saturating_add(ttl_ms)));
        while stream.retained.len() > request.retention.size as usize {
            stream.retained.pop_front();
        }
        stream.drop_expired(now);
        let position = StreamPosition::new(stream.top, &*stream.epoch);
        if let Some((key, window)) = &request.idempotency {
            let deadline =
                now.saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
            state
                .idempotency
                .insert(&request.channel, key, position.clone(), deadline);
        }
        // Under the lock, so listeners see each channel's publications in offset order.
        let epoch = stream.epoch.clone();
        self.listener.committed(Arc::new(PublicationEvent::new(
            request.channel,
            epoch,
            publication,
        )));
        Ok(Appended {
            position,
            duplicate: false,
        })
    }

    async fn read(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError> {
        let now = now_ms();
        let mut state = self.state.lock();
        let Some(stream) = state.streams.get_mut(channel) else {
            let top = StreamPosition::new(0, &*self.epoch);
            if let Some(since) = &query.since {
                check_since(since, &top)?;
            }
            return Ok(HistoryPage {
                publications: Vec::new(),
                position: top,
            });
        };
        stream.drop_expired(now);
        let top = StreamPosition::new(stream.top, &*stream.epoch);
        if let Some(since) = &query.since {
            check_since(since, &top)?;
        }
        let first = stream
            .retained
            .front()
            .map_or(stream.top + 1, |(p, _)| p.offset);
        let mut publications = Vec::new();
        if let Some((from, to)) = select_range(&query, first, stream.top) {
            let start = (from - first) as usize;
            let end = (to - first) as usize;
            publications.extend(stream.retained.range(start..=end).map(|(p, _)| p.clone()));
            if query.reverse {
                publications.reverse();
            }
        }
        Ok(HistoryPage {
            publications,
            position: top,
        })
    }

    async fn remove(&self, channel: &str) -> Result<(), StoreError> {
        if let Some(stream) = self.state.lock().streams.get_mut(channel) {
            stream.retained.clear();
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Presence kept in process memory.
#[derive(Debug, Default)]
pub struct MemoryPresenceStore {
    channels: Mutex<HashMap<String, HashMap<String, ClientInfo>>>,
}

impl MemoryPresenceStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl PresenceStore for MemoryPresenceStore {
    async fn add(&self, channel: &str, info: ClientInfo) -> Result<(), PresenceError> {
        self.channels
            .lock()
            .entry(channel.to_owned())
            .or_default()
            .insert(info.client.clone(), info);
        Ok(())
    }

    async fn remove(&self, channel: &str, client_id: &str) -> Result<(), PresenceError> {
        let mut channels = self.channels.lock();
        if let Some(clients) = channels.get_mut(channel) {
            clients.remove(client_id);
            if clients.is_empty() {
                channels.remove(channel);
            }
        }
        Ok(())
    }

    async fn get(&self, channel: &str) -> Result<HashMap<String, ClientInfo>, PresenceError> {
        Ok(self
            .channels
            .lock()
            .get(channel)
            .cloned()
            .unwrap_or_default())
    }

    async fn stats(&self, channel: &str) -> Result<PresenceStats, PresenceError> {
        let channels = self.channels.lock();
        let Some(clients) = channels.get(channel) else {
            return Ok(PresenceStats::default());
        };
        let users: HashSet<&str> = clients.values().map(|c| c.user.as_str()).collect();
        Ok(PresenceStats {
            num_clients: clients.len() as u64,
            num_users: users.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use crate::engine::Engine;

    #[tokio::test]
    async fn memory_history_passes_conformance() {
        conformance::run_history_suite(|listener| async move {
            Ok(Arc::new(MemoryHistoryStore::new(listener)) as Arc<dyn HistoryStore>)
        })
        .await;
    }

    async fn local_engine_suite() {
        conformance::run_engine_suite(|feed| async move {
            let history = Arc::new(MemoryHistoryStore::new(Arc::new(feed.clone())));
            Ok(Arc::new(crate::engine::LocalEngine::new(history, feed)) as Arc<dyn Engine>)
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_engine_over_memory_passes_engine_conformance() {
        local_engine_suite().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn local_engine_over_memory_passes_engine_conformance_on_one_thread() {
        local_engine_suite().await;
    }

    #[tokio::test]
    async fn memory_presence_counts_users_and_clients() {
        let store = MemoryPresenceStore::new();
        let info = |client: &str, user: &str| ClientInfo {
            client: client.into(),
            user: user.into(),
            conn_info: None,
            chan_info: None,
        };
        store.add("ch", info("c1", "alice")).await.expect("add");
        store.add("ch", info("c2", "alice")).await.expect("add");
        store.add("ch", info("c3", "bob")).await.expect("add");
        assert_eq!(
            store.stats("ch").await.expect("stats"),
            PresenceStats {
                num_clients: 3,
                num_users: 2
            }
        );
        store.remove("ch", "c1").await.expect("remove");
        assert_eq!(store.get("ch").await.expect("get").len(), 2);
        store.remove("ch", "c2").await.expect("remove");
        store.remove("ch", "c3").await.expect("remove");
        assert_eq!(
            store.stats("ch").await.expect("stats"),
            PresenceStats::default()
        );
    }
}
