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

mod access;
mod listener;

pub use access::{ApiConfig, NamedApiKey, ProxyConfig, TokenConfig, TokenKey};
pub use listener::{ClientConfig, ServerConfig};

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
