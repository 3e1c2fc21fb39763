//! Server configuration: one TOML file, `HERALD_*` environment variables and CLI flags,
//! merged by figment in that order (later wins). Unknown keys are rejected with a message that
//! names the key and where it came from.
//!
//! Owns the config schema and the checks that need nothing built; building objects from it
//! (and failing on what does not build) happens in [`crate::build`] only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use herald_core::channel::ChannelRules;
use herald_core::duration::HumanDuration;
use herald_core::namespace::{NamedNamespace, NamespaceOptions, Namespaces};
use serde::{Deserialize, Serialize};

/// Environment variables under this prefix are config; `__` separates nesting levels
/// (`HERALD_SERVER__LISTEN`).
pub const ENV_PREFIX: &str = "HERALD_";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub api: ApiConfig,
    pub token: TokenConfig,
    pub storage: StorageConfig,
    /// The cluster engine's Redis, used with `storage.engine = "redis"`.
    pub redis: herald_store::redis::RedisConfig,
    pub log: LogConfig,
    pub client: ClientConfig,
    pub channels: ChannelRules,
    /// Options of the default namespace (channels without `ns:`).
    pub namespace: NamespaceOptions,
    /// Named namespaces.
    pub namespaces: Vec<NamedNamespace>,
    /// The application's backend, asked about connects, subscriptions, publications, rpc.
    pub proxy: ProxyConfig,
    /// Push notifications (FCM, APNs, Web Push, email) and the device registry.
    pub push: crate::push::PushConfig,
    /// Bridges in: brokers and outbox tables whose messages become publications.
    pub sources: Vec<crate::bridge::config::SourceConfig>,
    /// Signed webhooks to the endpoints in `[[webhooks.endpoints]]` and the server API's.
    pub webhooks: crate::webhook::WebhooksConfig,
    /// Brokers publications are delivered to (`[[sinks]]`: Kafka, RabbitMQ, NATS).
    pub sinks: Vec<crate::sink::SinkConfig>,
    /// The server API over gRPC, on the HTTP listener (`[grpc_api]`, docs/grpc.md).
    pub grpc_api: crate::grpc::GrpcApiConfig,
    /// MQTT 3.1.1 and 5 over TCP (`docs/mqtt.md`).
    pub mqtt: herald_transport::mqtt::MqttConfig,
}

/// `[proxy]`: HTTP endpoints of the application's backend (Centrifugo's proxy format). An
/// empty endpoint is not called.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Connects without a token are decided by this endpoint.
    pub connect_endpoint: String,
    /// Connections the connect endpoint gave an `expire_at` are refreshed here.
    pub refresh_endpoint: String,
    /// Subscriptions in namespaces with `proxy_subscribe`.
    pub subscribe_endpoint: String,
    /// Client publications in namespaces with `proxy_publish`.
    pub publish_endpoint: String,
    /// Every `rpc` command.
    pub rpc_endpoint: String,
    /// How long one backend call may take.
    pub timeout: HumanDuration,
    /// Headers of the client's connection request passed to the backend (e.g. `Cookie`,
    /// `Authorization`, `X-Request-Id`).
    pub http_headers: Vec<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_endpoint: String::new(),
            refresh_endpoint: String::new(),
            subscribe_endpoint: String::new(),
            publish_endpoint: String::new(),
            rpc_endpoint: String::new(),
            timeout: HumanDuration::from_secs(1),
            http_headers: Vec::new(),
        }
    }
}

