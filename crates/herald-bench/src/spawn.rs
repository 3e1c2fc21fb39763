//! The parent's side of the fan-out and idle scenarios: splitting subscribers over worker
//! processes (`herald-bench fanout-worker`, this same executable) and source addresses,
//! starting them, and the line protocol with them (see [`crate::worker`]).
//!
//! Owns the child processes: they are killed if the parent drops them early, and waited
//! for after their reports. Spreading over processes keeps each under the 20,000 open files
//! a process may have; spreading over 127.0.0.x source addresses keeps each address far from
//! running out of ephemeral ports.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::worker::{Command, Ready, Transport, WorkerMessage, WorkerReport};

/// Most subscribers one worker may hold: the open-file limit, less room for the runtime.
pub const MAX_PER_WORKER: usize = 19_000;

/// One worker's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlan {
    pub first: usize,
    pub count: usize,
    pub source_ip: IpAddr,
}

/// Splits subscribers `first .. first + total` into as few workers as `per_worker` allows,
/// evenly, the k-th worker (counting from `addr_offset`) on source address 127.0.0.(1 + k
/// mod `source_addrs`).
pub fn plan(
    first: usize,
    total: usize,
    per_worker: usize,
    source_addrs: usize,
    addr_offset: usize,
) -> Vec<WorkerPlan> {
    if total == 0 {
        return Vec::new();
    }
    let workers = total.div_ceil(per_worker.max(1));
    let (base, extra) = (total / workers, total % workers);
    let mut next = first;
    (0..workers)
        .map(|k| {
            let count = base + usize::from(k < extra);
            let host = 1 + (addr_offset + k) % source_addrs.clamp(1, 254);
            let plan = WorkerPlan {
                first: next,
                count,
                source_ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, host as u8)),
            };
            next += count;
            plan
        })
        .collect()
}

/// The flags every worker process gets, whatever its scenario (`fanout-worker`,
/// `storm-worker`): where to connect, which subscribers are its own, from which address, and
/// how many connections it sets up at once.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct WorkerShare {
    /// Server base URL, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub url: String,
    /// Channel names are PREFIX-<index>.
    #[arg(long)]
    pub prefix: String,
    /// Index of this worker's first subscriber.
    #[arg(long)]
    pub first: usize,
    /// Subscribers in this worker.
    #[arg(long)]
    pub count: usize,
    /// Local address every socket is bound to before it connects.
    #[arg(long)]
    pub source_ip: IpAddr,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
}

impl WorkerShare {
    pub fn new(url: &str, prefix: &str, plan: &WorkerPlan, connect_concurrency: usize) -> Self {
        Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            first: plan.first,
            count: plan.count,
            source_ip: plan.source_ip,
            connect_concurrency,
        }
    }

    /// The same flags, for the worker's command line.
    pub fn to_args(&self) -> [String; 12] {
        [
            "--url".into(),
            self.url.clone(),
            "--prefix".into(),
            self.prefix.clone(),
            "--first".into(),
            self.first.to_string(),
            "--count".into(),
            self.count.to_string(),
            "--source-ip".into(),
            self.source_ip.to_string(),
            "--connect-concurrency".into(),
            self.connect_concurrency.to_string(),
        ]
    }
}

/// What every worker of a run shares.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub url: String,
    pub transport: Transport,
    pub prefix: String,
    pub channels: usize,
    pub connect_concurrency: usize,
    pub token: Option<String>,
    /// WebSocket connections without a subscription.
    pub connect_only: bool,
    /// Pusher application key (Sockudo).
    pub app_key: Option<String>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    plan: WorkerPlan,
}

/// Running workers.
#[derive(Default)]
pub struct WorkerSet {
    workers: Vec<Worker>,
}

impl WorkerSet {
    /// Starts one worker per plan. They connect at once; see [`WorkerSet::ready`].
    pub fn spawn(spec: &WorkerSpec, plans: &[WorkerPlan]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut workers = Vec::with_capacity(plans.len());
        for plan in plans {
            if plan.count > MAX_PER_WORKER {
                bail!(
                    "{} subscribers in one worker is over the open-file limit ({MAX_PER_WORKER})",
                    plan.count
                );
            }
            let mut command = tokio::process::Command::new(&exe);
            command
                .arg("fanout-worker")
                .args(
                    WorkerShare::new(&spec.url, &spec.prefix, plan, spec.connect_concurrency)
                        .to_args(),
                )
                .args(["--transport", spec.transport.name()])
                .args(["--channels", &spec.channels.to_string()])
                .args(spec.connect_only.then_some("--connect-only"))
                .args(
                    spec.app_key
                        .as_deref()
                        .map(|key| ["--app-key", key])
                        .into_iter()
                        .flatten(),
                )
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            // Through the environment, not argv, so it does not show in `ps`.
            match &spec.token {
                Some(token) => command.env("HERALD_BENCH_TOKEN", token),
                None => command.env_remove("HERALD_BENCH_TOKEN"),
            };
            let mut child = command.spawn().context("cannot start a worker process")?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            workers.push(Worker {
                child,
                stdin,
                stdout: BufReader::new(stdout).lines(),
                plan: plan.clone(),
            });
        }
        Ok(Self { workers })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Takes `other`'s workers in after this set's own (e.g. workers of another server URL).
    pub fn extend(&mut self, other: WorkerSet) {
        self.workers.extend(other.workers);
    }

    /// Waits for every worker's `ready` (all its subscribers set up or failed).
    pub async fn ready(&mut self, timeout: Duration) -> anyhow::Result<Vec<Ready>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(self.workers.len());
        for worker in &mut self.workers {
            match next_message(worker, deadline).await? {
                WorkerMessage::Ready(ready) => out.push(ready),
                _ => bail!("worker sent something else before `ready`"),
            }
        }
        Ok(out)
    }

