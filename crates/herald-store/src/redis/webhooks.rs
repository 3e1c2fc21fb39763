//! The webhook store on Redis, shared by every node of a cluster: [`RedisWebhookStore`].
//!
//! Owns: the keys of the [`WebhookStore`] contract, under the outbound queue's hash tag on
//! the first shard: `<base>:wh:docs:<collection>` (a hash: id → JSON document),
//! `<base>:wh:attempts:<message>` (a list of JSON attempts, trimmed to the newest
//! [`MAX_ATTEMPTS_PER_MESSAGE`]) and `<base>:wh:attempted` (a sorted set: message → time of
//! its latest attempt, what [`WebhookStore::purge_attempts`] walks).
//!
//! May touch: the first shard's Redis, through its [`Link`].

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::outbound::QueueError;
use herald_core::webhook_store::{AttemptRecord, MAX_ATTEMPTS_PER_MESSAGE, WebhookStore};

use super::conn::Link;
use super::queue::queue_error;

/// Messages whose logs one purge step removes.
const PURGE_CHUNK: isize = 500;

/// Webhook endpoints and attempts of a cluster, in Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisWebhookStore {
    link: Arc<Link>,
    base: String,
}

impl std::fmt::Debug for RedisWebhookStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisWebhookStore")
            .field("redis", &self.link.name())
            .finish()
    }
}

impl RedisWebhookStore {
    pub(crate) fn new(link: Arc<Link>, base: String) -> Self {
        Self { link, base }
    }

    fn documents_key(&self, collection: &str) -> String {
        format!("{}:wh:docs:{collection}", self.base)
    }

    fn attempts_key(&self, message: &str) -> String {
        format!("{}:wh:attempts:{message}", self.base)
    }

    fn attempted_key(&self) -> String {
        format!("{}:wh:attempted", self.base)
    }
}

fn encode(attempt: &AttemptRecord) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(attempt).map_err(|e| QueueError::Backend(format!("encode attempt: {e}")))
}

#[async_trait]
impl WebhookStore for RedisWebhookStore {
    async fn documents(&self, collection: &str) -> Result<BTreeMap<String, Bytes>, QueueError> {
        let all: Vec<(String, Vec<u8>)> = self
            .link
            .query(
                redis::cmd("HGETALL")
                    .arg(self.documents_key(collection))
                    .clone(),
            )
            .await
            .map_err(queue_error)?;
        Ok(all
            .into_iter()
            .map(|(id, doc)| (id, Bytes::from(doc)))
            .collect())
    }

    async fn document(&self, collection: &str, id: &str) -> Result<Option<Bytes>, QueueError> {
        let document: Option<Vec<u8>> = self
            .link
            .query(
                redis::cmd("HGET")
                    .arg(self.documents_key(collection))
                    .arg(id)
                    .clone(),
            )
            .await
            .map_err(queue_error)?;
        Ok(document.map(Bytes::from))
    }

    async fn put_document(
        &self,
        collection: &str,
        id: &str,
        document: Bytes,
    ) -> Result<(), QueueError> {
        self.link
            .query::<()>(
                redis::cmd("HSET")
                    .arg(self.documents_key(collection))
                    .arg(id)
                    .arg(document.as_ref())
                    .clone(),
            )
            .await
            .map_err(queue_error)
    }

    async fn delete_document(&self, collection: &str, id: &str) -> Result<bool, QueueError> {
        let removed: u64 = self
            .link
            .query(
                redis::cmd("HDEL")
                    .arg(self.documents_key(collection))
                    .arg(id)
                    .clone(),
            )
            .await
            .map_err(queue_error)?;
        Ok(removed > 0)
    }

    async fn record_attempts(&self, attempts: Vec<AttemptRecord>) -> Result<(), QueueError> {
        if attempts.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for attempt in &attempts {
            let key = self.attempts_key(&attempt.message);
            pipe.cmd("RPUSH").arg(&key).arg(encode(attempt)?).ignore();
            pipe.cmd("LTRIM")
                .arg(&key)
                .arg(-(MAX_ATTEMPTS_PER_MESSAGE as i64))
                .arg(-1)
                .ignore();
            pipe.cmd("ZADD")
                .arg(self.attempted_key())
                .arg(attempt.at)
                .arg(&attempt.message)
                .ignore();
        }
        self.link.pipeline::<()>(pipe).await.map_err(queue_error)
    }

    async fn attempts(&self, message: &str) -> Result<Vec<AttemptRecord>, QueueError> {
        let raw: Vec<Vec<u8>> = self
            .link
            .query(
                redis::cmd("LRANGE")
                    .arg(self.attempts_key(message))
                    .arg(0)
                    .arg(-1)
                    .clone(),
            )
            .await
            .map_err(queue_error)?;
        raw.iter()
            .map(|bytes| {
                serde_json::from_slice(bytes)
                    .map_err(|e| QueueError::Backend(format!("stored attempt: {e}")))
            })
            .collect()
    }

    /// Removes the logs of messages whose latest attempt is older than `before` (a log is
    /// kept whole while any of its attempts is recent).
    async fn purge_attempts(&self, before: u64) -> Result<u64, QueueError> {
        let mut purged = 0u64;
        loop {
            let old: Vec<String> = self
                .link
                .query(
                    redis::cmd("ZRANGE")
                        .arg(self.attempted_key())
                        .arg("-inf")
                        .arg(format!("({before}"))
                        .arg("BYSCORE")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(PURGE_CHUNK)
                        .clone(),
                )
                .await
                .map_err(queue_error)?;
            if old.is_empty() {
                return Ok(purged);
            }
            let mut pipe = redis::pipe();
            for message in &old {
                pipe.cmd("DEL").arg(self.attempts_key(message)).ignore();
            }
            pipe.cmd("ZREM")
                .arg(self.attempted_key())
                .arg(&old)
                .ignore();
            self.link.pipeline::<()>(pipe).await.map_err(queue_error)?;
            purged += old.len() as u64;
        }
    }
}
