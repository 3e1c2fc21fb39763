//! `herald-pushmock`: the APNs and FCM emulators as a process, for Python tests and the
//! benchmark. Prints one JSON line with its addresses (and any keys it generated) on stdout,
//! then serves until SIGINT/SIGTERM.
//!
//! Owns: the process. May touch: the files named on its command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use herald_pushmock::{
    ApnsKey, ApnsMockKey, FcmMockAccount, PushMock, PushMockConfig, ServiceAccount,
};
use serde_json::{Value, json};

/// Local emulators of APNs and FCM HTTP v1 (with its OAuth token endpoint).
#[derive(Parser, Debug)]
#[command(name = "herald-pushmock", version)]
struct Args {
    /// A JSON file with the settings (`apns_listen`, `fcm_listen`, `control_listen`,
    /// `apns: {keys, max_records, latency_ms}`, `fcm: {accounts, token_expires_in, ...}`);
    /// the options below override or add to it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    apns_listen: Option<SocketAddr>,
    #[arg(long)]
    fcm_listen: Option<SocketAddr>,
    /// The control API's address, or `none`.
    #[arg(long)]
    control_listen: Option<String>,
    /// Accept an APNs key: `KEY_ID:TEAM_ID:TOPIC[,TOPIC...]:PEM_FILE` (the `.p8` or its
    /// public key).
    #[arg(long = "apns-key")]
    apns_keys: Vec<String>,
    /// Accept a service account key file (its `token_uri` must be this emulator's `/token`).
    #[arg(long = "fcm-account")]
    fcm_accounts: Vec<PathBuf>,
    /// Generate and accept an APNs key: `KEY_ID:TEAM_ID:TOPIC[,TOPIC...]`.
    #[arg(long = "generate-apns")]
    generate_apns: Vec<String>,
    /// Generate and accept a service account of this project, pointed at this emulator.
    #[arg(long = "generate-fcm")]
    generate_fcm: Vec<String>,
    /// Where generated keys are written (`AuthKey_<id>.p8`, `<project>.json`); without it
    /// they are only printed.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// `expires_in` of issued access tokens (seconds).
    #[arg(long)]
    token_expires_in: Option<u64>,
    /// Accepted notifications kept per emulator.
    #[arg(long)]
    max_records: Option<usize>,
    /// Delay before every answer (ms).
    #[arg(long)]
    latency_ms: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            serde_json::from_str::<PushMockConfig>(&text)
                .with_context(|| format!("parse {}", path.display()))?
        }
        None => PushMockConfig::default(),
    };
    if let Some(addr) = args.apns_listen {
        config.apns_listen = addr;
    }
    if let Some(addr) = args.fcm_listen {
        config.fcm_listen = addr;
    }
    match args.control_listen.as_deref() {
        None => {}
        Some("none") => config.control_listen = None,
        Some(addr) => {
            config.control_listen = Some(addr.parse().context("--control-listen")?);
        }
    }
    if let Some(secs) = args.token_expires_in {
        config.fcm.token_expires_in = secs;
    }
    if let Some(max) = args.max_records {
        config.apns.max_records = max;
        config.fcm.max_records = max;
    }
    if let Some(ms) = args.latency_ms {
        config.apns.latency_ms = ms;
        config.fcm.latency_ms = ms;
    }
    for spec in &args.apns_keys {
        let mut parts = spec.splitn(4, ':');
        let (Some(key_id), Some(team_id), Some(topics), Some(file)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("--apns-key {spec:?}: expected KEY_ID:TEAM_ID:TOPICS:PEM_FILE");
        };
        let pem = std::fs::read_to_string(file).with_context(|| format!("read {file}"))?;
        config.apns.keys.push(ApnsMockKey {
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            public_key_pem: pem,
            topics: split_topics(topics),
        });
    }
    for path in &args.fcm_accounts {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let account = ServiceAccount::from_json(&text)
            .with_context(|| format!("service account {}", path.display()))?;
        config.fcm.accounts.push(FcmMockAccount {
            project_id: account.project_id,
            client_email: account.client_email,
            public_key_pem: account.public_key_pem,
        });
    }

    let mock = PushMock::start(config).await?;

    let mut apns_keys = Vec::new();
    for spec in &args.generate_apns {
        let mut parts = spec.splitn(3, ':');
        let (Some(key_id), Some(team_id), topics) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("--generate-apns {spec:?}: expected KEY_ID:TEAM_ID:TOPICS");
        };
        let topics = split_topics(topics.unwrap_or_default());
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        let key: ApnsKey = mock.apns_key(key_id, team_id, &topic_refs)?;
        let key_file = match &args.out_dir {
            Some(dir) => Some(key.write_p8(dir)?),
            None => None,
        };
        apns_keys.push(json!({
            "key_id": key.key_id,
            "team_id": key.team_id,
            "topics": topics,
            "key_pem": key.private_key_pem,
            "key_file": key_file,
        }));
    }
    let mut fcm_accounts = Vec::new();
    for project in &args.generate_fcm {
        let account = mock.fcm_account(project)?;
        let credentials_file = match &args.out_dir {
            Some(dir) => {
                let path = dir.join(format!("{project}.json"));
                account.write_json(&path)?;
                Some(path)
            }
            None => None,
        };
        fcm_accounts.push(json!({
            "project_id": account.project_id,
            "client_email": account.client_email,
            "credentials_json": account.to_json(),
            "credentials_file": credentials_file,
        }));
    }

    let line: Value = json!({
        "apns": mock.apns_url(),
        "fcm": mock.fcm_url(),
        "token_uri": mock.token_url(),
        "control": mock.control_url(),
        "apns_keys": apns_keys,
        "fcm_accounts": fcm_accounts,
    });
    println!("{line}");

    wait_for_signal().await?;
    mock.shutdown().await;
    Ok(())
}

fn split_topics(topics: &str) -> Vec<String> {
    topics
        .split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("SIGINT handler")?,
        _ = term.recv() => {}
    }
    Ok(())
}
