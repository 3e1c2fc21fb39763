//! The webhook store port: where webhook endpoints, their run-time state and the log of
//! delivery attempts are kept — beside the outbound queue (`outbound.db` with SQLite, the
//! cluster's Redis, memory), so every node sees the same endpoints.
//!
//! Owns the [`WebhookStore`] contract and [`AttemptRecord`]. Endpoints are opaque JSON
//! documents here (their schema belongs to `herald-outbound`'s webhook module), kept in two
//! collections: [`ENDPOINTS`] (what the operator set) and [`ENDPOINT_STATES`] (what Herald
//! learnt: failing since, disabled and why). Two collections so that Herald's writes and the
//! operator's never overwrite each other's fields. Backends pass
//! [`crate::conformance::run_webhook_store_suite`].
//!
//! Errors are the outbound queue's ([`QueueError`]): same database, same failures.
//!
//! May touch: nothing outside the process.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::outbound::QueueError;

/// The collection of endpoint definitions.
pub const ENDPOINTS: &str = "endpoints";
/// The collection of endpoints' run-time state.
pub const ENDPOINT_STATES: &str = "endpoint_states";

/// One delivery attempt of a webhook message to an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The message id (`webhook-id`, the job id).
    pub message: String,
    pub endpoint: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When the attempt started, ms since the Unix epoch.
    pub at: u64,
    /// The HTTP status answered; 0 when there was no answer.
    pub status: u16,
    pub duration_ms: u64,
    /// Why it failed (empty on success).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Most attempts kept per message (the oldest go first).
pub const MAX_ATTEMPTS_PER_MESSAGE: usize = 100;

#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    /// Every document of `collection`, by id.
    async fn documents(&self, collection: &str) -> Result<BTreeMap<String, Bytes>, QueueError>;

    /// One document of `collection`.
    async fn document(&self, collection: &str, id: &str) -> Result<Option<Bytes>, QueueError>;

    /// Creates or replaces one document durably.
    async fn put_document(
        &self,
        collection: &str,
        id: &str,
        document: Bytes,
    ) -> Result<(), QueueError>;

    /// Removes one document; whether it was there.
    async fn delete_document(&self, collection: &str, id: &str) -> Result<bool, QueueError>;

    /// Appends attempts to their messages' logs (at most [`MAX_ATTEMPTS_PER_MESSAGE`] kept
    /// per message).
    async fn record_attempts(&self, attempts: Vec<AttemptRecord>) -> Result<(), QueueError>;

    /// A message's attempts, oldest first.
    async fn attempts(&self, message: &str) -> Result<Vec<AttemptRecord>, QueueError>;

    /// Forgets attempts made before `before`; returns how many (backends whose keys expire
    /// by themselves may return 0).
    async fn purge_attempts(&self, before: u64) -> Result<u64, QueueError>;
}

/// The in-memory store (memory engine and tests).
#[derive(Debug, Default)]
pub struct MemoryWebhookStore {
    documents: Mutex<BTreeMap<(String, String), Bytes>>,
    attempts: Mutex<BTreeMap<String, Vec<AttemptRecord>>>,
}

impl MemoryWebhookStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl WebhookStore for MemoryWebhookStore {
    async fn documents(&self, collection: &str) -> Result<BTreeMap<String, Bytes>, QueueError> {
        Ok(self
            .documents
            .lock()
            .iter()
            .filter(|((c, _), _)| c == collection)
            .map(|((_, id), doc)| (id.clone(), doc.clone()))
            .collect())
    }

    async fn document(&self, collection: &str, id: &str) -> Result<Option<Bytes>, QueueError> {
        Ok(self
            .documents
            .lock()
            .get(&(collection.to_owned(), id.to_owned()))
            .cloned())
    }

    async fn put_document(
        &self,
        collection: &str,
        id: &str,
        document: Bytes,
    ) -> Result<(), QueueError> {
        self.documents
            .lock()
            .insert((collection.to_owned(), id.to_owned()), document);
        Ok(())
    }

    async fn delete_document(&self, collection: &str, id: &str) -> Result<bool, QueueError> {
        Ok(self
            .documents
            .lock()
            .remove(&(collection.to_owned(), id.to_owned()))
            .is_some())
    }

    async fn record_attempts(&self, attempts: Vec<AttemptRecord>) -> Result<(), QueueError> {
        let mut logs = self.attempts.lock();
        for attempt in attempts {
            let log = logs.entry(attempt.message.clone()).or_default();
            log.push(attempt);
            if log.len() > MAX_ATTEMPTS_PER_MESSAGE {
                log.remove(0);
            }
        }
        Ok(())
    }

    async fn attempts(&self, message: &str) -> Result<Vec<AttemptRecord>, QueueError> {
        Ok(self
            .attempts
            .lock()
            .get(message)
            .cloned()
            .unwrap_or_default())
    }

    async fn purge_attempts(&self, before: u64) -> Result<u64, QueueError> {
        let mut logs = self.attempts.lock();
        let mut purged = 0u64;
        logs.retain(|_, log| {
            let kept_from = log.iter().take_while(|a| a.at < before).count();
            purged += kept_from as u64;
            log.drain(..kept_from);
            !log.is_empty()
        });
        Ok(purged)
    }
}