    /// Sends `command` to every worker.
    pub async fn send(&mut self, command: &Command) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(command)?;
        line.push(b'\n');
        for worker in &mut self.workers {
            worker
                .stdin
                .write_all(&line)
                .await
                .with_context(|| format!("worker for {:?} is gone", worker.plan))?;
            worker.stdin.flush().await?;
        }
        Ok(())
    }

    /// Asks every worker what has arrived: (deliveries, missed) in total.
    pub async fn progress(&mut self, final_offsets: &[u64]) -> anyhow::Result<(u64, u64)> {
        self.send(&Command::Progress {
            final_offsets: final_offsets.to_vec(),
        })
        .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let (mut deliveries, mut missed) = (0, 0);
        for worker in &mut self.workers {
            match next_message(worker, deadline).await? {
                WorkerMessage::Progress {
                    deliveries: d,
                    missed: m,
                } => {
                    deliveries += d;
                    missed += m;
                }
                _ => bail!("worker answered `progress` with something else"),
            }
        }
        Ok((deliveries, missed))
    }

    /// Sends `stop` and collects every report; the workers exit after it.
    pub async fn stop(
        mut self,
        final_offsets: Vec<u64>,
        timeout: Duration,
    ) -> anyhow::Result<Vec<WorkerReport>> {
        self.send(&Command::Stop { final_offsets }).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(self.workers.len());
        for worker in &mut self.workers {
            match next_message(worker, deadline).await? {
                WorkerMessage::Report(report) => out.push(report),
                _ => bail!("worker sent something else than its report"),
            }
        }
        for worker in &mut self.workers {
            // Exiting closes thousands of sockets, which takes the kernel a moment.
            let _ = tokio::time::timeout(Duration::from_secs(30), worker.child.wait()).await;
        }
        Ok(out)
    }
}

async fn next_message(
    worker: &mut Worker,
    deadline: tokio::time::Instant,
) -> anyhow::Result<WorkerMessage> {
    let line = tokio::time::timeout_at(deadline, worker.stdout.next_line())
        .await
        .with_context(|| format!("worker for {:?} did not answer in time", worker.plan))?
        .context("reading a worker's output")?
        .with_context(|| format!("worker for {:?} exited", worker.plan))?;
    serde_json::from_str(&line).with_context(|| format!("bad line from a worker: {line:.200}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct WorkerCommandLine {
        #[command(flatten)]
        share: WorkerShare,
    }

    #[test]
    fn a_worker_parses_back_the_share_its_parent_gave_it() {
        let plans = plan(40, 3_000, 1_000, 4, 1);
        let given = WorkerShare::new("http://127.0.0.1:8000", "fan-7", &plans[2], 16);
        let parsed = WorkerCommandLine::try_parse_from(
            std::iter::once("fanout-worker".to_owned()).chain(given.to_args()),
        )
        .expect("the worker accepts its parent's flags");
        assert_eq!(parsed.share, given);
        assert_eq!(parsed.share.first, 2_040);
        assert_eq!(parsed.share.source_ip.to_string(), "127.0.0.4");
    }

    #[test]
    fn plans_spread_evenly_over_workers_and_addresses() {
        let plans = plan(100, 10_001, 5_000, 2, 0);
        assert_eq!(plans.len(), 3);
        assert_eq!(
            plans.iter().map(|p| p.count).collect::<Vec<_>>(),
            [3334, 3334, 3333]
        );
        assert_eq!(plans[0].first, 100);
        assert_eq!(plans[2].first + plans[2].count, 10_101);
        let ips: Vec<String> = plans.iter().map(|p| p.source_ip.to_string()).collect();
        assert_eq!(ips, ["127.0.0.1", "127.0.0.2", "127.0.0.1"]);
        assert_eq!(
            plan(0, 10, 5_000, 4, 3)[0].source_ip.to_string(),
            "127.0.0.4"
        );
        assert!(plan(0, 0, 10, 1, 0).is_empty());
    }
}
