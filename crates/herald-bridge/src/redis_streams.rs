//! Redis Streams source: a consumer group on one stream (`XREADGROUP`), `XACK` after publish,
//! and `XAUTOCLAIM` of entries another consumer read and did not acknowledge within
//! `claim_idle` (a node that died), so several Herald nodes share a stream and nothing read
//! by a dead one is lost.
//!
//! After each (re)connect this consumer first reads its own pending entries (`XREADGROUP …
//! 0`): what it read before a dropped connection and did not acknowledge. The group is created
//! (`MKSTREAM`) at `start` (`$`: only new entries; `0`: the whole stream) when missing.
//!
//! Consumers that hold nothing and stayed idle for twice `claim_idle` (nodes that stopped or
//! died) are removed from the group.
//!
//! A message's attributes: `stream`, `field.NAME` for every field of the entry but the body
//! field; its body is the `body_field` (default `data`); its id the entry id.
//!
//! May touch: the configured Redis server (its stream and group only).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamInfoGroupsReply,
    StreamReadReply,
};
use redis::{AsyncConnectionConfig, Value};

use crate::mapping::Received;
use crate::source::{Outcome, Source, SourceError};

/// What a Redis Streams source reads.
#[derive(Clone, Debug)]
pub struct RedisStreamConfig {
    /// `redis://host:port/db` (or `rediss://`).
    pub url: String,
    pub stream: String,
    pub group: String,
    /// This node's consumer name in the group (unique per node).
    pub consumer: String,
    /// The entry field holding the message body.
    pub body_field: String,
    /// Where a new group starts: `$` (new entries) or `0` (everything in the stream).
    pub start: String,
    /// Entries pending longer than this with another consumer are claimed.
    pub claim_idle: Duration,
    /// How the connection is named on the broker (to find it in its client list).
    pub connection_name: String,
}

/// The attributes templates may name.
pub const ATTRIBUTES: &[&str] = &["stream", "field.", "id"];

pub struct RedisStreamSource {
    config: RedisStreamConfig,
    connection: Option<MultiplexedConnection>,
    /// Read our own pending entries before new ones (after each connect).
    own_pending: bool,
    last_claim: Option<Instant>,
}

impl RedisStreamSource {
    pub fn new(config: RedisStreamConfig) -> Self {
        Self {
            config,
            connection: None,
            own_pending: true,
            last_claim: None,
        }
    }

    fn connection(&mut self) -> Result<&mut MultiplexedConnection, SourceError> {
        self.connection.as_mut().ok_or(SourceError::NotConnected)
    }

    async fn read_group(
        &mut self,
        id: &str,
        max: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamId>, SourceError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.config.consumer)
            .arg("COUNT")
            .arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.config.stream).arg(id);
        let reply: Option<StreamReadReply> = cmd
            .query_async(self.connection()?)
            .await
            .map_err(|e| SourceError::Receive(e.to_string()))?;
        Ok(reply
            .map(|reply| reply.keys.into_iter().flat_map(|key| key.ids).collect())
            .unwrap_or_default())
    }

    /// Claims entries other consumers left pending longer than `claim_idle`.
    async fn claim(&mut self, max: usize) -> Result<Vec<StreamId>, SourceError> {
        let idle = self.config.claim_idle.as_millis() as u64;
        let mut claimed = Vec::new();
        let mut cursor = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&self.config.stream)
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(idle)
                .arg(&cursor)
                .arg("COUNT")
                .arg(max - claimed.len())
                .query_async(self.connection()?)
                .await
                .map_err(|e| SourceError::Receive(format!("XAUTOCLAIM: {e}")))?;
            claimed.extend(reply.claimed);
            cursor = reply.next_stream_id;
            if cursor == "0-0" || claimed.len() >= max {
                break;
            }
        }
        if !claimed.is_empty() {
            tracing::info!(stream = %self.config.stream, claimed = claimed.len(), "claimed entries an idle consumer left pending");
        }
        self.forget_idle_consumers().await?;
        Ok(claimed)
    }

    /// Removes consumers of the group that hold nothing and have been idle for twice
    /// `claim_idle`: the names of nodes that stopped or died (each node joins under a new
    /// name), which would otherwise pile up in the group. A live consumer reads at least every
    /// second, so it is never idle that long; were it removed, its next read adds it again.
    async fn forget_idle_consumers(&mut self) -> Result<(), SourceError> {
        let idle_ms = self.config.claim_idle.as_millis().saturating_mul(2);
        let reply: StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .query_async(self.connection()?)
            .await
            .map_err(|e| SourceError::Receive(format!("XINFO CONSUMERS: {e}")))?;
        for consumer in reply.consumers {
            if consumer.pending == 0
                && consumer.idle as u128 > idle_ms
                && consumer.name != self.config.consumer
            {
                let _: u64 = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&self.config.stream)
                    .arg(&self.config.group)
                    .arg(&consumer.name)
                    .query_async(self.connection()?)
                    .await
                    .map_err(|e| SourceError::Receive(format!("XGROUP DELCONSUMER: {e}")))?;
                tracing::info!(stream = %self.config.stream, consumer = %consumer.name, "removed an idle consumer that held nothing");
            }
        }
        Ok(())
    }

    fn received(&self, entry: StreamId) -> (String, Received) {
        let mut message = Received::default()
            .with("stream", self.config.stream.clone())
            .with_id(entry.id.clone());
        let mut fields: Vec<(String, Value)> = entry.map.into_iter().collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, value) in fields {
            let bytes = value_bytes(value);
            if name == self.config.body_field {
                message.body = bytes;
            } else {
                message.attributes.push((
                    format!("field.{name}"),
                    String::from_utf8_lossy(&bytes).into(),
                ));
            }
        }
        (entry.id, message)
    }
}

