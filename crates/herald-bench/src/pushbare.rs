//! The ceiling of the `push` scenario: a bare HTTP/2 sender to the same emulator, with the
//! same client library Herald's senders use (`reqwest`, HTTP/2 prior knowledge, one
//! connection), the same number of requests in flight as Herald's `[push.concurrency]`, and
//! the same requests (path, headers, body, a valid APNs provider token or FCM access token),
//! in a tight loop: no queue, no database, no JSON decoding of stored jobs. What it reaches is
//! what this machine allows for the provider path alone; Herald's rate is judged against it.
//!
//! Owns: one OS thread (pinned to the core Herald had) with a single-threaded Tokio runtime,
//! and its HTTP client. May touch: the network (the emulator only).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use crate::pushprocs::Mock;
use crate::pushwire::{self, Provider};
use crate::sysstat::CpuSample;

/// What the bare sender sends.
#[derive(Debug, Clone)]
pub struct BareSpec {
    pub provider: Provider,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Requests in all.
    pub count: u64,
    /// Device tokens cycle over this many devices (the registered ones).
    pub devices: usize,
    /// Sequence number of the first request.
    pub seq_base: u64,
    /// Stop sending after this long, whatever is left.
    pub max_time: Duration,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct BareReport {
    pub sent: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub per_sec: f64,
    /// Request round trip (send to answer), microseconds.
    pub rtt_p50_us: u64,
    pub rtt_p99_us: u64,
    /// The sender thread's CPU, percent of one core, and per request.
    pub cpu_percent: f64,
    pub cpu_us_per_push: f64,
}

/// Where and how to send, resolved before the loop starts.
struct Target {
    provider: Provider,
    /// APNs: `{base}/3/device/`; FCM: the project's `messages:send` URL.
    url: String,
    headers: HeaderMap,
    devices: Vec<String>,
}

impl Target {
    fn request(&self, client: &reqwest::Client, i: u64, seq: u64) -> reqwest::RequestBuilder {
        let token = &self.devices[(i % self.devices.len() as u64) as usize];
        let part = pushwire::provider_part(self.provider, seq);
        match self.provider {
            Provider::Apns => client
                .post(format!("{}{token}", self.url))
                .headers(self.headers.clone())
                .body(part.to_string()),
            Provider::Fcm => {
                let mut message = part;
                message["token"] = serde_json::Value::String(token.clone());
                let body = serde_json::json!({ "message": message });
                client
                    .post(&self.url)
                    .headers(self.headers.clone())
                    .body(body.to_string())
            }
        }
    }
}

fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .context("HTTP/2 client")
}

