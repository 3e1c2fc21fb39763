//! The one place that turns validated configuration into running objects: the node and its
//! store, API keys, token keys and revocations, TLS, the backend proxy, the trusted proxies,
//! generated secrets, the one outbound queue (push, webhooks) and the application state. Anything that does not build is a
//! [`BuildError`] that stops start-up (or `herald check-config`): there is no silent fallback
//! — no in-memory store for a configured one that failed, no token verifier that refuses
//! everything, no proxy that quietly becomes `None`.
//!
//! [`check`] builds what has no side effects, for `check-config`; [`server`] builds
//! everything, for [`crate::Server::run`]. SIGHUP rebuilds the reloadable parts through
//! [`Reloader`].
//!
//! May touch: the data folder (generated secrets, revocations file, the SQLite store), the
//! TLS and key files named by the config.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use herald_core::memory::{MemoryHistoryStore, MemoryPresenceStore};
use herald_core::node::{Backends, NodeConfig};
use herald_core::proxy::BackendProxy;
use herald_core::{HistoryStore, LocalEngine, Node};
use herald_transport::realtime::RealtimeState;

use crate::app::AppState;
use crate::auth::ApiKeys;
use crate::cluster::Cluster;
use crate::config::{Config, ConfigError, Engine, TokenConfig};
use crate::forwarded::ProxyTrust;
use crate::jwt::revocation::{REVOCATIONS_FILE, RevocationFileError};
use crate::jwt::{KeyError, KeySet, TokenVerifier};
use crate::outbound::OutboundStores;
use crate::secrets::{GeneratedSecrets, SecretsError};
use crate::tls::{Tls, TlsError};