fn value_bytes(value: Value) -> Bytes {
    match value {
        Value::BulkString(bytes) => bytes.into(),
        Value::SimpleString(text) => text.into_bytes().into(),
        Value::Int(n) => n.to_string().into_bytes().into(),
        _ => Bytes::new(),
    }
}

#[async_trait]
impl Source for RedisStreamSource {
    type Receipt = String;

    async fn connect(&mut self) -> Result<(), SourceError> {
        let client = redis::Client::open(self.config.url.as_str())
            .map_err(|e| SourceError::Connect(e.to_string()))?;
        // Responses wait at most the 1 s block plus a margin.
        let options = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&options)
            .await
            .map_err(|e| SourceError::Connect(e.to_string()))?;
        let _: () = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&self.config.connection_name)
            .query_async(&mut connection)
            .await
            .map_err(|e| SourceError::Connect(e.to_string()))?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&self.config.start)
            .arg("MKSTREAM")
            .query_async(&mut connection)
            .await;
        match created {
            Ok(()) => {}
            Err(error) if error.code() == Some("BUSYGROUP") => {}
            Err(error) => return Err(SourceError::Connect(format!("XGROUP CREATE: {error}"))),
        }
        self.connection = Some(connection);
        self.own_pending = true;
        Ok(())
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<(String, Received)>, SourceError> {
        let max = max.max(1);
        if self.own_pending {
            let entries = self.read_group("0", max, None).await?;
            if !entries.is_empty() {
                return Ok(entries.into_iter().map(|e| self.received(e)).collect());
            }
            self.own_pending = false;
        }
        let claim_every = (self.config.claim_idle / 2).max(Duration::from_millis(100));
        if self.last_claim.is_none_or(|at| at.elapsed() >= claim_every) {
            self.last_claim = Some(Instant::now());
            let claimed = self.claim(max).await?;
            if !claimed.is_empty() {
                // Claimed entries are ours now: read from our pending list until it is empty.
                self.own_pending = true;
                return Ok(claimed.into_iter().map(|e| self.received(e)).collect());
            }
        }
        let entries = self
            .read_group(">", max, Some(Duration::from_secs(1)))
            .await?;
        Ok(entries.into_iter().map(|e| self.received(e)).collect())
    }

    async fn settle(&mut self, settled: Vec<(String, Outcome)>) -> Result<(), SourceError> {
        if settled.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = settled.into_iter().map(|(id, _)| id).collect();
        let stream = self.config.stream.clone();
        let group = self.config.group.clone();
        let _: u64 = redis::cmd("XACK")
            .arg(stream)
            .arg(group)
            .arg(&ids)
            .query_async(self.connection()?)
            .await
            .map_err(|e| SourceError::Settle(e.to_string()))?;
        Ok(())
    }

    async fn lag(&mut self) -> Option<u64> {
        let group = self.config.group.clone();
        let stream = self.config.stream.clone();
        let reply: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(self.connection.as_mut()?)
            .await
            .ok()?;
        let group = reply.groups.into_iter().find(|g| g.name == group)?;
        // Entries not yet delivered to the group, plus those delivered and not acknowledged.
        Some(group.lag? as u64 + group.pending as u64)
    }

    async fn disconnect(&mut self) {
        self.connection = None;
    }
}
