//! The `push` scenario: push notifications per second through Herald's durable outbound
//! queue (SQLite `outbound.db`, default `sync`) to the local APNs and FCM emulators, beside
//! a bare HTTP/2 sender to the same emulator in the same run (the ceiling), and the latency
//! from `send_push_notification` returning to the emulator accepting the notification.
//!
//! Per provider it starts a fresh Herald (release binary, generated `[push]` config),
//! registers `--devices` devices through `device_register`, then runs the phases:
//! - `fanout`: one `send_push_notification` to a filter covering every device;
//! - `rate`: one device per request at `--rate` requests/s for `--duration`;
//! - `max`: one device per request, as fast as `--connections` connections go (closed
//!   loop), for `--duration` or `--max-requests`;
//! - `bare` (Herald stopped): `--concurrency` requests in flight straight to the emulator.
//!
//! Before each Herald phase the emulator is reset and one push goes through (the HTTP/2
//! connection is up, FCM has a fresh access token), then the phase runs until every push it
//! caused was accepted (or `--drain-max`). Latency = the emulator's `time_ms` of a
//! notification minus when the call that caused it returned; the emulator stamps whole
//! milliseconds, so latencies are exact to 1 ms. Pushes/s = notifications accepted ÷ (last
//! acceptance − first request), so any backlog left behind by the API counts against it.
//!
//! Owns: the orchestration and the report's shape. Processes are in [`crate::pushprocs`],
//! the API side in [`crate::pushapi`], the ceiling in [`crate::pushbare`], what goes over
//! the wire in [`crate::pushwire`], CPU/RSS sampling and receipt matching in
//! [`crate::pushmeasure`], the text and Markdown output in [`crate::pushtable`]. May touch:
//! the network (loopback), `/proc`, a temp work directory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use crate::pushapi::{self, Api, LoadSpec, now_us};
use crate::pushbare::{self, BareReport, BareSpec, MockTarget};
use crate::pushmeasure::{Latency, Meter, Usage, match_receipts};
use crate::pushprocs::{self, Herald, HeraldPush, Mock, WorkDir};
use crate::pushwire::{Control, MockStats, Provider};

/// A core to pin to, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cpu(pub Option<usize>);

pub fn parse_cpu(text: &str) -> Result<Cpu, String> {
    match text {
        "none" => Ok(Cpu(None)),
        n => n
            .parse()
            .map(|n| Cpu(Some(n)))
            .map_err(|_| format!("expected a CPU number or `none`, not {n:?}")),
    }
}

/// The phases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Fanout,
    Rate,
    Max,
    Bare,
}

