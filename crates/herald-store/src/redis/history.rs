//! One shard's streams: publish (store + pub/sub in one script), read, remove.
//!
//! Owns: [`ShardStore`], the commands of one Redis shard for the channels that hash to it,
//! and the conversions between script replies and Herald's types.
//!
//! May touch: the shard's Redis, through its [`Link`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::engine::{Publish, Published, deadline_after};
use herald_core::publication::{Publication, StreamPosition, new_epoch};
use herald_core::sequence::History;
use herald_core::store::{HistoryPage, HistoryQuery, StoreError, check_since};
use herald_core::time::now_ms;
use redis::Value;

use super::codec;
use super::conn::Link;
use super::scripts::{Keys, PUBLISH, READ};

/// One shard's history and publishing.
#[derive(Debug)]
pub(crate) struct ShardStore {
    pub(crate) link: Arc<Link>,
    pub(crate) keys: Keys,
    /// How long a channel's offset and epoch outlive its last publication.
    meta_ttl: Duration,
    /// Replicas that must have a publication before it is acknowledged (0: the primary's
    /// answer is enough), and how long to wait for them.
    replicas: (u32, Duration),
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn malformed(detail: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("unexpected reply from redis: {detail}"))
}

/// `"offset:epoch"` as the publish script returns it.
fn parse_position(text: &str) -> Result<Option<StreamPosition>, StoreError> {
    if text.is_empty() {
        return Ok(None);
    }
    let (offset, epoch) = text
        .split_once(':')
        .ok_or_else(|| malformed("position without a colon"))?;
    let offset = offset.parse::<u64>().map_err(malformed)?;
    Ok(Some(StreamPosition::new(offset, epoch)))
}

impl ShardStore {
    pub(crate) fn new(
        link: Arc<Link>,
        keys: Keys,
        meta_ttl: Duration,
        replicas: (u32, Duration),
    ) -> Self {
        Self {
            link,
            keys,
            meta_ttl,
            replicas,
        }
    }

    /// Replicas a write must reach before it is acknowledged, and how long to wait for them
    /// (`redis.wait_replicas`, `redis.wait_timeout`).
    pub(crate) fn replicas(&self) -> (u32, Duration) {
        self.replicas
    }

    pub(crate) async fn publish(&self, publish: Publish) -> Result<Published, StoreError> {
        let channel = &*publish.channel;
        let stored = codec::encode_publication(&publish.publication)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let now = now_ms();
        let (size, ttl) = match publish.history {
            Some(retention) => (retention.size, retention.ttl),
            None => (0, Duration::ZERO),
        };
        // The offset and epoch must outlive the stream, or a client coming back after the
        // stream expired would be told offset 1 of a "new" stream is what it missed.
        let meta_ttl = if self.meta_ttl.is_zero() {
            Duration::ZERO
        } else {
            self.meta_ttl.max(ttl + Duration::from_secs(60))
        };
        let (idempotency_key, window) = match &publish.idempotency {
            Some((key, window)) => (self.keys.idempotency(channel, key), *window),
            None => (String::new(), Duration::ZERO),
        };
        let expires = if ttl.is_zero() {
            0
        } else {
            deadline_after(now, ttl)
        };
        let mut invocation = PUBLISH.key(self.keys.stream(channel));
        invocation
            .key(self.keys.meta(channel))
            .key(idempotency_key)
            .arg(stored)
            .arg(size)
            .arg(millis(ttl))
            .arg(millis(meta_ttl))
            .arg(new_epoch())
            .arg(millis(window).max(1))
            .arg(self.keys.pubsub(channel))
            .arg(now)
            .arg(expires);
        let (replicas, replica_timeout) = self.replicas;
        let (duplicate, position, confirmed): (u8, String, u32) = self
            .link
            .run(|mut connection| async move {
                let (duplicate, position): (u8, String) =
                    invocation.invoke_async(&mut connection).await?;
                if replicas == 0 {
                    return Ok((duplicate, position, 0));
                }
                // WAIT counts the replicas that have every write made on this connection so
                // far, this publication's included.
                let confirmed: u32 = redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(millis(replica_timeout))
                    .query_async(&mut connection)
                    .await?;
                Ok((duplicate, position, confirmed))
            })
            .await?;
        if confirmed < replicas {
            return Err(StoreError::Unavailable(format!(
                "stored on the primary but confirmed by {confirmed} of {replicas} replicas \
                 within {replica_timeout:?}; retry with the same idempotency key"
            )));
        }
        Ok(Published {
            position: parse_position(&position)?,
            duplicate: duplicate == 1,
        })
    }

