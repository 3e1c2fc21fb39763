//! The one place that turns configuration into running objects. A configured backend that
//! fails to start is an error: there is no silent fallback to memory.

use std::sync::Arc;

use herald_core::broker::LocalBroker;
use herald_core::memory::{MemoryHistoryStore, MemoryPresenceStore};
use herald_core::node::{Backends, NodeConfig};
use herald_core::{HistoryStore, Hub, Node};

use crate::config::{Config, Engine};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open the history store: {0}")]
    Store(String),
    #[error("this build has no {0} support (enable the cargo feature)")]
    Unsupported(&'static str),
}

pub fn node_config(config: &Config) -> Result<NodeConfig, BuildError> {
    Ok(NodeConfig {
        name: config.server.name.clone(),
        channel_rules: config.channels.clone(),
        namespaces: config.namespaces()?,
        max_publication_size: config.server.max_publication_size,
    })
}

/// Builds the node with the configured engine. Needs a Tokio runtime.
pub fn build_node(config: &Config) -> Result<Node, BuildError> {
    let node_config = node_config(config)?;
    let hub = Arc::new(Hub::new());
    let (feed, queue) = herald_core::fanout::channel();
    let listener = Arc::new(feed.clone());
    let history: Arc<dyn HistoryStore> = match config.storage.engine {
        Engine::Memory => Arc::new(MemoryHistoryStore::new(listener)),
        Engine::Sqlite => open_sqlite(config, listener)?,
    };
    let backends = Backends {
        history,
        presence: Arc::new(MemoryPresenceStore::new()),
        broker: Arc::new(LocalBroker::new(hub.clone())),
    };
    Ok(Node::new(node_config, backends, hub, feed, queue))
}

#[cfg(feature = "sqlite")]
fn open_sqlite(
    config: &Config,
    listener: Arc<dyn herald_core::CommitListener>,
) -> Result<Arc<dyn HistoryStore>, BuildError> {
    use herald_store::sqlite::SqliteHistoryStore;
    let sqlite = config.sqlite();
    let store = SqliteHistoryStore::open(&sqlite, listener)
        .map_err(|e| BuildError::Store(e.to_string()))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "sqlite"))]
fn open_sqlite(
    _config: &Config,
    _listener: Arc<dyn herald_core::CommitListener>,
) -> Result<Arc<dyn HistoryStore>, BuildError> {
    Err(BuildError::Unsupported("sqlite"))
}
