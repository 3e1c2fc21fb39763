//! The webhook store on SQLite: [`SqliteWebhookStore`], in `outbound.db` beside the queue.
//!
//! Owns: the SQL of the [`WebhookStore`] contract over the `webhook_documents` and
//! `webhook_attempts` tables.
//!
//! May touch: `outbound.db` through [`OutboundDb`] only.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::outbound::QueueError;
use herald_core::webhook_store::{AttemptRecord, MAX_ATTEMPTS_PER_MESSAGE, WebhookStore};
use rusqlite::{OptionalExtension, params};

use super::{DbError, OutboundDb};
use crate::sqlite::codec::{to_i64, to_u64};

/// Webhook endpoints and attempts in `outbound.db`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SqliteWebhookStore {
    db: OutboundDb,
}

impl SqliteWebhookStore {
    pub fn new(db: OutboundDb) -> Self {
        Self { db }
    }
}

#[async_trait]
impl WebhookStore for SqliteWebhookStore {
    async fn documents(&self, collection: &str) -> Result<BTreeMap<String, Bytes>, QueueError> {
        let collection = collection.to_owned();
        let documents = self
            .db
            .read(move |conn| {
                let mut select = conn.prepare_cached(
                    "SELECT id, document FROM webhook_documents WHERE collection = ?1",
                )?;
                let rows = select.query_map(params![collection], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?))
                })?;
                let mut out = BTreeMap::new();
                for row in rows {
                    let (id, document) = row?;
                    out.insert(id, Bytes::from(document));
                }
                Ok(out)
            })
            .await?;
        Ok(documents)
    }

    async fn document(&self, collection: &str, id: &str) -> Result<Option<Bytes>, QueueError> {
        let (collection, id) = (collection.to_owned(), id.to_owned());
        let document = self
            .db
            .read(move |conn| {
                let document = conn
                    .prepare_cached(
                        "SELECT document FROM webhook_documents WHERE collection = ?1 AND id = ?2",
                    )?
                    .query_row(params![collection, id], |row| row.get::<_, Vec<u8>>(0))
                    .optional()?;
                Ok(document.map(Bytes::from))
            })
            .await?;
        Ok(document)
    }

    async fn put_document(
        &self,
        collection: &str,
        id: &str,
        document: Bytes,
    ) -> Result<(), QueueError> {
        let (collection, id) = (collection.to_owned(), id.to_owned());
        self.db
            .write(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO webhook_documents (collection, id, document) VALUES (?1, ?2, ?3)
                     ON CONFLICT (collection, id) DO UPDATE SET document = excluded.document",
                )?
                .execute(params![collection, id, document.as_ref()])?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn delete_document(&self, collection: &str, id: &str) -> Result<bool, QueueError> {
        let (collection, id) = (collection.to_owned(), id.to_owned());
        let removed = self
            .db
            .write(move |conn| {
                let n = conn
                    .prepare_cached(
                        "DELETE FROM webhook_documents WHERE collection = ?1 AND id = ?2",
                    )?
                    .execute(params![collection, id])?;
                Ok(n > 0)
            })
            .await?;
        Ok(removed)
    }

    async fn record_attempts(&self, attempts: Vec<AttemptRecord>) -> Result<(), QueueError> {
        if attempts.is_empty() {
            return Ok(());
        }
        self.db
            .write(move |conn| {
                let mut insert = conn.prepare_cached(
                    "INSERT INTO webhook_attempts
                         (message, endpoint, attempt, at, status, duration_ms, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                let mut trim = conn.prepare_cached(
                    "DELETE FROM webhook_attempts WHERE message = ?1 AND seq NOT IN
                         (SELECT seq FROM webhook_attempts WHERE message = ?1
                          ORDER BY seq DESC LIMIT ?2)",
                )?;
                for attempt in &attempts {
                    insert.execute(params![
                        attempt.message,
                        attempt.endpoint,
                        attempt.attempt,
                        to_i64(attempt.at),
                        attempt.status,
                        to_i64(attempt.duration_ms),
                        attempt.error,
                    ])?;
                    trim.execute(params![attempt.message, MAX_ATTEMPTS_PER_MESSAGE as i64])?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn attempts(&self, message: &str) -> Result<Vec<AttemptRecord>, QueueError> {
        let message = message.to_owned();
        let attempts = self
            .db
            .read(move |conn| {
                let mut select = conn.prepare_cached(
                    "SELECT message, endpoint, attempt, at, status, duration_ms, error
                     FROM webhook_attempts WHERE message = ?1 ORDER BY seq",
                )?;
                let rows = select.query_map(params![message], |row| {
                    Ok(AttemptRecord {
                        message: row.get(0)?,
                        endpoint: row.get(1)?,
                        attempt: row.get(2)?,
                        at: to_u64(row.get(3)?),
                        status: row.get(4)?,
                        duration_ms: to_u64(row.get(5)?),
                        error: row.get(6)?,
                    })
                })?;
                rows.collect::<Result<Vec<_>, _>>().map_err(DbError::from)
            })
            .await?;
        Ok(attempts)
    }

    async fn purge_attempts(&self, before: u64) -> Result<u64, QueueError> {
        let purged = self
            .db
            .write(move |conn| {
                let n = conn
                    .prepare_cached("DELETE FROM webhook_attempts WHERE at < ?1")?
                    .execute(params![to_i64(before)])?;
                Ok(n as u64)
            })
            .await?;
        Ok(purged)
    }
}