/// Flags of `herald-bench push`.
#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// Providers to measure, in this order.
    #[arg(long, value_delimiter = ',', default_value = "apns,fcm")]
    pub providers: Vec<Provider>,
    /// Phases to run per provider.
    #[arg(long, value_delimiter = ',', default_value = "fanout,rate,max,bare")]
    pub phases: Vec<Phase>,
    /// Devices registered through `device_register`: the fan-out's audience; the request
    /// path and the bare sender cycle over them.
    #[arg(long, default_value_t = 20_000)]
    pub devices: usize,
    /// `device_register` commands per `/api/batch` request (at most 1000).
    #[arg(long, default_value_t = 1000)]
    pub register_batch: usize,
    /// Herald's `[push.concurrency]` for both providers, and the bare sender's requests in
    /// flight.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Herald's `[push.concurrency] fanout`: requests expanded into deliveries at once (64 is
    /// Herald's default).
    #[arg(long, default_value_t = 64)]
    pub fanout_concurrency: usize,
    /// Herald's `[push] batch` (most jobs one claim takes).
    #[arg(long, default_value_t = 256)]
    pub claim_batch: usize,
    /// Offered rate of the `rate` phase, requests/s (one device each).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Length of the `rate` and `max` phases' sending.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Most requests of the `max` phase.
    #[arg(long, default_value_t = 60_000)]
    pub max_requests: u64,
    /// Keep-alive HTTP/1.1 connections to Herald's API (one request in flight each).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Requests of the bare sender.
    #[arg(long, default_value_t = 60_000)]
    pub bare_requests: u64,
    /// Longest wait for the emulator to accept what a phase sent.
    #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
    pub drain_max: Duration,
    /// The `herald` binary (default: next to this one).
    #[arg(long)]
    pub herald: Option<PathBuf>,
    /// The `herald-pushmock` binary (default: next to this one).
    #[arg(long)]
    pub pushmock: Option<PathBuf>,
    /// Core Herald is pinned to (`none`: not pinned).
    #[arg(long, default_value = "0", value_parser = parse_cpu)]
    pub herald_cpu: Cpu,
    /// Core the bare sender is pinned to.
    #[arg(long, default_value = "0", value_parser = parse_cpu)]
    pub bare_cpu: Cpu,
    /// Core the emulator is pinned to.
    #[arg(long, default_value = "1", value_parser = parse_cpu)]
    pub mock_cpu: Cpu,
    /// Core this load generator is pinned to.
    #[arg(long, default_value = "1", value_parser = parse_cpu)]
    pub cpu: Cpu,
    /// Keep the work directory (configs, keys, Herald's data) and print where it is.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One Herald phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: Phase,
    /// `send_push_notification` calls made / answered with a result.
    pub requests: u64,
    pub api_errors: u64,
    pub first_error: Option<String>,
    /// Offered request rate (`rate` phase).
    pub offered_per_sec: Option<f64>,
    /// Requests answered per second while sending.
    pub api_per_sec: f64,
    /// Requests that started over 5 ms late (`rate` phase: the generator fell behind).
    pub late_starts: u64,
    /// API round trip of `send_push_notification`, p50 / p99 (µs).
    pub api_p50_us: u64,
    pub api_p99_us: u64,
    /// Notifications that should reach the emulator, and those that did (ours, distinct).
    pub expected: u64,
    pub delivered: u64,
    pub duplicates: u64,
    /// First request to last receipt.
    pub seconds: f64,
    pub pushes_per_sec: f64,
    /// Last API answer to last receipt.
    pub drain_seconds: f64,
    pub latency: Latency,
    pub usage: Usage,
    /// The emulator's refusals by reason (none expected).
    pub refused: BTreeMap<String, u64>,
}

/// The bare sender's phase.
#[derive(Debug, Clone, Serialize)]
pub struct BarePhase {
    #[serde(flatten)]
    pub sender: BareReport,
    pub accepted_by_mock: u64,
    pub usage: Usage,
}

/// Everything measured for one provider.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderReport {
    pub provider: Provider,
    pub devices: usize,
    pub register_seconds: f64,
    pub registered_per_sec: f64,
    pub phases: Vec<PhaseReport>,
    pub bare: Option<BarePhase>,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub scenario: &'static str,
    pub devices: usize,
    pub concurrency: usize,
    pub fanout_concurrency: usize,
    pub claim_batch: usize,
    pub connections: usize,
    pub rate: f64,
    pub duration_s: f64,
    pub max_requests: u64,
    pub herald_cpu: Cpu,
    pub bare_cpu: Cpu,
    pub mock_cpu: Cpu,
    pub loadgen_cpu: Cpu,
    pub herald_config: String,
    pub providers: Vec<ProviderReport>,
}

const WARM_SEQ: u64 = 1;
const FANOUT_SEQ: u64 = 2;
/// Request-path phases number their notifications from here (`rate`, then `max`).
const RATE_BASE: u64 = 1_000_000_000;
const MAX_BASE: u64 = 2_000_000_000;
const BARE_BASE: u64 = 3_000_000_000;