impl ProxyConfig {
    /// Every endpoint with its key name.
    pub fn endpoints(&self) -> [(&'static str, &String); 5] {
        [
            ("connect_endpoint", &self.connect_endpoint),
            ("refresh_endpoint", &self.refresh_endpoint),
            ("subscribe_endpoint", &self.subscribe_endpoint),
            ("publish_endpoint", &self.publish_endpoint),
            ("rpc_endpoint", &self.rpc_endpoint),
        ]
    }

    /// Whether any endpoint is set.
    pub fn is_enabled(&self) -> bool {
        self.endpoints().iter().any(|(_, url)| !url.is_empty())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the HTTP listener.
    pub listen: SocketAddr,
    /// Node name shown by `/api/info`.
    pub name: String,
    /// Largest request body the HTTP API accepts.
    pub max_body_size: usize,
    /// Largest publication payload in bytes.
    pub max_publication_size: usize,
    /// How long a graceful shutdown may take before in-flight requests are cut.
    pub shutdown_timeout: HumanDuration,
    /// How long the server keeps accepting after SIGTERM while `/ready` answers 503, so load
    /// balancers take it out of rotation before it stops listening.
    pub shutdown_delay: HumanDuration,
    /// Longest a server API request may take, from reading its body to the response (408 after).
    pub request_timeout: HumanDuration,
    /// Most open connections (HTTP and real-time together); 0: no limit but the OS's.
    pub max_connections: usize,
    /// Most open connections from one IP address; 0: no limit.
    pub max_connections_per_ip: usize,
    /// New connections per second from one IP address (bursts of the same size); 0: no limit.
    pub connection_rate_per_ip: u32,
    /// Time a client has to send a request's headers (slowloris), and a TLS handshake.
    pub header_read_timeout: HumanDuration,
    /// HTTP/2 PING to a connection silent this long (gRPC streams, h2 requests); 0: never.
    pub http2_keepalive_interval: HumanDuration,
    /// A PING not acknowledged in this time closes the connection (a dead peer).
    pub http2_keepalive_timeout: HumanDuration,
    /// PEM certificate chain: with `tls_key_file`, the listener speaks HTTPS/WSS only.
    pub tls_cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `tls_cert_file`.
    pub tls_key_file: PathBuf,
    /// Reverse proxies and load balancers (CIDRs or addresses) whose `forwarded_header` names
    /// the client: per-IP limits and logs then use the client's address.
    pub trusted_proxies: Vec<String>,
    /// The header the trusted proxies set: `x-forwarded-for` or `forwarded` (RFC 7239).
    pub forwarded_header: crate::forwarded::ForwardedHeader,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            name: "herald".into(),
            max_body_size: 1024 * 1024,
            max_publication_size: 64 * 1024,
            shutdown_timeout: HumanDuration::from_secs(10),
            shutdown_delay: HumanDuration::from_secs(0),
            request_timeout: HumanDuration::from_secs(30),
            max_connections: 0,
            max_connections_per_ip: 0,
            connection_rate_per_ip: 0,
            header_read_timeout: HumanDuration::from_secs(10),
            http2_keepalive_interval: HumanDuration::from_secs(30),
            http2_keepalive_timeout: HumanDuration::from_secs(20),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            trusted_proxies: Vec::new(),
            forwarded_header: crate::forwarded::ForwardedHeader::XForwardedFor,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Keys accepted by the server API (`X-API-Key` or `Authorization: apikey <key>`), with
    /// the `admin` scope.
    pub keys: Vec<String>,
    /// Named keys with a scope, given as the key or as its SHA-256 digest.
    pub named_keys: Vec<NamedApiKey>,
    /// Web origins whose pages may call the server API from a browser (CORS); same patterns
    /// as `client.allowed_origins`. Empty: no cross-origin calls.
    pub cors_origins: Vec<String>,
    /// `publish` and `broadcast` calls per second per API key (429 over it); 0: no limit.
    pub publish_rate_per_key: u32,
}

/// One `[[api.named_keys]]` entry.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamedApiKey {
    /// Shown in logs (never the key).
    pub name: String,
    /// The key itself (at least 16 characters), or
    pub key: String,
    /// its SHA-256 digest in hex, so the config file need not hold the secret.
    pub sha256: String,
    /// `admin` (default), `publish` or `read`.
    pub scope: crate::auth::Scope,
}

impl ApiConfig {
    /// Whether any key is configured (without one, `serve` generates an admin key).
    pub fn has_keys(&self) -> bool {
        !(self.keys.is_empty() && self.named_keys.is_empty())
    }