/// Why the configuration could not be turned into a running server.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the history store: {0}")]
    Store(String),
    #[error("this build has no {0} support (enable the cargo feature)")]
    Unsupported(&'static str),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("token keys: {0}")]
    TokenKeys(#[from] KeyError),
    #[error("proxy.{key}: {detail}")]
    Proxy { key: &'static str, detail: String },
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Revocations(#[from] RevocationFileError),
    #[error("server.trusted_proxies: {0}")]
    TrustedProxies(String),
    #[error("push: {0}")]
    Push(String),
    #[error("{0}")]
    Sources(String),
    #[error("webhooks: {0}")]
    Webhooks(String),
    #[error("sinks: {0}")]
    Sink(String),
    #[error("mqtt: cannot listen on {addr}: {error}")]
    Mqtt {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
}

/// The objects that build without side effects (no file written, no socket, no runtime).
struct Parts {
    api_keys: ApiKeys,
    token_keys: KeySet,
    tls: Option<Arc<Tls>>,
    proxy: Option<Arc<dyn BackendProxy>>,
    proxy_trust: ProxyTrust,
    node_config: NodeConfig,
}

fn parts(config: &Config) -> Result<Parts, BuildError> {
    config.validate()?;
    if config.push.enabled {
        // Reads the providers' key files, so a bad one fails check-config too.
        crate::push::senders(&config.push).map_err(BuildError::Push)?;
    }
    crate::bridge::check(&config.sources).map_err(BuildError::Sources)?;
    crate::sink::check(&config.sinks).map_err(BuildError::Sink)?;
    let tls = match config.server.tls_files() {
        Some((cert, key)) => {
            crate::tls::install_crypto_provider();
            Some(Tls::load(cert, key)?)
        }
        None => None,
    };
    Ok(Parts {
        api_keys: config.api.api_keys()?,
        token_keys: KeySet::from_config(&config.token)?,
        tls,
        proxy: backend_proxy(config)?,
        proxy_trust: ProxyTrust::new(
            &config.server.trusted_proxies,
            config.server.forwarded_header,
        )
        .map_err(BuildError::TrustedProxies)?,
        node_config: node_config(config)?,
    })
}

/// Builds everything that has no side effects and drops it: what `herald check-config` and a
/// reload check. A bad TLS file, key or proxy URL is reported here, naming it.
pub fn check(config: &Config) -> Result<(), BuildError> {
    parts(config).map(drop)
}

pub fn node_config(config: &Config) -> Result<NodeConfig, BuildError> {
    Ok(NodeConfig {
        name: config.server.name.clone(),
        channel_rules: config.channels.clone(),
        namespaces: config.namespaces()?,
        max_publication_size: config.server.max_publication_size,
    })
}

/// The backend proxy when any `[proxy]` endpoint is set; every endpoint must be a full URL.
fn backend_proxy(config: &Config) -> Result<Option<Arc<dyn BackendProxy>>, BuildError> {
    if !config.proxy.is_enabled() {
        return Ok(None);
    }
    for (key, url) in config.proxy.endpoints() {
        if url.is_empty() {
            continue;
        }
        let parsed = reqwest::Url::parse(url).map_err(|error| BuildError::Proxy {
            key,
            detail: format!("{url:?} is not a usable URL: {error}"),
        })?;
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(BuildError::Proxy {
                key,
                detail: format!("{url:?} has no host"),
            });
        }
    }
    let proxy =
        crate::proxy::HttpProxy::new(&config.proxy).map_err(|detail| BuildError::Proxy {
            key: "timeout",
            detail: format!("cannot build the HTTP client: {detail}"),
        })?;
    Ok(Some(Arc::new(proxy)))
}

/// Builds the node with the configured engine (and, with Redis, the cluster handle). Needs a
/// Tokio runtime; connects to Redis, failing when it cannot be reached.
async fn build_node(
    config: &Config,
    node_config: NodeConfig,
) -> Result<(Node, Option<Arc<Cluster>>), BuildError> {
    let (feed, queue) = herald_core::fanout::channel();
    let listener = Arc::new(feed.clone());
    let history: Arc<dyn HistoryStore> = match config.storage.engine {
        Engine::Memory => Arc::new(MemoryHistoryStore::new(listener)),
        Engine::Sqlite => open_sqlite(config, listener)?,
        Engine::Redis => return build_cluster_node(config, node_config, feed, queue).await,
    };
    let backends = Backends {
        engine: Arc::new(LocalEngine::new(history, feed.clone())),
        presence: Arc::new(MemoryPresenceStore::new()),
    };
    Ok((Node::new(node_config, backends, feed, queue), None))
}

#[cfg(feature = "redis")]
async fn build_cluster_node(
    config: &Config,
    node_config: NodeConfig,
    feed: herald_core::fanout::FanoutFeed,
    queue: herald_core::fanout::FanoutQueue,
) -> Result<(Node, Option<Arc<Cluster>>), BuildError> {
    use herald_store::redis::{NodeRegistry, RedisEngine};
    let (engine, presence) = RedisEngine::connect(&config.redis, feed.clone())
        .await
        .map_err(|e| BuildError::Store(e.to_string()))?;
    let engine = Arc::new(engine);
    let registry = NodeRegistry::new(engine.shards().clone(), config.redis.node_ttl.as_duration());
    let backends = Backends {
        engine: engine.clone(),
        presence: Arc::new(presence),
    };
    let node = Node::new(node_config, backends, feed, queue);
    Ok((node, Some(Arc::new(Cluster::new(engine, registry)))))
}

#[cfg(not(feature = "redis"))]
async fn build_cluster_node(
    _config: &Config,
    _node_config: NodeConfig,
    _feed: herald_core::fanout::FanoutFeed,
    _queue: herald_core::fanout::FanoutQueue,
) -> Result<(Node, Option<Arc<Cluster>>), BuildError> {
    Err(BuildError::Unsupported("redis"))
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

/// The generated HMAC secret verifies tokens only when no token key is configured at all:
/// with `[[token.keys]]` or a JWKS, an extra HMAC key would let anyone who can read the data
/// folder mint tokens.
fn use_generated_token_secret(token: &mut TokenConfig, generated: Option<&GeneratedSecrets>) {
    if token.hmac_secret.is_empty()
        && token.keys.is_empty()
        && token.jwks_url.is_empty()
        && let Some(secrets) = generated
    {
        token.hmac_secret = secrets.hmac_secret.clone();
    }
}

/// A built server, not yet listening: [`crate::Server::run`] serves it.
#[derive(Debug)]
pub struct Built {
    pub state: Arc<AppState>,
    pub reloader: Reloader,
}

/// Builds the whole server from `config`. Needs a Tokio runtime (the node's fan-out task).
///
/// Without configured API keys (or without a token secret and keys), secrets are generated:
/// kept in the data folder with SQLite, in memory with the memory engine. With SQLite, token
/// revocations are kept in the data folder too.
pub async fn server(mut config: Config) -> Result<Built, BuildError> {
    // Everything without side effects first, so that a bad file fails before any is written.
    parts(&config)?;
    let generated = match config.storage.engine {
        _ if config.api.has_keys() && !config.token.hmac_secret.is_empty() => None,
        Engine::Sqlite => Some(GeneratedSecrets::load_or_create(&config.storage.data_dir)?),
        Engine::Memory => Some(GeneratedSecrets::generate()),
        // Every node must accept the same keys and tokens: nothing can be generated per node.
        Engine::Redis if config.api.has_keys() && config.token.has_any_key() => None,
        Engine::Redis => {
            return Err(BuildError::Config(ConfigError::Invalid(
                "storage.engine = \"redis\" needs api.keys and a token key (token.hmac_secret, \
                 token.keys or token.jwks_url) in the configuration, shared by every node"
                    .into(),
            )));
        }
    };
    let generated_key = match &generated {
        Some(secrets) if !config.api.has_keys() => {
            config.api.keys.push(secrets.api_key.clone());
            true
        }
        _ => false,
    };
    use_generated_token_secret(&mut config.token, generated.as_ref());
    let parts = parts(&config)?;
    // The store first: it creates the data folder the revocations file lives in.
    let (node, cluster) = build_node(&config, parts.node_config).await?;
    let tokens = Arc::new(TokenVerifier::new(parts.token_keys));
    // Revocations are kept where history is: in the data folder with SQLite, in memory
    // (forgotten on restart, like everything else) with the memory engine.
    if config.storage.engine == Engine::Sqlite {
        let path = config.storage.data_dir.join(REVOCATIONS_FILE);
        let now = herald_core::time::now_ms() / 1000;
        let loaded = tokens.revocations.persist_to(&path, now)?;
        tracing::info!(path = %path.display(), loaded, "token revocations loaded");
    }
    let mut realtime_config = config.client.realtime(process_memory_limit());
    realtime_config.proxy_headers = config
        .proxy
        .http_headers
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    let outbound = build_outbound(&config, cluster.as_ref())?;
    let webhooks = match (&outbound, config.webhooks.enabled) {
        (Some(stores), true) => Some(
            crate::webhook::WebhookRuntime::build(config.webhooks.clone(), stores, &node)
                .await
                .map_err(BuildError::Webhooks)?,
        ),
        _ => None,
    };
    let push_events = webhooks.as_ref().map(|w| w.push_events());
    let push = build_push(&config, outbound.as_ref(), push_events)?;
    let sources =
        crate::bridge::Sources::new(&config.sources, node.uid()).map_err(BuildError::Sources)?;
    let sinks = build_sinks(&config, outbound.as_ref()).await?;
    if let Some(sinks) = &sinks {
        node.observe_publications(Arc::new(crate::sink::SinkObserver {
            runtime: sinks.clone(),
            node: node.clone(),
        }));
    }
    let client_methods = push.clone().map(|push| {
        let live = Arc::new(crate::push::live::LiveFirst {
            push: push.clone(),
            node: node.clone(),
        });
        node.observe_publications(live.clone());
        Arc::new(crate::push::client::PushClientMethods { push, live })
            as Arc<dyn herald_core::client_methods::ClientMethods>
    });
    let realtime = Arc::new(
        RealtimeState::new(node.clone(), tokens.clone(), realtime_config)
            .with_proxy(parts.proxy)
            .with_client_methods(client_methods),
    );
    let mqtt = if config.mqtt.enabled {
        Some(crate::mqtt::MqttRuntime::bind(
            &config,
            realtime.clone(),
            outbound.as_ref().map(|stores| stores.webhooks.clone()),
        )?)
    } else {
        None
    };
    let state = Arc::new(AppState {
        mqtt,
        push,
        sources,
        webhooks,
        outbound,
        sinks,
        node,
        cluster,
        api_keys: parking_lot::RwLock::new(parts.api_keys),
        publish_rate: herald_core::rate::KeyedLimiter::new(config.api.publish_rate_per_key, 4096),
        metrics: crate::metrics::Metrics::new(),
        realtime,
        ready: AtomicBool::new(false),
        tls: parts.tls,
        tokens,
        proxy_trust: Arc::new(parts.proxy_trust),
        config,
    });
    // A node that joins a cluster refuses what the others revoked before it started.
    #[cfg(feature = "redis")]
    if let Some(cluster) = &state.cluster {
        let applied = cluster
            .apply_kept(&state)
            .await
            .map_err(|e| BuildError::Store(format!("reading the cluster's revocations: {e}")))?;
        tracing::info!(applied, "cluster revocations applied");
    }
    let reloader = Reloader {
        state: state.clone(),
        generated,
        generated_key,
    };
    Ok(Built { state, reloader })
}

/// The one outbound queue of this server and the stores beside it, when push, webhooks,
/// sinks or MQTT's persistent sessions need them: where history lives (the data folder's `outbound.db` with SQLite, memory with
/// the memory engine, the cluster's Redis).
fn build_outbound(
    config: &Config,
    cluster: Option<&Arc<Cluster>>,
) -> Result<Option<OutboundStores>, BuildError> {
    let sinks = config.sinks.iter().any(|sink| sink.enabled);
    // MQTT keeps persistent sessions in the document store beside the queue.
    if !(config.push.enabled || config.webhooks.enabled || sinks || config.mqtt.enabled) {
        return Ok(None);
    }
    let stores = match config.storage.engine {
        Engine::Memory => OutboundStores {
            queue: Arc::new(herald_core::memory_outbound::MemoryOutboundQueue::new()),
            devices: Arc::new(herald_core::memory_devices::MemoryDeviceStore::new()),
            webhooks: Arc::new(herald_core::webhook_store::MemoryWebhookStore::new()),
        },
        Engine::Sqlite => open_outbound_sqlite(config)?,
        Engine::Redis => cluster_outbound_stores(cluster)?,
    };
    Ok(Some(stores))
}

/// The sinks and their workers, with enabled `[[sinks]]`, on the outbound queue.
async fn build_sinks(
    config: &Config,
    outbound: Option<&OutboundStores>,
) -> Result<Option<Arc<crate::sink::SinkRuntime>>, BuildError> {
    let Some(stores) = outbound else {
        return Ok(None);
    };
    let runtime = crate::sink::SinkRuntime::build(&config.sinks, stores.queue.clone())
        .await
        .map_err(BuildError::Sink)?;
    Ok(runtime.map(Arc::new))
}

/// How long finished outbound jobs are kept: the longest any enabled part asks for.
pub fn outbound_retention(config: &Config) -> Option<crate::outbound::Retention> {
    let push = config.push.enabled.then(|| crate::outbound::Retention {
        keep: config.push.status_retention.as_duration(),
        every: config.push.maintenance_interval.as_duration(),
    });
    let webhooks = config.webhooks.enabled.then(|| crate::outbound::Retention {
        keep: config.webhooks.status_retention.as_duration(),
        every: config.webhooks.maintenance_interval.as_duration(),
    });
    // Finished sink jobs are kept a day: after a crash a sink re-queues up to an hour of a
    // channel's publications by job id, and only ids still known are skipped.
    let sinks =
        config
            .sinks
            .iter()
            .any(|sink| sink.enabled)
            .then_some(crate::outbound::Retention {
                keep: std::time::Duration::from_secs(24 * 3600),
                every: std::time::Duration::from_secs(600),
            });
    [push, webhooks, sinks]
        .into_iter()
        .flatten()
        .reduce(crate::outbound::Retention::merge)
}

/// The push runtime, with `[push] enabled = true`, on the server's outbound stores.
fn build_push(
    config: &Config,
    stores: Option<&OutboundStores>,
    events: Option<Arc<dyn herald_outbound::push::deliver::PushEvents>>,
) -> Result<Option<Arc<crate::push::PushRuntime>>, BuildError> {
    let (true, Some(stores)) = (config.push.enabled, stores) else {
        return Ok(None);
    };
    let senders = crate::push::senders(&config.push).map_err(BuildError::Push)?;
    Ok(Some(Arc::new(crate::push::PushRuntime::new(
        config.push.clone(),
        stores.queue.clone(),
        stores.devices.clone(),
        senders,
        events,
    ))))
}

/// In a cluster the queue, the registry and the webhook endpoints live on the cluster's
/// Redis (its first shard), so every node sees every device and endpoint and any node may
/// send any job.
#[cfg(feature = "redis")]
fn cluster_outbound_stores(cluster: Option<&Arc<Cluster>>) -> Result<OutboundStores, BuildError> {
    let cluster = cluster.ok_or(BuildError::Unsupported(
        "outbound without the cluster engine",
    ))?;
    let (queue, devices) = cluster.engine.outbound();
    Ok(OutboundStores {
        queue: Arc::new(queue),
        devices: Arc::new(devices),
        webhooks: Arc::new(cluster.engine.webhooks()),
    })
}

#[cfg(not(feature = "redis"))]
fn cluster_outbound_stores(_cluster: Option<&Arc<Cluster>>) -> Result<OutboundStores, BuildError> {
    Err(BuildError::Unsupported("redis"))
}

#[cfg(feature = "sqlite")]
fn open_outbound_sqlite(config: &Config) -> Result<OutboundStores, BuildError> {
    let db = herald_store::sqlite::OutboundDb::open(&config.sqlite())
        .map_err(|e| BuildError::Store(e.to_string()))?;
    Ok(OutboundStores {
        queue: Arc::new(db.queue()),
        devices: Arc::new(db.devices()),
        webhooks: Arc::new(db.webhooks()),
    })
}

#[cfg(not(feature = "sqlite"))]
fn open_outbound_sqlite(_config: &Config) -> Result<OutboundStores, BuildError> {
    Err(BuildError::Unsupported("sqlite"))
}

/// The memory this process may use: the cgroup's limit (v2 `memory.max`, v1
/// `memory.limit_in_bytes`) when it is lower than the machine's `MemTotal`. `None` where
/// neither can be read (not Linux).
pub fn process_memory_limit() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| meminfo_total(&text));
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    });
    match (total, cgroup) {
        (Some(total), Some(limit)) => Some(total.min(limit)),
        (total, limit) => total.or(limit),
    }
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Applies a re-read config (SIGHUP) to a running server: API keys, token keys and the TLS
/// certificate. Secrets generated at start-up are kept under the same rules as then. What
/// does not build keeps what is in use, and says so in the log.
#[derive(Clone, Debug)]
pub struct Reloader {
    state: Arc<AppState>,
    generated: Option<GeneratedSecrets>,
    generated_key: bool,
}

impl Reloader {
    /// The API key generated at start-up, when no key was configured (for the banner).
    pub fn generated_api_key(&self) -> Option<&str> {
        self.generated
            .as_ref()
            .filter(|_| self.generated_key)
            .map(|secrets| secrets.api_key.as_str())
    }

    pub fn apply(&self, mut config: Config) {
        let state = &self.state;
        if let Some(key) = self.generated_api_key()
            && !config.api.has_keys()
        {
            config.api.keys.push(key.to_owned());
        }
        match config.api.api_keys() {
            Ok(keys) => {
                let count = keys.len();
                *state.api_keys.write() = keys;
                tracing::info!(keys = count, "SIGHUP: API keys reloaded");
            }
            Err(error) => {
                tracing::error!(error = %error, "SIGHUP: API keys not reloaded; the ones in use stay");
            }
        }
        use_generated_token_secret(&mut config.token, self.generated.as_ref());
        match KeySet::from_config(&config.token) {
            Ok(keys) => {
                if keys.is_empty() {
                    tracing::warn!("SIGHUP: no token key configured; every token is refused");
                }
                state.tokens.replace_keys(keys);
                tracing::info!("SIGHUP: token keys reloaded");
            }
            Err(error) => {
                tracing::error!(error = %error, "SIGHUP: token keys not reloaded; the ones in use stay");
            }
        }
        if let Some(tls) = &state.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Err(error) => {
                    tracing::error!(error = %error, "SIGHUP: TLS certificate not reloaded; the one in use stays")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_total_is_read_from_meminfo() {
        let text = "MemTotal:       24576000 kB\nMemFree:  1 kB\n";
        assert_eq!(meminfo_total(text), Some(24_576_000 * 1024));
        assert_eq!(meminfo_total("MemFree: 1 kB"), None);
        assert_eq!(meminfo_total("MemTotal: lots kB"), None);
    }

    #[test]
    fn the_queue_budget_defaults_to_a_quarter_of_memory() {
        let client = crate::config::ClientConfig::default();
        assert_eq!(
            client.realtime(Some(8 << 30)).max_total_queue_bytes,
            2 << 30
        );
        assert_eq!(client.realtime(None).max_total_queue_bytes, 0);
        let set = crate::config::ClientConfig {
            max_total_queue_bytes: Some(0),
            ..crate::config::ClientConfig::default()
        };
        assert_eq!(set.realtime(Some(8 << 30)).max_total_queue_bytes, 0);
    }
}