    pub(crate) async fn announce(&self, channel: &str, message: Vec<u8>) -> Result<(), StoreError> {
        let pubsub = self.keys.pubsub(channel);
        self.link
            .query::<()>(redis::cmd("PUBLISH").arg(pubsub).arg(message).to_owned())
            .await
    }

    pub(crate) async fn read_page(
        &self,
        channel: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, StoreError> {
        let (direction, bound) = match (&query.since, query.reverse) {
            _ if query.limit == Some(0) => ("n", "-".to_owned()),
            (Some(since), true) if since.offset == 0 => ("n", "-".to_owned()),
            (Some(since), false) => ("f", format!("(0-{}", since.offset)),
            (Some(since), true) => ("r", format!("(0-{}", since.offset)),
            (None, false) => ("f", "-".to_owned()),
            (None, true) => ("r", "+".to_owned()),
        };
        let count = query.limit.unwrap_or(0);
        let mut invocation = READ.key(self.keys.stream(channel));
        invocation
            .key(self.keys.meta(channel))
            .arg(new_epoch())
            .arg(millis(self.meta_ttl))
            .arg(direction)
            .arg(bound)
            .arg(count);
        let reply: Value = self
            .link
            .run(|mut connection| async move { invocation.invoke_async(&mut connection).await })
            .await?;
        let (top, entries) = parse_read(reply)?;
        if let Some(since) = &query.since {
            check_since(since, &top)?;
        }
        let now = now_ms();
        let mut publications = Vec::with_capacity(entries.len());
        for (offset, expires, bytes) in entries {
            if expires != 0 && expires <= now {
                continue;
            }
            let publication: Publication = codec::decode_publication(offset, &bytes)
                .map_err(|e| StoreError::Backend(format!("stream of {channel:?}: {e}")))?;
            publications.push(publication);
        }
        Ok(HistoryPage {
            publications,
            position: top,
        })
    }

    pub(crate) async fn remove(&self, channel: &str) -> Result<(), StoreError> {
        let stream = self.keys.stream(channel);
        self.link
            .query::<()>(redis::cmd("DEL").arg(stream).to_owned())
            .await
    }
}

#[async_trait]
impl History for ShardStore {
    async fn read(&self, channel: &str, query: HistoryQuery) -> Result<HistoryPage, StoreError> {
        self.read_page(channel, query).await
    }
}

type Entry = (u64, u64, Bytes);

fn text(value: &Value) -> Result<String, StoreError> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).map_err(malformed),
        Value::SimpleString(text) => Ok(text.clone()),
        Value::Int(n) => Ok(n.to_string()),
        other => Err(malformed(format!("{other:?} where text was expected"))),
    }
}

/// `{epoch, top, [[id, [field, value, …]], …]}` into the top and `(offset, expires, bytes)`.
fn parse_read(reply: Value) -> Result<(StreamPosition, Vec<Entry>), StoreError> {
    let Value::Array(parts) = reply else {
        return Err(malformed("read reply is not an array"));
    };
    let [epoch, top, entries] =
        <[Value; 3]>::try_from(parts).map_err(|_| malformed("read reply is not three items"))?;
    let epoch = text(&epoch)?;
    let top = text(&top)?.parse::<u64>().map_err(malformed)?;
    let Value::Array(entries) = entries else {
        return Err(malformed("entries are not an array"));
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(entry) = entry else {
            return Err(malformed("entry is not an array"));
        };
        let [id, fields] =
            <[Value; 2]>::try_from(entry).map_err(|_| malformed("entry is not id and fields"))?;
        let id = text(&id)?;
        let offset = id
            .strip_prefix("0-")
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| malformed(format!("entry id {id:?}")))?;
        let Value::Array(fields) = fields else {
            return Err(malformed("entry fields are not an array"));
        };
        let mut expires = 0;
        let mut bytes = None;
        for pair in fields.chunks(2) {
            match pair {
                [Value::BulkString(name), Value::BulkString(value)] if name == b"x" => {
                    expires = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
                [Value::BulkString(name), Value::BulkString(value)] if name == b"p" => {
                    bytes = Some(Bytes::from(value.clone()));
                }
                _ => {}
            }
        }
        let bytes = bytes.ok_or_else(|| malformed("entry without a publication"))?;
        out.push((offset, expires, bytes));
    }
    Ok((StreamPosition::new(top, epoch), out))
}