    /// Every configured key, ready for checking.
    pub fn api_keys(&self) -> Result<crate::auth::ApiKeys, ConfigError> {
        let mut keys = crate::auth::ApiKeys::new(self.keys.iter().map(String::as_str));
        for (index, named) in self.named_keys.iter().enumerate() {
            let what = if named.name.is_empty() {
                format!("api.named_keys[{index}]")
            } else {
                format!("api.named_keys[{index}] ({:?})", named.name)
            };
            let digest = match (named.key.is_empty(), named.sha256.is_empty()) {
                (false, true) if named.key.len() >= 16 => crate::auth::digest(&named.key),
                (false, true) => {
                    return Err(ConfigError::Invalid(format!(
                        "{what}: `key` must be at least 16 characters"
                    )));
                }
                (true, false) => {
                    let bytes = hex::decode(named.sha256.trim()).ok();
                    bytes
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or_else(|| {
                            ConfigError::Invalid(format!(
                                "{what}: `sha256` must be 64 hex characters (sha256sum of the key)"
                            ))
                        })?
                }
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "{what}: set exactly one of `key` and `sha256`"
                    )));
                }
            };
            let name = if named.name.is_empty() {
                format!("api.named_keys[{index}]")
            } else {
                named.name.clone()
            };
            keys.add_digest(digest, named.scope, name);
        }
        Ok(keys)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// HMAC secret that signs and verifies tokens (with `hmac_algorithm`).
    pub hmac_secret: String,
    /// The algorithm `hmac_secret` verifies: HS256 (default), HS384 or HS512.
    pub hmac_algorithm: String,
    /// When set, tokens must carry this `aud`.
    pub audience: String,
    /// When set, tokens must carry this `iss`.
    pub issuer: String,
    /// More verification keys, each pinned to one algorithm.
    pub keys: Vec<TokenKey>,
    /// A JWKS document to fetch public keys from (refreshed on an unknown `kid`).
    pub jwks_url: String,
    /// Least time between two JWKS fetches (bounds what unknown `kid`s can cause).
    pub jwks_min_refresh: HumanDuration,
    /// How long a fetched JWKS is used before it is fetched again.
    pub jwks_cache_ttl: HumanDuration,
}

impl TokenConfig {
    /// Whether any token key is configured (HMAC secret, pinned keys or a JWKS).
    pub fn has_any_key(&self) -> bool {
        !self.hmac_secret.is_empty() || !self.keys.is_empty() || !self.jwks_url.is_empty()
    }
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            hmac_secret: String::new(),
            hmac_algorithm: "HS256".into(),
            audience: String::new(),
            issuer: String::new(),
            keys: Vec::new(),
            jwks_url: String::new(),
            jwks_min_refresh: HumanDuration::from_secs(30),
            jwks_cache_ttl: HumanDuration::from_secs(3600),
        }
    }
}

/// One verification key from config (`[[token.keys]]`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenKey {
    /// Matches the token header's `kid`; a token without `kid` is tried against every key.
    pub kid: String,
    /// RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384 or HS512.
    pub algorithm: String,
    /// The public key in PEM (RSA, EC or Ed25519 algorithms).
    pub public_key: String,
    /// A file holding the PEM public key, instead of `public_key`.
    pub public_key_file: PathBuf,
    /// The shared secret (HS algorithms), at least 32 characters.
    pub secret: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    Sqlite,
    Memory,
    /// Several nodes sharing history, presence and fan-out through Redis (`[redis]`).
    Redis,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// fsync on every commit: nothing acknowledged is lost, even on power loss.
    Full,
    /// fsync at checkpoints: nothing acknowledged is lost on a process crash; the last
    /// commits may be lost on power loss or an OS crash.
    #[default]
    Normal,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub engine: Engine,
    /// Folder for the embedded database (and generated secrets when there is no config file).
    pub data_dir: PathBuf,
    pub sync: SyncPolicy,
    /// Most publications committed in one transaction.
    pub max_batch: usize,
    /// Read connections for history queries.
    pub readers: usize,
    /// How often expired publications are deleted.
    pub prune_interval: HumanDuration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            engine: Engine::Sqlite,
            data_dir: PathBuf::from("herald-data"),
            sync: SyncPolicy::Normal,
            max_batch: 1024,
            readers: 2,
            prune_interval: HumanDuration::from_secs(5),
        }
    }
}

