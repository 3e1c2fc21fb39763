//! The endpoints this node knows: a snapshot of the store's endpoints and their state, read
//! without waiting (the publish path asks it whether anyone wants an event), written through
//! to the store, and refreshed from it so changes made on other nodes arrive.
//!
//! Owns: [`Endpoints`] and [`Entry`]. Endpoints from the config file are written to the store
//! at start-up (the file wins over what the store had for them; one the file no longer has is
//! removed) and are marked [`Entry::from_config`]: the server API does not change or delete
//! them. Every node of a cluster must have the same `[[webhooks.endpoints]]`.
//!
//! May touch: the [`WebhookStore`] it is given.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use herald_core::outbound::QueueError;
use herald_core::webhook_store::{ENDPOINT_STATES, ENDPOINTS, WebhookStore};
use parking_lot::RwLock;

use super::endpoint::{Endpoint, EndpointState};
use super::event::EventType;
use super::sign::Secret;

/// One endpoint as this node sees it.
#[derive(Debug)]
pub struct Entry {
    pub endpoint: Endpoint,
    pub secrets: Vec<Secret>,
    pub state: EndpointState,
    /// Defined in the config file.
    pub from_config: bool,
}

impl Entry {
    /// Enabled by the operator and not disabled by Herald.
    pub fn active(&self) -> bool {
        self.endpoint.enabled && self.state.disabled.is_none()
    }
}

type Snapshot = Arc<BTreeMap<String, Arc<Entry>>>;

/// The store collection marking the endpoints the config file wrote.
const CONFIGURED: &str = "configured_endpoints";

pub struct Endpoints {
    store: Arc<dyn WebhookStore>,
    snapshot: RwLock<Snapshot>,
    /// Bumped by every change made here, so a refresh that read the store before the change
    /// does not put the older picture back over it.
    generation: AtomicU64,
    config_ids: BTreeSet<String>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("count", &self.snapshot.read().len())
            .finish()
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Bytes, QueueError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| QueueError::Backend(format!("encode endpoint: {e}")))
}

impl Endpoints {
    /// Writes the config file's endpoints to `store` and reads every endpoint.
    pub async fn load(
        store: Arc<dyn WebhookStore>,
        configured: &[Endpoint],
    ) -> Result<Self, QueueError> {
        // Endpoints an earlier config file defined and this one does not are removed (the
        // file owns them); the marks say which ones the file wrote.
        let wanted: BTreeSet<&str> = configured.iter().map(|e| e.id.as_str()).collect();
        for id in store.documents(CONFIGURED).await?.keys() {
            if !wanted.contains(id.as_str()) {
                store.delete_document(ENDPOINTS, id).await?;
                store.delete_document(ENDPOINT_STATES, id).await?;
                store.delete_document(CONFIGURED, id).await?;
            }
        }
        for endpoint in configured {
            store
                .put_document(ENDPOINTS, &endpoint.id, encode(endpoint)?)
                .await?;
            store
                .put_document(CONFIGURED, &endpoint.id, Bytes::from_static(b"{}"))
                .await?;
        }
        let endpoints = Self {
            store,
            snapshot: RwLock::new(Arc::new(BTreeMap::new())),
            generation: AtomicU64::new(0),
            config_ids: configured.iter().map(|e| e.id.clone()).collect(),
        };
        endpoints.refresh().await?;
        Ok(endpoints)
    }

    /// Reads every endpoint and its state from the store again.
    pub async fn refresh(&self) -> Result<(), QueueError> {
        let started = self.generation.load(Ordering::Acquire);
        let definitions = self.store.documents(ENDPOINTS).await?;
        let states = self.store.documents(ENDPOINT_STATES).await?;
        let mut snapshot = BTreeMap::new();
        for (id, document) in definitions {
            let endpoint: Endpoint = match serde_json::from_slice(&document) {
                Ok(endpoint) => endpoint,
                Err(error) => {
                    tracing::warn!(endpoint = %id, %error, "unreadable stored webhook endpoint skipped");
                    continue;
                }
            };
            let state = states
                .get(&id)
                .and_then(|doc| serde_json::from_slice(doc).ok())
                .unwrap_or_default();
            snapshot.insert(id, Arc::new(self.entry(endpoint, state)));
        }
        let mut current = self.snapshot.write();
        // A change made here since the read is newer than what was read: keep it (the next
        // refresh reads both).
        if self.generation.load(Ordering::Acquire) == started {
            *current = Arc::new(snapshot);
        }
        Ok(())
    }

    fn entry(&self, endpoint: Endpoint, state: EndpointState) -> Entry {
        Entry {
            secrets: endpoint.signing_secrets(),
            from_config: self.config_ids.contains(&endpoint.id),
            endpoint,
            state,
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.snapshot.read().get(id).cloned()
    }

    /// Every endpoint, by id.
    pub fn all(&self) -> Snapshot {
        self.snapshot.read().clone()
    }

    /// The active endpoints that want an event of `kind` on `channel`.
    pub fn matching(&self, kind: EventType, channel: Option<&str>) -> Vec<Arc<Entry>> {
        self.snapshot
            .read()
            .values()
            .filter(|e| e.active() && e.endpoint.wants(kind, channel))
            .cloned()
            .collect()
    }

    /// Whether any active endpoint wants `kind` on `channel` (`None`: any channel, for
    /// events without one).
    pub fn any_wants(&self, kind: EventType, channel: Option<&str>) -> bool {
        self.snapshot
            .read()
            .values()
            .any(|e| e.active() && e.endpoint.wants(kind, channel))
    }

    /// Creates or replaces an endpoint (durably, then here). A re-enabled endpoint starts
    /// afresh: its disabled state and failure run are cleared.
    pub async fn put(&self, endpoint: Endpoint, clear_state: bool) -> Result<(), QueueError> {
        self.store
            .put_document(ENDPOINTS, &endpoint.id, encode(&endpoint)?)
            .await?;
        let state = match (clear_state, self.get(&endpoint.id)) {
            (false, Some(old)) => old.state.clone(),
            (true, Some(_)) => {
                self.store
                    .delete_document(ENDPOINT_STATES, &endpoint.id)
                    .await?;
                EndpointState::default()
            }
            _ => EndpointState::default(),
        };
        let id = endpoint.id.clone();
        let entry = Arc::new(self.entry(endpoint, state));
        self.replace(|map| {
            map.insert(id, entry);
        });
        Ok(())
    }

    /// Deletes an endpoint and its state; whether it existed.
    pub async fn delete(&self, id: &str) -> Result<bool, QueueError> {
        let existed = self.store.delete_document(ENDPOINTS, id).await?;
        self.store.delete_document(ENDPOINT_STATES, id).await?;
        self.replace(|map| {
            map.remove(id);
        });
        Ok(existed)
    }

    /// Records what Herald learnt about endpoint `id`.
    pub async fn set_state(&self, id: &str, state: EndpointState) -> Result<(), QueueError> {
        self.store
            .put_document(ENDPOINT_STATES, id, encode(&state)?)
            .await?;
        let Some(old) = self.get(id) else {
            return Ok(());
        };
        let entry = Arc::new(self.entry(old.endpoint.clone(), state));
        let id = id.to_owned();
        self.replace(|map| {
            map.insert(id, entry);
        });
        Ok(())
    }

    fn replace(&self, change: impl FnOnce(&mut BTreeMap<String, Arc<Entry>>)) {
        let mut snapshot = self.snapshot.write();
        let mut map = (**snapshot).clone();
        change(&mut map);
        *snapshot = Arc::new(map);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}
