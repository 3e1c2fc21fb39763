//! Helpers shared by the SQLite store's integration tests: stores in temporary directories
//! and publication builders.
//!
//! May touch: temporary directories only.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::conformance::RecordingListener;
use herald_core::publication::{Payload, Publication};
use herald_core::store::{
    AppendRequest, Appended, CommitListener, HistoryPage, HistoryQuery, HistoryStore, Retention,
    StoreError,
};
use herald_store::sqlite::{SqliteConfig, SqliteHistoryStore, SyncPolicy};
use tempfile::TempDir;

pub const KEEP: Retention = Retention {
    size: 1000,
    ttl: Duration::from_secs(3600),
};

/// A store that deletes its temporary directory when dropped (after closing the store).
pub struct TempStore {
    // Field order matters: the store closes before the directory is removed.
    store: SqliteHistoryStore,
    _dir: TempDir,
}

impl TempStore {
    pub fn open(sync: SyncPolicy, listener: Arc<dyn CommitListener>) -> Result<Self, StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let config = SqliteConfig {
            sync,
            ..SqliteConfig::new(dir.path())
        };
        let store = SqliteHistoryStore::open(&config, listener)?;
        Ok(Self { store, _dir: dir })
    }
}

#[async_trait]
impl HistoryStore for TempStore {
    async fn append(&self, request: AppendRequest) -> Result<Appended, StoreError> {
        self.store.append(request).await
    }

    async fn read(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError> {
        self.store.read(channel, query).await
    }

    async fn remove(&self, channel: &str) -> Result<(), StoreError> {
        self.store.remove(channel).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }
}

pub fn config(dir: &TempDir) -> SqliteConfig {
    SqliteConfig {
        sync: SyncPolicy::Normal,
        ..SqliteConfig::new(dir.path())
    }
}

pub fn listener() -> Arc<RecordingListener> {
    Arc::new(RecordingListener::default())
}

pub fn request(channel: &str, data: &str) -> AppendRequest {
    AppendRequest {
        channel: Arc::from(channel),
        publication: Publication {
            offset: 0,
            time_ms: herald_core::time::now_ms(),
            data: Payload::Json(Bytes::from(data.to_owned())),
            tags: BTreeMap::new(),
            info: None,
        },
        retention: KEEP,
        idempotency: None,
    }
}

pub fn keyed(channel: &str, data: &str, key: &str, window: Duration) -> AppendRequest {
    AppendRequest {
        idempotency: Some((key.to_owned(), window)),
        ..request(channel, data)
    }
}