/// Real-time client connections (WebSocket and the other transports).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Connections without a token are accepted as anonymous users. Anonymous users still
    /// need a namespace with `allow_subscribe_for_anonymous` to subscribe.
    pub allow_anonymous: bool,
    /// Server ping interval ("0s" disables pings).
    pub ping_interval: HumanDuration,
    /// How long a client may take to answer a ping.
    pub pong_timeout: HumanDuration,
    /// Bytes queued for one connection before it is disconnected as slow (code 3008).
    pub max_queue_bytes: usize,
    /// Bytes queued for all connections together before the connections holding the most
    /// are disconnected as slow (3008); 0: no limit. Unset: a quarter of the memory the
    /// process may use (the machine's, or the cgroup's limit when lower).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_total_queue_bytes: Option<usize>,
    /// Largest incoming WebSocket message.
    pub max_message_size: usize,
    /// Most publications one subscribe may recover; beyond it the answer is "not recovered".
    pub recovery_max_publications: usize,
    /// Most channels per connection.
    pub max_subscriptions: usize,
    /// Time a new connection has to send its connect command.
    pub connect_timeout: HumanDuration,
    /// Grace after a token's `exp` before a WebSocket connection that did not refresh is
    /// closed (SDKs refresh exactly at expiry).
    pub expired_close_delay: HumanDuration,
    /// Web origins (besides the server's own) whose pages may connect: exact
    /// (`https://app.example.com`), any subdomain (`https://*.example.com`) or `*`.
    pub allowed_origins: Vec<String>,
    /// Commands per second per WebSocket connection (error 111 over it); 0: no limit.
    pub commands_per_second: u32,
    /// Client publications per second per user (error 111 over it); 0: no limit.
    pub publications_per_second_per_user: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        let rt = herald_transport::realtime::RealtimeConfig::default();
        Self {
            allow_anonymous: rt.allow_anonymous,
            ping_interval: HumanDuration(rt.ping_interval),
            pong_timeout: HumanDuration(rt.pong_timeout),
            max_queue_bytes: rt.max_queue_bytes,
            max_total_queue_bytes: None,
            max_message_size: rt.max_message_size,
            recovery_max_publications: rt.recovery_max_publications,
            max_subscriptions: rt.max_subscriptions,
            connect_timeout: HumanDuration(rt.connect_timeout),
            expired_close_delay: HumanDuration(rt.expired_close_delay),
            allowed_origins: Vec::new(),
            commands_per_second: rt.commands_per_second,
            publications_per_second_per_user: rt.publications_per_second_per_user,
        }
    }
}

impl ServerConfig {
    /// The TLS files, when both are set.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        (set(&self.tls_cert_file) && set(&self.tls_key_file))
            .then_some((self.tls_cert_file.as_path(), self.tls_key_file.as_path()))
    }

    pub fn connection_limits(&self) -> crate::listener::ConnectionLimits {
        crate::listener::ConnectionLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            accepts_per_ip_per_second: self.connection_rate_per_ip,
            header_read_timeout: self.header_read_timeout.as_duration(),
            http2_keepalive: (!self.http2_keepalive_interval.is_zero()).then(|| {
                (
                    self.http2_keepalive_interval.as_duration(),
                    self.http2_keepalive_timeout.as_duration(),
                )
            }),
        }
    }
}

