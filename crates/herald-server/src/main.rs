//! The `herald` command line: `serve`, `publish`, `history`, `genconfig`, `token`,
//! `check-config`, `outbox-sql`, `version`. Builds everything from config through the library and is the
//! only place that uses `anyhow`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use herald_client::{Client, HistoryOptions, PublishOptions};
use herald_server::Server;
use herald_server::config::{CliOverrides, Config, Engine, LogFormat};
use herald_server::secrets::{GeneratedSecrets, random_secret};
use herald_server::token::{ConnectionClaims, mint};

/// mimalloc instead of glibc malloc: the publish path allocates per request (HTTP parsing,
/// JSON, the publication), and glibc's malloc/free were ~10% of the server's CPU in
/// `bench/publish` profiles. See docs/benchmarks.md for the before/after.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald: real-time messaging and push gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// TOML config file (default: ./herald.toml if it exists; HERALD_* variables apply on top).
    #[arg(long, short = 'c', env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Data folder (embedded database and generated secrets).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node (embedded SQLite in ./herald-data unless configured otherwise).
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address to listen on, e.g. 127.0.0.1:8000 (port 0 picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Keep everything in memory: nothing survives a restart.
        #[arg(long)]
        memory: bool,
    },
    /// Publish DATA (JSON; a bare word is sent as a JSON string) to CHANNEL.
    Publish {
        channel: String,
        data: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Publish only if this key was not used in the namespace's idempotency window.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Deliver without storing in history.
        #[arg(long)]
        skip_history: bool,
    },
    /// Print a channel's history, one JSON publication per line.
    History {
        channel: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Most publications to print (negative: all retained).
        #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
        limit: i64,
        /// Only publications after this offset.
        #[arg(long)]
        since: Option<u64>,
        /// The epoch `--since` belongs to (checked when given).
        #[arg(long, default_value = "")]
        epoch: String,
        /// Newest first.
        #[arg(long)]
        reverse: bool,
    },
    /// Write a config file with fresh random secrets.
    Genconfig {
        /// Where to write it.
        #[arg(long, short = 'o', default_value = "herald.toml")]
        output: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Mint a connection token (HS256 JWT) with the configured secret.
    Token {
        #[command(flatten)]
        config: ConfigArgs,
        /// User id (`sub`).
        #[arg(long)]
        user: String,
        /// Channels to subscribe server-side (comma-separated).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Lifetime, e.g. 1h or 30m (0: never expires).
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// Validate a config file and exit.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print the SQL that creates a PostgreSQL outbox table and its notify trigger
    /// (`[[sources]]` with `kind = "postgres"`).
    OutboxSql {
        /// The table, `name` or `schema.name`.
        #[arg(long, default_value = herald_bridge::outbox::DEFAULT_TABLE)]
        table: String,
        /// The LISTEN channel the trigger notifies (default: the table's name, `.` → `_`).
        #[arg(long)]
        notify_channel: Option<String>,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Args)]
struct ClientArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Server URL (default: from the config's server.listen).
    #[arg(long)]
    url: Option<String>,
    /// API key (default: the config's first api.keys entry, or the data folder's generated key).
    #[arg(long)]
    api_key: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            memory,
        } => {
            let overrides = CliOverrides {
                listen,
                data_dir: config.data_dir.clone(),
                engine: memory.then_some(Engine::Memory),
                api_key: None,
            };
            let path = config_path(&config);
            let loaded = Config::load(path.as_deref(), &overrides)?;
            let reload = Reload { path, overrides };
            runtime()?.block_on(serve_command(loaded, reload))
        }
        Command::Publish {
            channel,
            data,
            client,
            idempotency_key,
            skip_history,
        } => {
            let (client, _) = client_from(&client)?;
            let data = parse_data(&data);
            let options = PublishOptions {
                idempotency_key,
                skip_history,
                ..PublishOptions::default()
            };
            let result = runtime()?.block_on(client.publish(&channel, &data, &options))?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::History {
            channel,
            client,
            limit,
            since,
            epoch,
            reverse,
        } => {
            let (client, _) = client_from(&client)?;
            let options = HistoryOptions {
                limit,
                since: since.map(|offset| (offset, epoch)),
                reverse,
            };
            let page = runtime()?.block_on(client.history(&channel, &options))?;
            for publication in &page.publications {
                println!("{}", serde_json::to_string(publication)?);
            }
            eprintln!("stream at offset {} epoch {}", page.offset, page.epoch);
            Ok(ExitCode::SUCCESS)
        }
        Command::Genconfig { output, force } => {
            genconfig(&output, force)?;
            println!("wrote {}", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            config,
            user,
            channels,
            ttl,
        } => {
            let loaded = load_config(&config)?;
            let secret = if loaded.token.hmac_secret.is_empty() {
                GeneratedSecrets::load(&loaded.storage.data_dir)?
                    .map(|s| s.hmac_secret)
                    .unwrap_or_default()
            } else {
                loaded.token.hmac_secret.clone()
            };
            let ttl = herald_core::duration::parse_duration(&ttl).map_err(anyhow::Error::msg)?;
            let now = herald_core::time::now_ms() / 1000;
            let exp = (!ttl.is_zero()).then(|| now + ttl.as_secs());
            let token = mint(
                &secret,
                &ConnectionClaims {
                    sub: user,
                    iat: now,
                    exp,
                    channels,
                },
            )?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let path = config_path(&config);
            herald_server::build::check(&load_config(&config)?)?;
            match path {
                Some(path) => println!("{}: ok", path.display()),
                None => println!("defaults and environment: ok"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::OutboxSql {
            table,
            notify_channel,
        } => {
            let notify = notify_channel
                .unwrap_or_else(|| herald_bridge::outbox::default_notify_channel(&table));
            let sql = herald_bridge::outbox::ddl(&table, &notify).map_err(anyhow::Error::msg)?;
            print!("{sql}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("herald {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the Tokio runtime")
}

/// The config file to read: `--config`/`HERALD_CONFIG`, else `./herald.toml` if it exists.
fn config_path(args: &ConfigArgs) -> Option<PathBuf> {
    args.config.clone().or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG_FILE);
        default.is_file().then_some(default)
    })
}

const DEFAULT_CONFIG_FILE: &str = "herald.toml";

/// One line naming the `HERALD_*` variables that are not configuration keys (set by
/// deployment tooling, or a key written with one `_` where `__` was meant), or `None`.
fn foreign_env_warning() -> Option<String> {
    let names = herald_server::config::foreign_env_variables();
    (!names.is_empty()).then(|| {
        format!(
            "ignoring environment variables that are not configuration keys (a key inside a section is HERALD_<SECTION>__<KEY>): {}",
            names.join(", ")
        )
    })
}

fn load_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    if let Some(warning) = foreign_env_warning() {
        eprintln!("warning: {warning}");
    }
    let overrides = CliOverrides {
        data_dir: args.data_dir.clone(),
        ..CliOverrides::default()
    };
    Ok(Config::load(config_path(args).as_deref(), &overrides)?)
}

/// JSON if it parses, otherwise the text as a JSON string (so `herald publish news hello` works).
fn parse_data(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}

fn client_from(args: &ClientArgs) -> anyhow::Result<(Client, Config)> {
    let config = load_config(&args.config)?;
    let url = args.url.clone().unwrap_or_else(|| {
        let mut addr = config.server.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    });
    let key = match &args.api_key {
        Some(key) => key.clone(),
        None => match config.api.keys.first() {
            Some(key) => key.clone(),
            None => GeneratedSecrets::load(&config.storage.data_dir)?
                .map(|s| s.api_key)
                .with_context(|| {
                    format!(
                        "no API key: pass --api-key, set api.keys in the config, or run `herald serve` in this folder first (it writes {})",
                        config.storage.data_dir.join(herald_server::secrets::SECRETS_FILE).display()
                    )
                })?,
        },
    };
    Ok((Client::new(&url, &key)?, config))
}

fn genconfig(output: &Path, force: bool) -> anyhow::Result<()> {
    if output.exists() && !force {
        bail!("{} exists; pass --force to overwrite", output.display());
    }
    let vapid = herald_outbound::webpush::generate_vapid_keys();
    let text = format!(
        r#"# Herald configuration. Every key is documented in docs/configuration.md.
# Environment variables override it: HERALD_SERVER__LISTEN=0.0.0.0:8000, …

[server]
listen = "127.0.0.1:8000"
name = "herald"
max_publication_size = 65536

[api]
# Keys for the server API (X-API-Key or "Authorization: apikey <key>").
keys = ["{api_key}"]

[token]
# Signs connection tokens (`herald token --user alice`).
hmac_secret = "{hmac}"

[storage]
engine = "sqlite"      # or "memory"
data_dir = "herald-data"
sync = "normal"        # "full": fsync every commit (survives power loss)

[log]
format = "text"        # or "json"
level = "info"

# The default namespace (channels without "name:").
[namespace]
history_size = 1000
history_ttl = "24h"

# A named namespace: channels "chat:…".
[[namespaces]]
name = "chat"
history_size = 100
history_ttl = "1h"
presence = true
join_leave = true

# Push notifications (docs/push.md): FCM, APNs, Web Push, email. Uncomment to enable.
# [push]
# enabled = true
#
# Web Push: a VAPID key pair generated for this config. Browsers subscribe with the public key
# (applicationServerKey = "{vapid_public}"), also served at GET /client/vapid_public_key.
# [push.webpush]
# [[push.webpush.apps]]
# vapid_private_key = "{vapid_private}"
# subject = "mailto:ops@example.com"
#
# [[push.apns.apps]]
# key_file = "AuthKey_XXXXXXXXXX.p8"
# key_id = "XXXXXXXXXX"
# team_id = "YYYYYYYYYY"
# topic = "com.example.app"
# environment = "production"   # or "sandbox"
#
# [[push.fcm.apps]]
# credentials_file = "firebase-service-account.json"

# Sources (docs/integrations.md): brokers and outbox tables consumed into channels.
# [[sources]]
# name = "sensors"
# kind = "nats"                 # or "rabbitmq", "redis", "postgres"
# url = "nats://127.0.0.1:4222"
# stream = "SENSORS"
# [sources.mapping]
# channel = "sensors:{{subject.1}}"   # unset: each message is a JSON envelope
# Signed webhooks (docs/integrations.md#webhooks). Uncomment to enable; endpoints can also be
# created with the server API (webhook_endpoint_create).
# [webhooks]
# enabled = true
#
# [[webhooks.endpoints]]
# id = "orders"
# url = "https://example.com/herald"
# events = ["publication"]
# channels = ["orders:*"]
# secrets = ["{webhook_secret}"]
# Sinks (docs/integrations.md): publications on matching channels delivered to a broker, in
# order per channel, at least once. Uncomment to enable; one [[sinks]] per destination.
# [[sinks]]
# name = "orders-kafka"
# kind = "kafka"                 # or "rabbitmq", "nats"
# url = "127.0.0.1:9092"         # amqp://user:pass@host:5672/%2f, nats://host:4222
# topic = "herald.orders"        # rabbitmq: exchange = "…" and routing_key = "{{channel}}"
# channels = ["orders:*"]        # nats: subject = "herald.{{channel}}"
"#,
        api_key = random_secret(32),
        hmac = random_secret(48),
        vapid_public = vapid.1,
        vapid_private = vapid.0,
        webhook_secret = herald_outbound::webhook::sign::Secret::generate(),
    );
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    let mut file = options
        .open(output)
        .with_context(|| format!("cannot write {}", output.display()))?;
    // `mode` applies only when the file is created: an overwritten file keeps its old mode.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private", output.display()))?;
    }
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", output.display()))?;
    Ok(())
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .with_context(|| format!("invalid log.level {:?}", config.log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot initialise logging: {e}"))
}

/// Where `serve` re-reads its config from on SIGHUP.
struct Reload {
    path: Option<PathBuf>,
    overrides: CliOverrides,
}

async fn serve_command(config: Config, reload: Reload) -> anyhow::Result<ExitCode> {
    init_logging(&config)?;
    if let Some(warning) = foreign_env_warning() {
        tracing::warn!("{warning}");
    }
    let listen_on = config.server.listen;
    let server = Server::build(config).await?;
    let listener = listen(listen_on).with_context(|| format!("cannot listen on {listen_on}"))?;
    let addr = listener.local_addr()?;
    let config = &server.state().config;
    let storage = match config.storage.engine {
        Engine::Sqlite => format!(
            "sqlite in {} (sync={:?})",
            config.storage.data_dir.display(),
            config.storage.sync
        )
        .to_lowercase(),
        Engine::Memory => "memory (nothing survives a restart)".to_owned(),
        Engine::Redis => format!(
            "redis, {} shard(s), key prefix {:?}",
            config.redis.shards(),
            config.redis.prefix
        ),
    };
    // Watch the signals before the banner: whoever starts Herald may signal it as soon as the
    // banner appears, and a signal nobody watches yet terminates the process at once.
    let signals = ShutdownSignals::watch()?;
    #[cfg(unix)]
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch SIGHUP")?;
    let scheme = if server.state().tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!(
        "Herald {} listening on {scheme}://{addr}",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(mqtt) = &server.state().mqtt {
        println!("  mqtt:    mqtt://{}", mqtt.local_addr);
        if let Some(tls) = mqtt.tls_local_addr {
            println!("  mqtts:   mqtts://{tls}");
        }
    }
    println!("  storage: {storage}");
    let reloader = server.reloader();
    match reloader.generated_api_key() {
        Some(key) => {
            println!("  API key: {key}");
            println!(
                "  try:     curl -X POST {scheme}://{addr}/api/publish -H 'X-API-Key: {key}' -d '{{\"channel\":\"news\",\"data\":{{\"text\":\"hello\"}}}}'"
            );
        }
        None => println!("  API key: from configuration"),
    }
    tracing::info!(%addr, "herald started");
    #[cfg(unix)]
    {
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match Config::load(reload.path.as_deref(), &reload.overrides) {
                    Ok(config) => reloader.apply(config),
                    Err(error) => {
                        tracing::error!(error = %error, "SIGHUP: config not reloaded; the API keys, token keys and certificate in use stay");
                    }
                }
            }
        });
    }
    let shutdown = async move {
        let signal = signals.recv().await;
        tracing::info!(signal, "signal received");
    };
    match server.run(listener, shutdown).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) => {
            tracing::error!(error = %error, "shutdown failed");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// SIGTERM and SIGINT (Ctrl-C elsewhere), watched from [`ShutdownSignals::watch`] on.
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn watch() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The first signal's name.
    async fn recv(mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            match tokio::signal::ctrl_c().await {
                Ok(()) => "Ctrl-C",
                Err(error) => {
                    tracing::error!(error = %error, "cannot watch Ctrl-C");
                    std::future::pending().await
                }
            }
        }
    }
}

/// Pending connections the kernel may hold before `accept` (it caps this at
/// `net.core.somaxconn`). tokio's default of 1024 overflows when tens of thousands of clients
/// reconnect at once (a restart, a network blip), and an overflowed SYN waits a whole second
/// for its retransmission.
const LISTEN_BACKLOG: u32 = 8192;

fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted server can listen while old connections
    // linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}
