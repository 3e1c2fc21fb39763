//! The processes of the `push` scenario: the APNs and FCM emulators (`herald-pushmock`, the
//! binary, generating a test APNs key and FCM service account at start) and Herald
//! (`herald serve` with a generated `[push]` config pointing at them), each started pinned to
//! a chosen core, their start-up line read, and stopped when dropped (SIGTERM, then SIGKILL
//! after a grace period).
//!
//! Owns: the child processes it starts (only those: it signals them by their own pid) and
//! the work directory ([`WorkDir`]: keys, config, Herald's data dir, the children's stderr),
//! removed when dropped. May touch: files under that directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;

/// A fresh directory under the system's temp dir, removed with everything in it on drop.
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let nanos = crate::push::now_ns();
        let path = std::env::temp_dir().join(format!("{prefix}.{}.{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Pins the calling thread to `cpu` (none: every core). Threads and processes it starts
/// afterwards inherit the mask.
pub fn pin_thread(cpu: Option<usize>) -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    match cpu {
        Some(cpu) if cpu < rustix::thread::CpuSet::MAX_CPU => set.set(cpu),
        Some(cpu) => bail!("CPU {cpu} is out of range"),
        // The kernel keeps only the cores that exist.
        None => (0..rustix::thread::CpuSet::MAX_CPU).for_each(|c| set.set(c)),
    }
    rustix::thread::sched_setaffinity(None, &set)
        .with_context(|| format!("cannot pin to CPU {cpu:?}"))
}

/// Starts `command` from a thread pinned to `cpu` (none: every core), so the child and every
/// thread it starts inherit that mask. This process itself may be pinned elsewhere.
fn spawn_pinned(mut command: Command, cpu: Option<usize>) -> anyhow::Result<Child> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> anyhow::Result<Child> {
                pin_thread(cpu)?;
                command.spawn().context("cannot start the process")
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the spawning thread panicked"))?
    })
}

/// A started child: its first line of standard output (read within `timeout`), the rest
/// drained in the background so it never blocks on a full pipe.
struct Started {
    child: Child,
    first_line: String,
}

fn start(
    mut command: Command,
    cpu: Option<usize>,
    stderr_file: &Path,
    timeout: Duration,
) -> anyhow::Result<Started> {
    let stderr = std::fs::File::create(stderr_file)
        .with_context(|| format!("cannot create {}", stderr_file.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr));
    let mut child = spawn_pinned(command, cpu)?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = tx.send(first);
        // Keep reading (and dropping) whatever else it prints until it exits.
        for _ in lines.by_ref() {}
    });
    let first = match rx.recv_timeout(timeout) {
        Ok(Some(Ok(line))) => Ok(line),
        Ok(Some(Err(e))) => Err(e.to_string()),
        Ok(None) => Err("it exited".to_owned()),
        Err(_) => Err("timed out".to_owned()),
    };
    let first = match first {
        Ok(line) => line,
        Err(why) => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(stderr_file).unwrap_or_default();
            let mut tail: Vec<&str> = stderr.lines().rev().take(20).collect();
            tail.reverse();
            bail!(
                "no start-up line ({why}); its stderr ends with:\n{}",
                tail.join("\n")
            );
        }
    };
    Ok(Started {
        child,
        first_line: first,
    })
}

/// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps.
fn stop(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = rustix::process::Pid::from_child(child);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The APNs key the emulator generated (and accepts).
#[derive(Debug, Clone, Deserialize)]
pub struct ApnsKeyInfo {
    pub key_id: String,
    pub team_id: String,
    pub key_pem: String,
    pub key_file: Option<PathBuf>,
}

/// The FCM service account the emulator generated (and accepts).
#[derive(Debug, Clone, Deserialize)]
pub struct FcmAccountInfo {
    pub project_id: String,
    pub client_email: String,
    pub credentials_json: serde_json::Value,
    pub credentials_file: Option<PathBuf>,
}

/// The emulator's start-up line.
#[derive(Debug, Clone, Deserialize)]
pub struct MockInfo {
    pub apns: String,
    pub fcm: String,
    pub control: Option<String>,
    pub apns_keys: Vec<ApnsKeyInfo>,
    pub fcm_accounts: Vec<FcmAccountInfo>,
}

/// A running `herald-pushmock`.
pub struct Mock {
    child: Child,
    pub info: MockInfo,
    pub apns_key: ApnsKeyInfo,
    pub fcm_account: FcmAccountInfo,
    pub control: String,
}

/// The bundle id the generated key may push to.
pub const APNS_TOPIC: &str = "com.example.heraldbench";

impl Mock {
    /// Starts the emulators with one generated APNs key and one FCM service account (files
    /// in `dir`), keeping up to `max_records` accepted notifications each.
    pub fn start(
        exe: &Path,
        dir: &Path,
        cpu: Option<usize>,
        max_records: usize,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(exe);
        command
            .arg("--generate-apns")
            .arg(format!("BENCHKEY01:BENCHTEAM1:{APNS_TOPIC}"))
            .args(["--generate-fcm", "herald-bench"])
            .arg("--out-dir")
            .arg(dir)
            .args(["--max-records", &max_records.to_string()]);
        let started = start(
            command,
            cpu,
            &dir.join("pushmock.stderr"),
            Duration::from_secs(30),
        )
        .with_context(|| format!("starting {}", exe.display()))?;
        let mut child = started.child;
        let info: MockInfo = match serde_json::from_str(&started.first_line) {
            Ok(info) => info,
            Err(e) => {
                stop(&mut child, Duration::from_secs(2));
                bail!(
                    "unexpected start-up line from herald-pushmock ({e}): {:.300}",
                    started.first_line
                );
            }
        };
        let (Some(apns_key), Some(fcm_account), Some(control)) = (
            info.apns_keys.first().cloned(),
            info.fcm_accounts.first().cloned(),
            info.control.clone(),
        ) else {
            stop(&mut child, Duration::from_secs(2));
            bail!("herald-pushmock did not report its key, account and control API");
        };
        Ok(Self {
            child,
            info,
            apns_key,
            fcm_account,
            control,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(5));
    }
}

/// Herald's `[push]` settings the scenario varies.
#[derive(Debug, Clone)]
pub struct HeraldPush {
    pub concurrency: usize,
    pub fanout: usize,
    pub batch: usize,
}

/// The generated `herald.toml`: SQLite storage in `data_dir` (default `sync`), one API key,
/// push on with both providers pointed at the emulator.
pub fn herald_config(
    data_dir: &Path,
    api_key: &str,
    mock: &Mock,
    push: &HeraldPush,
) -> anyhow::Result<String> {
    let quote = |s: &str| serde_json::to_string(s).context("quoting a config value");
    let path = |p: &Option<PathBuf>, what: &str| -> anyhow::Result<String> {
        let p = p
            .as_deref()
            .with_context(|| format!("herald-pushmock wrote no {what} file"))?;
        quote(&p.display().to_string())
    };
    Ok(format!(
        r#"[api]
keys = [{key}]

[storage]
engine = "sqlite"
data_dir = {data_dir}

[log]
level = "warn"

[push]
enabled = true
batch = {batch}

[push.concurrency]
apns = {concurrency}
fcm = {concurrency}
fanout = {fanout}

[[push.apns.apps]]
key_file = {key_file}
key_id = {key_id}
team_id = {team_id}
topic = {topic}
base_url = {apns_url}

[[push.fcm.apps]]
credentials_file = {credentials_file}
base_url = {fcm_url}
"#,
        key = quote(api_key)?,
        data_dir = quote(&data_dir.display().to_string())?,
        batch = push.batch,
        concurrency = push.concurrency,
        fanout = push.fanout,
        key_file = path(&mock.apns_key.key_file, "APNs key")?,
        key_id = quote(&mock.apns_key.key_id)?,
        team_id = quote(&mock.apns_key.team_id)?,
        topic = quote(APNS_TOPIC)?,
        apns_url = quote(&mock.info.apns)?,
        credentials_file = path(&mock.fcm_account.credentials_file, "FCM credentials")?,
        fcm_url = quote(&mock.info.fcm)?,
    ))
}

/// A running `herald serve`.
pub struct Herald {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Herald {
    /// Writes `config` to `dir/herald.toml` and starts `herald serve` on a free port.
    pub fn start(exe: &Path, dir: &Path, config: &str, cpu: Option<usize>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config_path = dir.join("herald.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let mut command = Command::new(exe);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", "127.0.0.1:0"]);
        let started = start(
            command,
            cpu,
            &dir.join("herald.stderr"),
            Duration::from_secs(30),
        )
        .with_context(|| format!("starting {} serve", exe.display()))?;
        let mut child = started.child;
        let Some((_, url)) = started.first_line.split_once("listening on ") else {
            stop(&mut child, Duration::from_secs(2));
            bail!(
                "unexpected first line from herald serve: {:.300}",
                started.first_line
            );
        };
        Ok(Self {
            url: url.trim().to_owned(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it (SIGTERM; SIGKILL after 10 s).
    pub fn stop(mut self) {
        stop(&mut self.child, Duration::from_secs(10));
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(10));
    }
}

/// `name` next to this executable (where `cargo build` puts every binary of the workspace).
pub fn sibling_exe(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let dir = exe.parent().context("this executable has no directory")?;
    Ok(dir.join(name))
}