/// Polls the emulator's counter until it reaches `target` (or `max` passes); the counters
/// at the end.
async fn wait_accepted(
    control: &Control,
    provider: Provider,
    target: u64,
    max: Duration,
) -> anyhow::Result<MockStats> {
    let deadline = Instant::now() + max;
    loop {
        let stats = control.stats(provider).await?;
        if stats.accepted >= target || Instant::now() >= deadline {
            return Ok(stats);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resets the emulator and sends one push through Herald, so the phase starts with the
/// provider connection up (and FCM with a fresh access token after the reset).
async fn warm_up(
    api: &Api,
    control: &Control,
    provider: Provider,
    first_id: &str,
) -> anyhow::Result<MockStats> {
    control.reset().await?;
    let body = pushapi::push_body(provider, json!({"filter": {"ids": [first_id]}}), WARM_SEQ)?;
    pushapi::send_one(api, &body).await?;
    let stats = wait_accepted(control, provider, 1, Duration::from_secs(15)).await?;
    if stats.accepted < 1 {
        bail!(
            "the warm-up push did not reach the {} emulator in 15 s (refused: {:?})",
            provider.name(),
            stats.rejected
        );
    }
    Ok(stats)
}

/// Refusals counted in `after` that were not yet in `before`.
fn refused_since(before: &MockStats, after: &MockStats) -> BTreeMap<String, u64> {
    after
        .rejected
        .iter()
        .filter_map(|(reason, n)| {
            let new = n.saturating_sub(before.rejected.get(reason).copied().unwrap_or(0));
            (new > 0).then(|| (reason.clone(), new))
        })
        .collect()
}

/// What a Herald phase needs.
struct Ctx<'a> {
    args: &'a PushArgs,
    provider: Provider,
    api: Arc<Api>,
    control: &'a Control,
    ids: Arc<Vec<String>>,
    herald_pid: u32,
    mock_pid: u32,
}

async fn fanout_phase(ctx: &Ctx<'_>) -> anyhow::Result<PhaseReport> {
    let provider = ctx.provider;
    let warm = warm_up(&ctx.api, ctx.control, provider, &ctx.ids[0]).await?;
    let expected = ctx.ids.len() as u64;
    let body = pushapi::push_body(
        provider,
        json!({"filter": {"providers": [provider.name()]}}),
        FANOUT_SEQ,
    )?;
    let meter = Meter::start(Some(ctx.herald_pid), ctx.mock_pid)?;
    let started_us = now_us();
    let returned_us = pushapi::send_one(&ctx.api, &body).await?;
    let stats = wait_accepted(ctx.control, provider, 1 + expected, ctx.args.drain_max).await?;
    // Before the records are fetched: the window is the sending, not the bench's reading.
    let usage = meter.finish(stats.accepted.saturating_sub(1))?;
    let receipts = ctx.control.receipts(provider).await?;
    let matched = match_receipts(
        &receipts,
        FANOUT_SEQ..FANOUT_SEQ + 1,
        |_| Some(returned_us),
        true,
    )?;
    let seconds = matched.last_us.saturating_sub(started_us) as f64 / 1e6;
    Ok(PhaseReport {
        phase: Phase::Fanout,
        requests: 1,
        api_errors: 0,
        first_error: None,
        offered_per_sec: None,
        api_per_sec: 0.0,
        late_starts: 0,
        api_p50_us: returned_us.saturating_sub(started_us),
        api_p99_us: returned_us.saturating_sub(started_us),
        expected,
        delivered: matched.delivered,
        duplicates: matched.duplicates,
        seconds,
        pushes_per_sec: matched.delivered as f64 / seconds.max(1e-9),
        drain_seconds: matched.last_us.saturating_sub(returned_us) as f64 / 1e6,
        latency: matched.latency,
        usage,
        refused: refused_since(&warm, &stats),
    })
}

async fn request_phase(ctx: &Ctx<'_>, phase: Phase) -> anyhow::Result<PhaseReport> {
    let provider = ctx.provider;
    let args = ctx.args;
    let warm = warm_up(&ctx.api, ctx.control, provider, &ctx.ids[0]).await?;
    let (rate, total, base) = match phase {
        Phase::Rate => (
            Some(args.rate),
            (args.rate * args.duration.as_secs_f64()).ceil() as u64,
            RATE_BASE,
        ),
        _ => (None, args.max_requests, MAX_BASE),
    };
    let meter = Meter::start(Some(ctx.herald_pid), ctx.mock_pid)?;
    let load = pushapi::load(
        &ctx.api,
        LoadSpec {
            provider,
            ids: ctx.ids.clone(),
            seq_base: base,
            total,
            rate,
            connections: args.connections,
            max_time: args.duration,
        },
    )
    .await?;
    let stats = wait_accepted(ctx.control, provider, 1 + load.accepted, args.drain_max).await?;
    let usage = meter.finish(stats.accepted.saturating_sub(1))?;
    let receipts = ctx.control.receipts(provider).await?;
    let returned = &load.returned_us;
    let matched = match_receipts(
        &receipts,
        base..base + returned.len() as u64,
        |k| returned.get(k as usize).copied(),
        false,
    )?;
    let sending = load.last_return_us.saturating_sub(load.first_start_us) as f64 / 1e6;
    let seconds = matched.last_us.saturating_sub(load.first_start_us) as f64 / 1e6;
    Ok(PhaseReport {
        phase,
        requests: load.accepted,
        api_errors: load.errors,
        first_error: load.first_error,
        offered_per_sec: rate,
        api_per_sec: load.accepted as f64 / sending.max(1e-9),
        late_starts: load.late,
        api_p50_us: load.api_latency.value_at_quantile(0.5),
        api_p99_us: load.api_latency.value_at_quantile(0.99),
        expected: load.accepted,
        delivered: matched.delivered,
        duplicates: matched.duplicates,
        seconds,
        pushes_per_sec: matched.delivered as f64 / seconds.max(1e-9),
        drain_seconds: matched.last_us.saturating_sub(load.last_return_us) as f64 / 1e6,
        latency: matched.latency,
        usage,
        refused: refused_since(&warm, &stats),
    })
}

async fn bare_phase(
    args: &PushArgs,
    provider: Provider,
    mock: &Mock,
    control: &Control,
) -> anyhow::Result<BarePhase> {
    control.reset().await?;
    let spec = BareSpec {
        provider,
        concurrency: args.concurrency,
        count: args.bare_requests,
        devices: args.devices,
        seq_base: BARE_BASE,
        max_time: args.duration.max(Duration::from_secs(5)) * 4,
    };
    let target = MockTarget::of(mock);
    let cpu = args.bare_cpu.0;
    let meter = Meter::start(None, mock.pid())?;
    let sender = tokio::task::spawn_blocking(move || pushbare::run(spec, target, cpu))
        .await
        .context("the bare sender panicked")??;
    let usage = meter.finish(sender.sent)?;
    let stats = control.stats(provider).await?;
    Ok(BarePhase {
        // The probe request is one of them.
        accepted_by_mock: stats.accepted.saturating_sub(1),
        sender,
        usage,
    })
}

async fn run_provider(
    args: &PushArgs,
    provider: Provider,
    mock: &Mock,
    control: &Control,
    work: &WorkDir,
    herald_exe: &std::path::Path,
    config: &mut String,
) -> anyhow::Result<ProviderReport> {
    let dir = work.path().join(format!("herald-{}", provider.name()));
    let api_key = format!("bench-{:016x}", crate::push::now_ns());
    let herald_config = pushprocs::herald_config(
        &dir.join("data"),
        &api_key,
        mock,
        &HeraldPush {
            concurrency: args.concurrency,
            fanout: args.fanout_concurrency,
            batch: args.claim_batch,
        },
    )?;
    *config = herald_config.replace(&api_key, "KEY");
    let herald = Herald::start(herald_exe, &dir, &herald_config, args.herald_cpu.0)?;
    let api = Arc::new(Api::new(&herald.url, &api_key).await?);
    eprintln!(
        "push: {}: Herald pid {} at {}; registering {} devices",
        provider.name(),
        herald.pid(),
        herald.url,
        args.devices
    );
    let registering = Instant::now();
    let ids = pushapi::register(&api, provider, args.devices, args.register_batch, 4).await?;
    let register_seconds = registering.elapsed().as_secs_f64();
    let ctx = Ctx {
        args,
        provider,
        api,
        control,
        ids: Arc::new(ids),
        herald_pid: herald.pid(),
        mock_pid: mock.pid(),
    };
    let mut phases = Vec::new();
    for phase in &args.phases {
        let report = match phase {
            Phase::Fanout => fanout_phase(&ctx).await?,
            Phase::Rate | Phase::Max => request_phase(&ctx, *phase).await?,
            Phase::Bare => continue,
        };
        eprintln!(
            "push: {} {:?}: {} of {} delivered, {:.0}/s, p50 {:.1} ms, p99 {:.1} ms",
            provider.name(),
            phase,
            report.delivered,
            report.expected,
            report.pushes_per_sec,
            report.latency.p50_us as f64 / 1000.0,
            report.latency.p99_us as f64 / 1000.0
        );
        phases.push(report);
    }
    herald.stop();
    let bare = if args.phases.contains(&Phase::Bare) {
        let bare = bare_phase(args, provider, mock, control).await?;
        eprintln!(
            "push: {} bare sender: {} sent, {:.0}/s",
            provider.name(),
            bare.sender.sent,
            bare.sender.per_sec
        );
        Some(bare)
    } else {
        None
    };
    Ok(ProviderReport {
        provider,
        devices: args.devices,
        register_seconds,
        registered_per_sec: args.devices as f64 / register_seconds.max(1e-9),
        phases,
        bare,
    })
}

/// Runs the scenario.
pub async fn run(args: &PushArgs) -> anyhow::Result<PushReport> {
    if args.devices == 0 || args.connections == 0 || args.concurrency == 0 {
        bail!("--devices, --connections and --concurrency must be above 0");
    }
    if args.rate <= 0.0 || args.duration.is_zero() {
        bail!("--rate and --duration must be above 0");
    }
    let herald_exe = match &args.herald {
        Some(path) => path.clone(),
        None => pushprocs::sibling_exe("herald")?,
    };
    let mock_exe = match &args.pushmock {
        Some(path) => path.clone(),
        None => pushprocs::sibling_exe("herald-pushmock")?,
    };
    for exe in [&herald_exe, &mock_exe] {
        if !exe.is_file() {
            bail!(
                "{} is missing (cargo build --release -p herald-server -p herald-pushmock)",
                exe.display()
            );
        }
    }
    let work = WorkDir::new("herald-bench-push")?;
    let max_records = [
        args.devices as u64,
        args.max_requests,
        (args.rate * args.duration.as_secs_f64()).ceil() as u64,
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
        + 16;
    let mock = Mock::start(
        &mock_exe,
        work.path(),
        args.mock_cpu.0,
        usize::try_from(max_records).unwrap_or(usize::MAX),
    )?;
    let control = Control::new(&mock.control)?;
    let mut config = String::new();
    let mut providers = Vec::new();
    for provider in &args.providers {
        providers.push(
            run_provider(
                args,
                *provider,
                &mock,
                &control,
                &work,
                &herald_exe,
                &mut config,
            )
            .await?,
        );
    }
    drop(mock);
    if args.keep {
        let kept = work.path().to_path_buf();
        std::mem::forget(work);
        eprintln!("push: work directory kept at {}", kept.display());
    }
    Ok(PushReport {
        scenario: "push",
        devices: args.devices,
        concurrency: args.concurrency,
        fanout_concurrency: args.fanout_concurrency,
        claim_batch: args.claim_batch,
        connections: args.connections,
        rate: args.rate,
        duration_s: args.duration.as_secs_f64(),
        max_requests: args.max_requests,
        herald_cpu: args.herald_cpu,
        bare_cpu: args.bare_cpu,
        mock_cpu: args.mock_cpu,
        loadgen_cpu: args.cpu,
        herald_config: config,
        providers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_parse() {
        assert_eq!(parse_cpu("none"), Ok(Cpu(None)));
        assert_eq!(parse_cpu("1"), Ok(Cpu(Some(1))));
        assert!(parse_cpu("x").is_err());
    }
}
