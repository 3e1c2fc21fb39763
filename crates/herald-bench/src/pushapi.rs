//! The `push` scenario's side of Herald's server API: registering the bench devices
//! (`device_register`, many per `/api/batch`), and `send_push_notification` calls — one to a
//! filter covering every device (the fan-out path), or one device each at a fixed offered
//! rate or as fast as the connections go (the request path) — noting when each call returned
//! (Unix µs, the clock the emulator stamps receipts with).
//!
//! Owns: its keep-alive HTTP/1.1 connections ([`crate::rawhttp`]). May touch: the network
//! (Herald's API only).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::push::now_ns;
use crate::pushwire::{self, Provider};
use crate::rawhttp::{RawConnection, encode_post};

/// Longest wait for one API answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Unix time in microseconds.
pub fn now_us() -> u64 {
    now_ns() / 1000
}

/// Herald's API at one address, with one key.
pub struct Api {
    addr: SocketAddr,
    host: String,
    key: String,
}

impl Api {
    /// `url` is `http://HOST:PORT` (what `herald serve` prints).
    pub async fn new(url: &str, key: &str) -> anyhow::Result<Self> {
        let host = url
            .strip_prefix("http://")
            .with_context(|| format!("expected an http:// URL, not {url:?}"))?
            .trim_end_matches('/')
            .to_owned();
        let addr = tokio::net::lookup_host(&host)
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .with_context(|| format!("{host} resolves to no address"))?;
        Ok(Self {
            addr,
            host,
            key: key.to_owned(),
        })
    }

    pub async fn connect(&self) -> anyhow::Result<RawConnection> {
        RawConnection::connect(self.addr)
            .await
            .map_err(anyhow::Error::msg)
    }

    /// Calls `method`; the reply body when it is a result (`{"result"…`, or for `batch`
    /// `{"replies"…` without an error in it). Transport failures leave `conn` unusable.
    pub async fn call(
        &self,
        conn: &mut RawConnection,
        method: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, Failure> {
        let request = encode_post(&format!("/api/{method}"), &self.host, &self.key, body);
        // Bounded, so a stuck server fails the run instead of hanging it.
        let reply = tokio::time::timeout(CALL_TIMEOUT, conn.round_trip(&request))
            .await
            .map_err(|_| Failure::Transport(format!("no answer in {CALL_TIMEOUT:?}")))?
            .map_err(Failure::Transport)?;
        let ok = reply.status == 200
            && if method == "batch" {
                reply.body.starts_with(b"{\"replies\"")
                    && memchr::memmem::find(reply.body, b"{\"error\"").is_none()
            } else {
                reply.body.starts_with(b"{\"result\"")
            };
        if ok {
            Ok(reply.body.to_vec())
        } else {
            let excerpt = String::from_utf8_lossy(&reply.body[..reply.body.len().min(300)]);
            Err(Failure::Reply(format!("HTTP {}: {excerpt}", reply.status)))
        }
    }
}

/// How a call went wrong.
#[derive(Debug)]
pub enum Failure {
    /// Herald answered with an error; the connection is fine.
    Reply(String),
    /// The connection broke.
    Transport(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Reply(m) | Failure::Transport(m) => m,
        }
    }
}

/// The `device_register` parameters of bench device `i`.
fn registration(provider: Provider, i: usize) -> Value {
    json!({
        "provider": provider.name(),
        "token": pushwire::device_token(provider, i),
        "platform": if provider == Provider::Apns { "ios" } else { "android" },
        "user": format!("bench-user-{i}"),
    })
}

/// Registers devices `0..count` through `device_register`, `per_batch` commands per
/// `/api/batch` request on `connections` connections; their ids in index order.
pub async fn register(
    api: &Arc<Api>,
    provider: Provider,
    count: usize,
    per_batch: usize,
    connections: usize,
) -> anyhow::Result<Vec<String>> {
    let per_batch = per_batch.clamp(1, 1000);
    let batches = count.div_ceil(per_batch);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections.clamp(1, batches.max(1)) {
        let (api, next) = (api.clone(), next.clone());
        tasks.spawn(async move {
            let mut conn = api.connect().await?;
            let mut out: Vec<(usize, Vec<String>)> = Vec::new();
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    return anyhow::Ok(out);
                }
                let first = b * per_batch;
                let indices = first..(first + per_batch).min(count);
                let commands: Vec<Value> = indices
                    .clone()
                    .map(|i| json!({"device_register": registration(provider, i)}))
                    .collect();
                let body = serde_json::to_vec(&json!({"parallel": true, "commands": commands}))?;
                let reply = api
                    .call(&mut conn, "batch", &body)
                    .await
                    .map_err(|f| anyhow::anyhow!("registering devices: {}", f.message()))?;
                let reply: Value = serde_json::from_slice(&reply).context("batch reply")?;
                let ids = reply["replies"]
                    .as_array()
                    .context("batch reply without replies")?
                    .iter()
                    .map(|r| {
                        r["device_register"]["id"]
                            .as_str()
                            .map(str::to_owned)
                            .with_context(|| format!("unexpected device_register reply {r}"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                if ids.len() != indices.len() {
                    bail!("{} replies for {} registrations", ids.len(), indices.len());
                }
                out.push((first, ids));
            }
        });
    }
    let mut ids = vec![String::new(); count];
    while let Some(joined) = tasks.join_next().await {
        for (first, batch) in joined.context("a registration task panicked")?? {
            for (k, id) in batch.into_iter().enumerate() {
                ids[first + k] = id;
            }
        }
    }
    Ok(ids)
}

/// The `send_push_notification` body for `recipient`, notification number `seq`.
pub fn push_body(provider: Provider, recipient: Value, seq: u64) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&json!({
        "recipient": recipient,
        "notification": pushwire::api_notification(provider, seq),
    }))?)
}

