//! PostgreSQL transactional outbox source: the application inserts rows into a table in its
//! own transaction (so a row exists exactly when the application's change committed); Herald
//! claims them in order with `SELECT … FOR UPDATE SKIP LOCKED` inside a transaction (several
//! nodes share the table, each row claimed by one), publishes them, then deletes them and
//! commits in the same transaction. A node that dies holding rows drops its connection, the
//! transaction rolls back, and the rows are claimed again (the row id keys the publication,
//! so the redelivery is harmless).
//!
//! Wake-up: `LISTEN` on a notification channel that the table's trigger signals on insert
//! ([`ddl`]), plus polling every `poll_interval` (for notifications missed while
//! disconnected, and tables without the trigger).
//!
//! A row's body is its `data` column (as text: JSON text, or an envelope); its attributes are
//! `table` and `column.NAME` for every column (`column.channel` by the default mapping); its
//! id is the `id` column.
//!
//! Driver: `tokio-postgres` rather than `sqlx`: a source needs exactly one connection that
//! holds a transaction open from claim to delete and also receives its notifications, which is
//! what a `tokio_postgres::Client` and its `Connection` are; sqlx would add a pool, a second
//! connection for its listener and a much larger dependency tree for no gain here. TLS with
//! libpq's `sslmode` meanings ([`crate::pg_tls`]).
//!
//! May touch: the configured PostgreSQL database (the outbox table only).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use herald_core::error::error_chain;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client};

use crate::mapping::Received;
use crate::source::{Outcome, Source, SourceError};

/// What an outbox source reads.
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    /// `postgres://user:password@host:port/database` (or key=value pairs).
    pub url: String,
    /// The table, `name` or `schema.name`.
    pub table: String,
    /// The `LISTEN` channel the table's trigger notifies.
    pub notify_channel: String,
    /// How often the table is read without a notification.
    pub poll_interval: Duration,
    /// `application_name` of the connection, unless the URL sets one.
    pub connection_name: String,
}

/// The attributes templates may name.
pub const ATTRIBUTES: &[&str] = &["table", "column.", "id"];

/// The default table name.
pub const DEFAULT_TABLE: &str = "herald_outbox";

/// The notify channel of a table when none is configured: its name, `.` → `_`.
pub fn default_notify_channel(table: &str) -> String {
    table.replace('.', "_")
}

/// A table or channel name that can be used unquoted-safe: letters, digits, `_`, one optional
/// `schema.` prefix. Returns the quoted form.
pub fn quote_identifier(name: &str) -> Result<String, String> {
    let valid = |part: &str| {
        let mut chars = part.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && part.len() <= 63
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|part| valid(part)) {
        return Err(format!(
            "{name:?} is not a usable name (letters, digits and `_`, optionally `schema.name`)"
        ));
    }
    Ok(parts
        .iter()
        .map(|part| format!("\"{part}\""))
        .collect::<Vec<_>>()
        .join("."))
}

/// The SQL that creates an outbox table and its notify trigger (`herald outbox-sql`).
pub fn ddl(table: &str, notify_channel: &str) -> Result<String, String> {
    let quoted = quote_identifier(table)?;
    quote_identifier(notify_channel)?;
    let function = quote_identifier(&format!("{}_notify", table.replace('.', "_")))?;
    Ok(format!(
        "-- Herald outbox: insert rows in the same transaction as the change they announce.\n\
         CREATE TABLE IF NOT EXISTS {quoted} (\n    \
             id         BIGSERIAL PRIMARY KEY,\n    \
             channel    TEXT NOT NULL,\n    \
             data       TEXT NOT NULL,\n    \
             created_at TIMESTAMPTZ NOT NULL DEFAULT now()\n\
         );\n\
         CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$\n\
         BEGIN\n    \
             PERFORM pg_notify('{notify_channel}', '');\n    \
             RETURN NULL;\n\
         END $$;\n\
         DROP TRIGGER IF EXISTS herald_notify ON {quoted};\n\
         CREATE TRIGGER herald_notify AFTER INSERT ON {quoted}\n    \
             FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n"
    ))
}

struct Connected {
    client: Client,
    /// Signalled by the connection task on each notification.
    notified: Arc<Notify>,
    /// A claim transaction is open (between `receive` and `settle`).
    in_transaction: bool,
}

impl Connected {
    async fn commit(&mut self) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute("COMMIT").await?;
        self.in_transaction = false;
        Ok(())
    }
}

pub struct OutboxSource {
    config: OutboxConfig,
    table: String,
    connected: Option<Connected>,
}

impl OutboxSource {
    pub fn new(config: OutboxConfig) -> Result<Self, String> {
        let table = quote_identifier(&config.table)?;
        quote_identifier(&config.notify_channel)?;
        Ok(Self {
            config,
            table,
            connected: None,
        })
    }

    fn connected(&mut self) -> Result<&mut Connected, SourceError> {
        self.connected.as_mut().ok_or(SourceError::NotConnected)
    }