impl ClientConfig {
    /// The real-time settings; `memory` is what the process may use, for the default
    /// `max_total_queue_bytes`.
    pub fn realtime(&self, memory: Option<u64>) -> herald_transport::realtime::RealtimeConfig {
        herald_transport::realtime::RealtimeConfig {
            allow_anonymous: self.allow_anonymous,
            ping_interval: self.ping_interval.as_duration(),
            pong_timeout: self.pong_timeout.as_duration(),
            max_queue_bytes: self.max_queue_bytes,
            max_total_queue_bytes: self.max_total_queue_bytes.unwrap_or_else(|| {
                memory.map_or(0, |bytes| usize::try_from(bytes / 4).unwrap_or(usize::MAX))
            }),
            max_message_size: self.max_message_size,
            recovery_max_publications: self.recovery_max_publications,
            max_subscriptions: self.max_subscriptions,
            connect_timeout: self.connect_timeout.as_duration(),
            expired_close_delay: self.expired_close_delay.as_duration(),
            commands_per_second: self.commands_per_second,
            publications_per_second_per_user: self.publications_per_second_per_user,
            proxy_headers: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `herald=debug,tower_http=info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Config failures, with messages meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        // figment names the key and its source ("for key `server.lisen` in herald.toml").
        let messages: Vec<String> = err.into_iter().map(|e| e.to_string()).collect();
        ConfigError::Invalid(messages.join("; "))
    }
}

/// Settings given on the command line; `None` leaves the file/env value alone.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CliOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<Engine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

impl Config {
    /// Loads `file` (if given), then `HERALD_*` environment variables, then `cli`.
    pub fn load(file: Option<&Path>, cli: &CliOverrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Missing(path.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(env_provider());
        let mut overrides = Figment::new();
        if let Some(listen) = cli.listen {
            overrides = overrides.merge(Serialized::default("server.listen", listen));
        }
        if let Some(dir) = &cli.data_dir {
            overrides = overrides.merge(Serialized::default("storage.data_dir", dir));
        }
        if let Some(engine) = cli.engine {
            overrides = overrides.merge(Serialized::default("storage.engine", engine));
        }
        if let Some(key) = &cli.api_key {
            overrides = overrides.merge(Serialized::default("api.keys", vec![key.clone()]));
        }
        let config: Config = figment.merge(overrides).extract()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks rules serde cannot express, without building anything: files, keys, URLs and
    /// namespaces are checked when [`crate::build`] builds them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.max_publication_size == 0 {
            return Err(ConfigError::Invalid(
                "server.max_publication_size must be above 0".into(),
            ));
        }
        if self.server.max_body_size < self.server.max_publication_size {
            return Err(ConfigError::Invalid(format!(
                "server.max_body_size ({}) must be at least server.max_publication_size ({})",
                self.server.max_body_size, self.server.max_publication_size
            )));
        }
        if self.server.http2_keepalive_timeout.is_zero()
            && !self.server.http2_keepalive_interval.is_zero()
        {
            return Err(ConfigError::Invalid(
                "server.http2_keepalive_timeout must be above 0 (http2_keepalive_interval = 0 \
                 turns keep-alive off)"
                    .into(),
            ));
        }
        if self.api.keys.iter().any(|k| k.len() < 16) {
            return Err(ConfigError::Invalid(
                "every api.keys entry must be at least 16 characters".into(),
            ));
        }
        self.api.api_keys()?;
        if !self.token.hmac_secret.is_empty() && self.token.hmac_secret.len() < 32 {
            return Err(ConfigError::Invalid(
                "token.hmac_secret must be at least 32 characters".into(),
            ));
        }
        self.push.validate().map_err(ConfigError::Invalid)?;
        crate::bridge::config::validate(&self.sources).map_err(ConfigError::Invalid)?;
        self.webhooks.validate().map_err(ConfigError::Invalid)?;
        crate::sink::config::validate(&self.sinks).map_err(ConfigError::Invalid)?;
        crate::mqtt::validate(self).map_err(ConfigError::Invalid)?;
        let cert = !self.server.tls_cert_file.as_os_str().is_empty();
        let key = !self.server.tls_key_file.as_os_str().is_empty();
        if cert != key {
            return Err(ConfigError::Invalid(
                "server.tls_cert_file and server.tls_key_file go together: set both or neither"
                    .into(),
            ));
        }
        for (key, url) in self.proxy.endpoints() {
            if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "proxy.{key} {url:?} must be an http:// or https:// URL"
                )));
            }
        }
        let namespaces = std::iter::once(("(default)", &self.namespace)).chain(
            self.namespaces
                .iter()
                .map(|n| (n.name.as_str(), &n.options)),
        );
        for (name, options) in namespaces {
            if options.proxy_subscribe && self.proxy.subscribe_endpoint.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "namespace {name}: proxy_subscribe needs proxy.subscribe_endpoint"
                )));
            }
            if options.proxy_publish && self.proxy.publish_endpoint.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "namespace {name}: proxy_publish needs proxy.publish_endpoint"
                )));
            }
        }
        if self.storage.max_batch == 0 || self.storage.readers == 0 {
            return Err(ConfigError::Invalid(
                "storage.max_batch and storage.readers must be above 0".into(),
            ));
        }
        if self.storage.engine == Engine::Redis {
            self.redis
                .validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        #[cfg(feature = "sqlite")]
        if self.storage.engine == Engine::Sqlite {
            self.sqlite()
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("storage: {e}")))?;
        }
        Ok(())
    }

    /// The embedded store's settings, from `[storage]`.
    #[cfg(feature = "sqlite")]
    pub fn sqlite(&self) -> herald_store::sqlite::SqliteConfig {
        use herald_store::sqlite::{SqliteConfig, SyncPolicy as StoreSync};
        let storage = &self.storage;
        SqliteConfig {
            data_dir: storage.data_dir.clone(),
            sync: match storage.sync {
                SyncPolicy::Full => StoreSync::Full,
                SyncPolicy::Normal => StoreSync::Normal,
            },
            max_batch: storage.max_batch,
            readers: storage.readers,
            prune_interval: storage.prune_interval.as_duration(),
        }
    }

    pub fn namespaces(&self) -> Result<Namespaces, ConfigError> {
        Namespaces::new(self.namespace.clone(), self.namespaces.clone())
            .map_err(|e| ConfigError::Invalid(e.detail))
    }
}

/// The top-level keys of [`Config`]: a `HERALD_<SECTION>__<KEY>` variable addresses one.
const SECTIONS: [&str; 13] = [
    "server",
    "api",
    "token",
    "storage",
    "redis",
    "log",
    "client",
    "channels",
    "namespace",
    "namespaces",
    "proxy",
    "push",
    "webhooks",
];

/// What a `HERALD_*` variable is, from its name without the prefix and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EnvVariable {
    /// A configuration key: read, and a bad key or value is an error (as in the file).
    Config,
    /// Ours but not configuration (`HERALD_CONFIG`, `HERALD_TEST_*`): silently skipped.
    Known,
    /// Not configuration (`HERALD_BIN`, set by deployment tooling): skipped with a warning.
    Foreign,
}

/// `SERVER__LISTEN` (a key inside a section) and `NAMESPACES='[…]'` (a whole section as a
/// TOML array or table) are configuration; `BIN`, `LOG=/var/log/x` or `SERVER_LISTEN` (one
/// `_`) are not, since no key of ours can be meant by them.
fn classify_env(name: &str, value: &str) -> EnvVariable {
    let key = name.to_ascii_lowercase();
    if key == "config" || key.starts_with("test_") {
        return EnvVariable::Known;
    }
    let (section, nested) = match key.split_once("__") {
        Some((section, _)) => (section, true),
        None => (key.as_str(), false),
    };
    let whole_section = value.trim_start().starts_with(['[', '{']);
    if SECTIONS.contains(&section) && (nested || whole_section) {
        EnvVariable::Config
    } else {
        EnvVariable::Foreign
    }
}

/// The `HERALD_*` variables (name without the prefix, value) in the process environment; the
/// prefix matches in any case, as figment's does.
fn herald_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(name, value)| {
        let name = name.into_string().ok()?;
        let prefix = name.get(..ENV_PREFIX.len())?;
        if !prefix.eq_ignore_ascii_case(ENV_PREFIX) {
            return None;
        }
        let value = value.into_string().unwrap_or_default();
        Some((name[ENV_PREFIX.len()..].to_owned(), value))
    })
}

/// `HERALD_*` variables that are not configuration keys, by full name, sorted: `serve` and
/// the other commands name them in one warning line instead of refusing to start.
pub fn foreign_env_variables() -> Vec<String> {
    let mut names: Vec<String> = herald_env()
        .filter(|(name, value)| classify_env(name, value) == EnvVariable::Foreign)
        .map(|(name, _)| format!("{ENV_PREFIX}{name}"))
        .collect();
    names.sort();
    names
}

/// `HERALD_SERVER__LISTEN=…` → `server.listen`. Only variables [`classify_env`] calls
/// configuration are read.
fn env_provider() -> Env {
    let config: std::collections::HashSet<String> = herald_env()
        .filter(|(name, value)| classify_env(name, value) == EnvVariable::Config)
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect();
    // figment hands the key over without the prefix, in its original case.
    Env::prefixed(ENV_PREFIX)
        .filter(move |key| config.contains(&key.as_str().to_ascii_lowercase()))
        .split("__")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        file
    }

    #[test]
    fn file_then_cli_override() {
        let file = write(
            "[server]\nlisten = \"127.0.0.1:9000\"\n[[namespaces]]\nname = \"chat\"\npresence = true\n",
        );
        let cli = CliOverrides {
            listen: Some("127.0.0.1:9100".parse().expect("addr")),
            ..Default::default()
        };
        let config = Config::load(Some(file.path()), &cli).expect("load");
        assert_eq!(config.server.listen.port(), 9100);
        assert_eq!(config.namespaces[0].name, "chat");
        assert!(config.namespaces[0].options.presence);
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let file = write("[server]\nlisen = \"127.0.0.1:9000\"\n");
        let err =
            Config::load(Some(file.path()), &CliOverrides::default()).expect_err("unknown key");
        let text = err.to_string();
        assert!(text.contains("lisen"), "{text}");
        assert!(text.contains(&file.path().display().to_string()), "{text}");
    }

    #[test]
    fn unknown_namespace_option_is_rejected() {
        let file = write("[[namespaces]]\nname = \"chat\"\nhistroy_size = 5\n");
        let err = Config::load(Some(file.path()), &CliOverrides::default()).expect_err("typo");
        assert!(err.to_string().contains("histroy_size"), "{err}");
    }

    #[test]
    fn which_variables_are_configuration() {
        use EnvVariable::{Config, Foreign, Known};
        for (name, value, expected) in [
            ("SERVER__LISTEN", "0.0.0.0:8000", Config),
            ("server__lisen", "x", Config),
            ("NAMESPACE__HISTORY_SIZE", "5", Config),
            ("NAMESPACES", "[{name=\"chat\"}]", Config),
            ("API", " {keys=[]}", Config),
            ("CONFIG", "herald.toml", Known),
            ("TEST_REDIS_URL", "redis://", Known),
            ("BIN", "/usr/bin/herald", Foreign),
            ("LOG", "/var/log/herald", Foreign),
            ("SERVER_LISTEN", "0.0.0.0:8000", Foreign),
            ("DEPLOY__ID", "42", Foreign),
            ("", "", Foreign),
        ] {
            assert_eq!(classify_env(name, value), expected, "{name}={value}");
        }
    }

    #[test]
    fn short_secrets_are_rejected() {
        let file = write("[api]\nkeys = [\"short\"]\n");
        assert!(Config::load(Some(file.path()), &CliOverrides::default()).is_err());
    }
}