/// One `send_push_notification` on a fresh connection; when it returned (Unix µs).
pub async fn send_one(api: &Api, body: &[u8]) -> anyhow::Result<u64> {
    let mut conn = api.connect().await?;
    api.call(&mut conn, "send_push_notification", body)
        .await
        .map_err(|f| anyhow::anyhow!("send_push_notification: {}", f.message()))?;
    Ok(now_us())
}

/// How a request-path phase sends.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub provider: Provider,
    /// Request `i` goes to device `ids[i % ids.len()]`, as notification `seq_base + i`.
    pub ids: Arc<Vec<String>>,
    pub seq_base: u64,
    /// Most requests.
    pub total: u64,
    /// Requests per second (none: as fast as the connections go, one in flight each).
    pub rate: Option<f64>,
    pub connections: usize,
    /// No request starts after this long.
    pub max_time: Duration,
}

/// What a request-path phase did.
#[derive(Debug)]
pub struct LoadResult {
    /// When request `i` returned (Unix µs); 0: it failed or was not sent.
    pub returned_us: Vec<u64>,
    pub accepted: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// When the first request started and the last one returned (Unix µs).
    pub first_start_us: u64,
    pub last_return_us: u64,
    /// API round trips (µs).
    pub api_latency: Histogram<u64>,
    /// Requests that started more than 5 ms after their due time (fixed rate only).
    pub late: u64,
}

struct ConnTally {
    returned: Vec<(u64, u64)>,
    errors: u64,
    first_error: Option<String>,
    histogram: Histogram<u64>,
    late: u64,
}

async fn load_connection(
    api: Arc<Api>,
    spec: Arc<LoadSpec>,
    next: Arc<AtomicU64>,
    started: Instant,
) -> anyhow::Result<ConnTally> {
    let mut tally = ConnTally {
        returned: Vec::new(),
        errors: 0,
        first_error: None,
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
        late: 0,
    };
    let mut conn = api.connect().await?;
    let deadline = started + spec.max_time;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= spec.total {
            break;
        }
        if let Some(rate) = spec.rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if due >= deadline {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
            if due.elapsed() > Duration::from_millis(5) {
                tally.late += 1;
            }
        } else if Instant::now() >= deadline {
            break;
        }
        let id = &spec.ids[(i % spec.ids.len() as u64) as usize];
        let body = push_body(
            spec.provider,
            json!({"filter": {"ids": [id]}}),
            spec.seq_base + i,
        )?;
        let sent = Instant::now();
        match api.call(&mut conn, "send_push_notification", &body).await {
            Ok(_) => {
                tally.returned.push((i, now_us()));
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                tally.histogram.saturating_record(micros.max(1));
            }
            Err(failure) => {
                tally.errors += 1;
                let broken = matches!(failure, Failure::Transport(_));
                tally
                    .first_error
                    .get_or_insert_with(|| failure.message().to_owned());
                if broken {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    conn = api.connect().await?;
                }
            }
        }
    }
    Ok(tally)
}

/// Runs a request-path phase to its end (every request answered).
pub async fn load(api: &Arc<Api>, spec: LoadSpec) -> anyhow::Result<LoadResult> {
    if spec.ids.is_empty() {
        bail!("no devices to send to");
    }
    let spec = Arc::new(spec);
    let next = Arc::new(AtomicU64::new(0));
    let first_start_us = now_us();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..spec.connections.max(1) {
        tasks.spawn(load_connection(
            api.clone(),
            spec.clone(),
            next.clone(),
            started,
        ));
    }
    let mut result = LoadResult {
        returned_us: Vec::new(),
        accepted: 0,
        errors: 0,
        first_error: None,
        first_start_us,
        last_return_us: first_start_us,
        api_latency: Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
        late: 0,
    };
    let mut returned = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let tally = joined.context("a load connection panicked")??;
        result.errors += tally.errors;
        result.late += tally.late;
        if result.first_error.is_none() {
            result.first_error = tally.first_error;
        }
        result
            .api_latency
            .add(&tally.histogram)
            .context("histogram")?;
        returned.extend(tally.returned);
    }
    let len = returned.iter().map(|(i, _)| i + 1).max().unwrap_or(0);
    result.returned_us = vec![0; usize::try_from(len).context("too many requests")?];
    for (i, at) in returned {
        result.returned_us[i as usize] = at;
        result.accepted += 1;
        result.last_return_us = result.last_return_us.max(at);
    }
    Ok(result)
}