    /// Opens a transaction and locks up to `max` unclaimed rows, oldest first; commits and
    /// returns nothing when there are none.
    async fn claim(&mut self, max: usize) -> Result<Vec<(i64, Received)>, SourceError> {
        let sql = format!(
            "SELECT id, data::text, to_jsonb(o)::text FROM {} o ORDER BY id LIMIT $1 \
             FOR UPDATE SKIP LOCKED",
            self.table
        );
        let table = self.config.table.clone();
        let connected = self.connected()?;
        let fail = |e: tokio_postgres::Error| SourceError::Receive(e.to_string());
        connected
            .client
            .batch_execute("BEGIN")
            .await
            .map_err(fail)?;
        connected.in_transaction = true;
        let rows = connected
            .client
            .query(&sql, &[&(max as i64)])
            .await
            .map_err(fail)?;
        if rows.is_empty() {
            connected.commit().await.map_err(fail)?;
            return Ok(Vec::new());
        }
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get(0).map_err(fail)?;
            let data: String = row.try_get(1).map_err(fail)?;
            let columns: String = row.try_get(2).map_err(fail)?;
            let mut message = Received::new(data.into_bytes())
                .with("table", table.clone())
                .with_id(id.to_string());
            if let Ok(serde_json::Value::Object(columns)) = serde_json::from_str(&columns) {
                for (name, value) in columns {
                    let text = match value {
                        serde_json::Value::String(text) => text,
                        serde_json::Value::Null => continue,
                        other => other.to_string(),
                    };
                    message.attributes.push((format!("column.{name}"), text));
                }
            }
            claimed.push((id, message));
        }
        Ok(claimed)
    }
}

#[async_trait]
impl Source for OutboxSource {
    type Receipt = i64;

    async fn connect(&mut self) -> Result<(), SourceError> {
        let fail = |e: tokio_postgres::Error| SourceError::Connect(error_chain(&e));
        let split = crate::pg_tls::split_url(&self.config.url).map_err(SourceError::Connect)?;
        let mut options: tokio_postgres::Config = split.url.parse().map_err(fail)?;
        if options.get_application_name().is_none() {
            options.application_name(&self.config.connection_name);
        }
        let tls = crate::pg_tls::connector(&split).map_err(SourceError::Connect)?;
        let (client, mut connection) = options.connect(tls).await.map_err(fail)?;
        let notified = Arc::new(Notify::new());
        let signal = notified.clone();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => signal.notify_one(),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::debug!(%error, "outbox connection ended");
                        break;
                    }
                }
            }
            // Wakes a waiting receive, whose next query then fails and reconnects.
            signal.notify_one();
        });
        let listen = format!(
            "LISTEN {}",
            quote_identifier(&self.config.notify_channel).map_err(SourceError::Connect)?
        );
        client.batch_execute(&listen).await.map_err(fail)?;
        // Fail now, not on every claim, when the table is missing.
        client
            .batch_execute(&format!("SELECT 1 FROM {} LIMIT 0", self.table))
            .await
            .map_err(|e| SourceError::Connect(format!("table {}: {e}", self.config.table)))?;
        self.connected = Some(Connected {
            client,
            notified,
            in_transaction: false,
        });
        Ok(())
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<(i64, Received)>, SourceError> {
        let max = max.max(1);
        let claimed = self.claim(max).await?;
        if !claimed.is_empty() {
            return Ok(claimed);
        }
        let notified = self.connected()?.notified.clone();
        let _ = tokio::time::timeout(self.config.poll_interval, notified.notified()).await;
        self.claim(max).await
    }

    async fn settle(&mut self, settled: Vec<(i64, Outcome)>) -> Result<(), SourceError> {
        let sql = format!("DELETE FROM {} WHERE id = ANY($1)", self.table);
        let connected = self.connected()?;
        if !connected.in_transaction {
            return Ok(());
        }
        let fail = |e: tokio_postgres::Error| SourceError::Settle(e.to_string());
        // Rejected rows are deleted too (logged by the loop): kept, they would block nothing
        // but be claimed again forever.
        let ids: Vec<i64> = settled.into_iter().map(|(id, _)| id).collect();
        if !ids.is_empty() {
            connected
                .client
                .execute(&sql, &[&ids])
                .await
                .map_err(fail)?;
        }
        // Rows left out are unlocked by the commit and claimed again.
        connected.commit().await.map_err(fail)
    }

    async fn lag(&mut self) -> Option<u64> {
        let sql = format!("SELECT count(*) FROM {}", self.table);
        let connected = self.connected.as_ref()?;
        let row = connected.client.query_one(&sql, &[]).await.ok()?;
        row.try_get::<_, i64>(0).ok().map(|n| n as u64)
    }

    async fn disconnect(&mut self) {
        // Dropping the client closes the connection; an open claim rolls back.
        self.connected = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_quoted() {
        assert_eq!(
            quote_identifier("herald_outbox"),
            Ok("\"herald_outbox\"".into())
        );
        assert_eq!(
            quote_identifier("app.outbox"),
            Ok("\"app\".\"outbox\"".into())
        );
        for bad in ["", "a.b.c", "1x", "x;drop", "a b", "\"x\"", "a."] {
            assert!(quote_identifier(bad).is_err(), "{bad:?}");
        }
        assert!(ddl("x;", "c").is_err());
        let sql = ddl("herald_outbox", "herald_outbox").expect("valid");
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"herald_outbox\""));
        assert!(sql.contains("pg_notify('herald_outbox'"));
    }
}
