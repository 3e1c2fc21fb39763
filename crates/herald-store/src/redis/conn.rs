//! Connections to one Redis shard that never hang and find the shard again.
//!
//! Owns: [`Link`], a few multiplexed command connections to one shard, each command bounded
//! by `command_timeout`; a connection that failed, timed out or answered `READONLY` (a
//! demoted primary after a failover) is dropped and the next command connects again —
//! through the sentinels when the shard has them, so a failed-over primary at a new address
//! is found by itself. Also opens the shard's pub/sub connections.
//!
//! May touch: the shard's Redis (or its sentinels).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use herald_core::store::StoreError;
use redis::aio::{MultiplexedConnection, PubSub};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, RedisError};

/// Where a shard's primary is.
pub(crate) enum Source {
    Direct(Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

impl Source {
    pub(crate) fn direct(url: &str) -> Result<Self, StoreError> {
        Client::open(url)
            .map(Self::Direct)
            .map_err(|e| StoreError::Unavailable(format!("redis address {url:?}: {e}")))
    }

    pub(crate) fn sentinel(master: &str, addresses: &[String]) -> Result<Self, StoreError> {
        SentinelClient::build(
            addresses.to_vec(),
            master.to_owned(),
            None,
            SentinelServerType::Master,
        )
        .map(|client| Self::Sentinel(tokio::sync::Mutex::new(client)))
        .map_err(|e| StoreError::Unavailable(format!("redis sentinels for {master:?}: {e}")))
    }

    /// A client for the shard's current primary (asking the sentinels each time).
    async fn client(&self) -> Result<Client, RedisError> {
        match self {
            Self::Direct(client) => Ok(client.clone()),
            Self::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }
}

/// Timeouts of one shard.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    pub command: Duration,
    pub connect: Duration,
}

/// Command connections to one shard.
pub(crate) struct Link {
    name: String,
    source: Source,
    timeouts: Timeouts,
    slots: Vec<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
    next: AtomicUsize,
    healthy: AtomicBool,
    /// Whether a failure was logged since the last success (one line per outage).
    reported: AtomicBool,
    errors: Arc<AtomicUsize>,
}

/// Whether a failed command means the connection must be replaced.
fn connection_lost(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.code() == Some("READONLY")
        || error.code() == Some("LOADING")
        || error.code() == Some("MASTERDOWN")
}

impl Link {
    pub(crate) fn new(
        name: String,
        source: Source,
        timeouts: Timeouts,
        connections: usize,
    ) -> Self {
        Self {
            name,
            source,
            timeouts,
            slots: (0..connections.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            errors: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Commands that failed because the shard could not be reached.
    pub(crate) fn errors(&self) -> usize {
        self.errors.load(Ordering::Relaxed)
    }

    async fn connect(&self) -> Result<MultiplexedConnection, RedisError> {
        let client = tokio::time::timeout(self.timeouts.connect, self.source.client())
            .await
            .map_err(|_| timeout_error("finding the primary"))??;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeouts.connect))
            .set_response_timeout(Some(self.timeouts.command));
        tokio::time::timeout(
            self.timeouts.connect,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| timeout_error("connecting"))?
    }

    /// A pub/sub connection to the shard's current primary.
    pub(crate) async fn pubsub(&self) -> Result<PubSub, StoreError> {
        let attempt = async {
            let client = self.source.client().await?;
            client.get_async_pubsub().await
        };
        tokio::time::timeout(self.timeouts.connect, attempt)
            .await
            .map_err(|_| self.unavailable("connecting for pub/sub timed out"))?
            .map_err(|e| self.unavailable(&e.to_string()))
    }

    /// Runs `command` on one of the shard's connections (connecting first if needed), within
    /// the command timeout. A connection that failed is replaced on the next command.
    pub(crate) async fn run<T, F, Fut>(&self, command: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[index];
        let connection = {
            let mut guard = slot.lock().await;
            match &*guard {
                Some(connection) => connection.clone(),
                None => match self.connect().await {
                    Ok(connection) => {
                        *guard = Some(connection.clone());
                        connection
                    }
                    Err(error) => return Err(self.failed(&error)),
                },
            }
        };
        let result = tokio::time::timeout(self.timeouts.command, command(connection))
            .await
            .unwrap_or_else(|_| Err(timeout_error("the command")));
        match result {
            Ok(value) => {
                self.succeeded();
                Ok(value)
            }
            Err(error) if connection_lost(&error) => {
                *slot.lock().await = None;
                Err(self.failed(&error))
            }
            Err(error) => {
                self.succeeded();
                Err(StoreError::Backend(format!("redis {}: {error}", self.name)))
            }
        }
    }

    /// Drops every command connection (the pub/sub side saw the server go away: they are
    /// most likely dead too), so the next commands connect afresh instead of failing once on
    /// a stale connection after the server is back.
    pub(crate) async fn reset(&self) {
        for slot in &self.slots {
            *slot.lock().await = None;
        }
    }

    /// Runs one command (see [`Link::run`]).
    pub(crate) async fn query<T: redis::FromRedisValue + Send>(
        &self,
        command: redis::Cmd,
    ) -> Result<T, StoreError> {
        self.run(|mut connection| async move { command.query_async(&mut connection).await })
            .await
    }

    /// Runs a pipeline (see [`Link::run`]).
    pub(crate) async fn pipeline<T: redis::FromRedisValue + Send>(
        &self,
        pipeline: redis::Pipeline,
    ) -> Result<T, StoreError> {
        self.run(|mut connection| async move { pipeline.query_async(&mut connection).await })
            .await
    }

    fn succeeded(&self) {
        self.healthy.store(true, Ordering::Relaxed);
        if self.reported.swap(false, Ordering::Relaxed) {
            tracing::info!(shard = %self.name, "redis reachable again");
        }
    }

    fn failed(&self, error: &RedisError) -> StoreError {
        self.unavailable(&error.to_string())
    }

    pub(crate) fn unavailable(&self, detail: &str) -> StoreError {
        self.healthy.store(false, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        if !self.reported.swap(true, Ordering::Relaxed) {
            tracing::warn!(shard = %self.name, error = detail, "redis unreachable");
        }
        StoreError::Unavailable(format!("redis {}: {detail}", self.name))
    }

    /// Marks the shard reachable (the pub/sub side got through).
    pub(crate) fn reachable(&self) {
        self.succeeded();
    }
}

fn timeout_error(what: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out"),
    ))
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.name)
            .field("healthy", &self.healthy())
            .finish()
    }
}