async fn target(spec: &BareSpec, mock: &MockTarget) -> anyhow::Result<Target> {
    let mut headers = HeaderMap::new();
    let url = match spec.provider {
        Provider::Apns => {
            for (name, value) in pushwire::apns_headers() {
                headers.insert(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            let jwt = pushwire::apns_jwt(&mock.apns_key)?;
            headers.insert(
                AUTHORIZATION,
                HeaderValue::from_str(&format!("bearer {jwt}")).context("JWT header")?,
            );
            format!("{}/3/device/", mock.apns_url)
        }
        Provider::Fcm => {
            let token = pushwire::fcm_access_token(&client()?, &mock.fcm_account).await?;
            headers.insert(
                AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {token}")).context("token header")?,
            );
            headers.insert(
                reqwest::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            format!(
                "{}/v1/projects/{}/messages:send",
                mock.fcm_url, mock.fcm_account.project_id
            )
        }
    };
    let devices = (0..spec.devices.max(1))
        .map(|i| pushwire::device_token(spec.provider, i))
        .collect();
    Ok(Target {
        provider: spec.provider,
        url,
        headers,
        devices,
    })
}

/// What of the emulator the sender needs (owned, to move to its thread).
#[derive(Debug, Clone)]
pub struct MockTarget {
    apns_url: String,
    fcm_url: String,
    apns_key: crate::pushprocs::ApnsKeyInfo,
    fcm_account: crate::pushprocs::FcmAccountInfo,
}

impl MockTarget {
    pub fn of(mock: &Mock) -> Self {
        Self {
            apns_url: mock.info.apns.clone(),
            fcm_url: mock.info.fcm.clone(),
            apns_key: mock.apns_key.clone(),
            fcm_account: mock.fcm_account.clone(),
        }
    }
}

struct Tally {
    histogram: Histogram<u64>,
    ok: u64,
    failed: u64,
    first_error: Option<String>,
}

async fn worker(
    client: reqwest::Client,
    target: Arc<Target>,
    next: Arc<AtomicU64>,
    spec: Arc<BareSpec>,
    deadline: Instant,
) -> anyhow::Result<Tally> {
    let mut tally = Tally {
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
        ok: 0,
        failed: 0,
        first_error: None,
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= spec.count || Instant::now() >= deadline {
            break;
        }
        let started = Instant::now();
        let outcome = async {
            let response = target
                .request(&client, i, spec.seq_base + i)
                .send()
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = response.status();
            let body = response
                .bytes()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
            }
        }
        .await;
        match outcome {
            Ok(()) => {
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                tally.histogram.saturating_record(micros.max(1));
                tally.ok += 1;
            }
            Err(error) => {
                tally.failed += 1;
                tally.first_error.get_or_insert(error);
            }
        }
    }
    Ok(tally)
}

async fn run_loop(spec: BareSpec, mock: MockTarget) -> anyhow::Result<BareReport> {
    let target = Arc::new(target(&spec, &mock).await?);
    let client = client()?;
    // One request first: the connection is up and the credentials work before the clock
    // starts.
    let probe = target
        .request(&client, 0, spec.seq_base.saturating_sub(1))
        .send()
        .await
        .context("the bare sender's first request")?;
    if !probe.status().is_success() {
        let status = probe.status();
        let body = probe.text().await.unwrap_or_default();
        anyhow::bail!("the bare sender's first request was refused: {status} {body}");
    }
    let spec = Arc::new(spec);
    let next = Arc::new(AtomicU64::new(0));
    let cpu_start = CpuSample::read_thread()?;
    let started = Instant::now();
    let deadline = started + spec.max_time;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..spec.concurrency.max(1) {
        tasks.spawn(worker(
            client.clone(),
            target.clone(),
            next.clone(),
            spec.clone(),
            deadline,
        ));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let (mut sent, mut failed, mut first_error) = (0, 0, None);
    while let Some(joined) = tasks.join_next().await {
        let tally = joined.context("a bare sender task panicked")??;
        histogram.add(&tally.histogram).context("histogram")?;
        sent += tally.ok;
        failed += tally.failed;
        if first_error.is_none() {
            first_error = tally.first_error;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_percent = CpuSample::read_thread()?.percent_since(&cpu_start);
    let per_sec = sent as f64 / seconds.max(1e-9);
    Ok(BareReport {
        sent,
        failed,
        first_error,
        seconds,
        per_sec,
        rtt_p50_us: histogram.value_at_quantile(0.5),
        rtt_p99_us: histogram.value_at_quantile(0.99),
        cpu_percent,
        cpu_us_per_push: if per_sec > 0.0 {
            cpu_percent * 1e4 / per_sec
        } else {
            0.0
        },
    })
}

/// Runs the bare sender to completion on a thread of its own pinned to `cpu` (none: any
/// core), with a single-threaded runtime. Blocking: call it from a blocking context.
pub fn run(spec: BareSpec, mock: MockTarget, cpu: Option<usize>) -> anyhow::Result<BareReport> {
    std::thread::Builder::new()
        .name("push-bare-sender".to_owned())
        .spawn(move || -> anyhow::Result<BareReport> {
            crate::pushprocs::pin_thread(cpu).context("pinning the bare sender")?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("the bare sender's runtime")?
                .block_on(run_loop(spec, mock))
        })
        .context("cannot start the bare sender thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the bare sender thread panicked"))?
}
