//! The fan-out scenario's publisher: timestamped publications at a fixed total rate over the
//! HTTP server API (`/api/publish`, or `/api/batch` with several per request), open loop —
//! or to a peer ([`PublishKind`]; the peers' request formats and the NATS publisher are in
//! [`crate::peerpub`]).
//!
//! Owns a few keep-alive [`crate::rawhttp`] connections and the schedule: request j is due
//! at `start + j × batch / rate` and goes out on connection `j mod connections`; a request
//! that is late (its connection still busy) goes out at once, and the lag is reported. Each
//! publication's data carries its send time ([`crate::push::payload`]). Every reply is
//! decoded for the publication's offset, so the final offset of every channel is known and
//! the subscribers can tell what they missed. Peers have no offsets: publication k of a
//! channel carries sequence number k in its data, and the "final offset" of a channel is the
//! number of its publications the peer accepted.
//!
//! May touch: the network (only the server it is given).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::peerpub;
use crate::push;
use crate::pusher::PusherApp;
use crate::rawhttp::{RawConnection, encode_post};

/// How publications reach the server.
#[derive(Debug, Clone)]
pub enum PublishKind {
    /// Herald's HTTP API with this key.
    Herald { api_key: String },
    /// `POST /pub/<channel>`, the data as the body: the ceiling, Node `ws`, Socket.IO.
    Post,
    /// The Pusher HTTP API (`POST /apps/<id>/events`, signed): Sockudo.
    Pusher(PusherApp),
    /// Pushpin's publish endpoint (`POST /publish/`), one item per publication, in the format
    /// its subscribers read.
    Pushpin(PushpinFormat),
    /// NATS core protocol over TCP, `PUB` on one connection.
    Nats,
    /// MQTT 3.1.1 over TCP, `PUBLISH` on one connection (Mosquitto, Herald's MQTT listener).
    Mqtt(MqttPublish),
}

/// How the MQTT publisher publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttPublish {
    /// The CONNECT password (Herald: a connection token allowed to publish).
    pub password: Option<String>,
    /// 0: fire and forget, a `PINGREQ`/`PINGRESP` at the end confirms the server read them
    /// all. 1: every `PUBLISH` waits for its `PUBACK` (Herald sends it once the publication
    /// is durable), at most `inflight` unacknowledged at a time.
    pub qos: u8,
    pub inflight: usize,
}

/// What a Pushpin publish item carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushpinFormat {
    /// `http-stream`: one SSE event (subscribers over SSE).
    HttpStream,
    /// `ws-message`: one WebSocket text message (subscribers over WebSocket).
    WsMessage,
}

impl PublishKind {
    pub fn is_peer(&self) -> bool {
        !matches!(self, Self::Herald { .. })
    }

    /// Takes several publications per request (`--batch` above 1): Herald and Pushpin.
    pub fn takes_batches(&self) -> bool {
        matches!(self, Self::Herald { .. } | Self::Pushpin(_))
    }
}

/// Why `--batch` above 1 is refused for a peer.
pub const BATCH_ERROR: &str =
    "peers other than Pushpin take one publication per request (--batch 1)";

/// What to publish, and where.
#[derive(Debug)]
pub struct PublisherConfig {
    pub addr: SocketAddr,
    pub host: String,
    pub kind: PublishKind,
    pub channels: Vec<String>,
    /// Publications per second, in total over all channels.
    pub rate: f64,
    /// Publications per request: 1 uses `/api/publish`, more `/api/batch`.
    pub batch: usize,
    /// Approximate size of each publication's JSON data.
    pub payload: usize,
    /// Keep-alive connections (requests in flight at most).
    pub connections: usize,
}

/// What the publisher did.
#[derive(Debug, Default, Serialize)]
pub struct PublishOutcome {
    /// Publications the server accepted, in total.
    pub publications: u64,
    /// Of those, the ones sent inside the measured window.
    pub publications_in_window: u64,
    /// Failed requests and failed commands in a batch.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Largest delay of a request behind its schedule, in microseconds.
    pub max_lag_us: u64,
    /// Publications due before the end that the target's slow answers held back until after
    /// it: not sent at all, since after the window they would count on neither side and
    /// only lengthen the drain (a saturated peer's run ends on time).
    pub unsent_late: u64,
    /// Per channel index, the highest offset a reply reported (0: none).
    #[serde(skip)]
    pub final_offsets: Vec<u64>,
}

impl PublishOutcome {
    pub(crate) fn error(&mut self, message: String) {
        self.errors += 1;
        self.first_error.get_or_insert(message);
    }
}

impl PublisherConfig {
    fn path(&self) -> &'static str {
        if self.batch > 1 {
            "/api/batch"
        } else {
            "/api/publish"
        }
    }

    /// The channel indices of request `j`.
    fn channels_of(&self, j: u64) -> impl Iterator<Item = usize> + '_ {
        let n = self.channels.len() as u64;
        let batch = self.batch as u64;
        (0..batch).map(move |k| ((j * batch + k) % n) as usize)
    }

    /// Channel and sequence number (1, 2, …) of publication `i` to a peer (request `j`
    /// holds publications `j × batch` up to `j × batch + batch − 1`).
    pub fn peer_publication(&self, i: u64) -> (usize, u64) {
        let n = self.channels.len().max(1) as u64;
        ((i % n) as usize, i / n + 1)
    }

    /// The complete HTTP request `j`, stamped with `sent_ns`.
    fn request(&self, j: u64, sent_ns: u64) -> Vec<u8> {
        let api_key = match &self.kind {
            PublishKind::Herald { api_key } => api_key,
            kind => {
                let batch = self.batch as u64;
                let items: Vec<(&str, String)> = (j * batch..(j + 1) * batch)
                    .map(|i| {
                        let (c, seq) = self.peer_publication(i);
                        (
                            self.channels[c].as_str(),
                            push::seq_payload(sent_ns, seq, self.payload),
                        )
                    })
                    .collect();
                return peerpub::http_request(kind, &self.host, &items);
            }
        };
        let data = push::payload(sent_ns, self.payload);
        let publish = |c: usize| {
            format!(
                "{{\"channel\":{},\"data\":{data}}}",
                serde_json::Value::from(self.channels[c].as_str())
            )
        };
        let body = if self.batch > 1 {
            let commands: Vec<String> = self
                .channels_of(j)
                .map(|c| format!("{{\"publish\":{}}}", publish(c)))
                .collect();
            format!(
                "{{\"parallel\":true,\"commands\":[{}]}}",
                commands.join(",")
            )
        } else {
            publish(self.channels_of(j).next().unwrap_or(0))
        };
        encode_post(self.path(), &self.host, api_key, body.as_bytes())
    }
}

/// The offsets in a reply, one per publication (`Err` for a failed one), or why the whole
/// request failed.
fn offsets_of(status: u16, body: &[u8], batch: bool) -> Result<Vec<Result<u64, String>>, String> {
    let excerpt = || String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    if status != 200 {
        return Err(format!("HTTP {status}: {}", excerpt()));
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("reply is not JSON ({e}): {}", excerpt()))?;
    let offset = |result: &serde_json::Value| result["offset"].as_u64().unwrap_or(0);
    if !batch {
        return match value.get("result") {
            Some(result) => Ok(vec![Ok(offset(result))]),
            None => Err(format!("error reply: {}", excerpt())),
        };
    }
    let Some(replies) = value.get("replies").and_then(serde_json::Value::as_array) else {
        return Err(format!("error reply: {}", excerpt()));
    };
    Ok(replies
        .iter()
        .map(|reply| match reply.get("publish") {
            Some(result) => Ok(offset(result)),
            None => Err(format!("batch command failed: {reply}")),
        })
        .collect())
}

/// One publish before the run, so a wrong key or URL fails loudly.
pub async fn probe(config: &PublisherConfig, channel: &str) -> anyhow::Result<()> {
    let api_key = match &config.kind {
        PublishKind::Herald { api_key } => api_key,
        kind => return peerpub::probe(kind, config, channel).await,
    };
    let mut connection = RawConnection::connect(config.addr)
        .await
        .map_err(anyhow::Error::msg)?;
    let body = format!(
        "{{\"channel\":{},\"data\":{}}}",
        serde_json::Value::from(channel),
        push::payload(push::now_ns(), config.payload)
    );
    let request = encode_post("/api/publish", &config.host, api_key, body.as_bytes());
    let reply = connection
        .round_trip(&request)
        .await
        .map_err(anyhow::Error::msg)?;
    match offsets_of(reply.status, reply.body, false) {
        Ok(_) => Ok(()),
        Err(error) => bail!("the first publish failed: {error}"),
    }
}

/// Publishes from `start` until `end`; publications stamped (Unix ns) inside `window` are the
/// window's, the same rule the subscribers apply, so a late request sent after the window
/// counts on neither side.
pub async fn run(
    config: Arc<PublisherConfig>,
    start: Instant,
    end: Instant,
    window: (u64, u64),
) -> anyhow::Result<PublishOutcome> {
    if config.rate <= 0.0 || config.channels.is_empty() || config.batch == 0 {
        bail!("the publisher needs a rate above 0, channels and a batch above 0");
    }
    if config.batch != 1 && !config.kind.takes_batches() {
        bail!(BATCH_ERROR);
    }
    match &config.kind {
        PublishKind::Nats => return Ok(peerpub::nats_run(&config, start, end, window).await),
        PublishKind::Mqtt(mqtt) => {
            return Ok(peerpub::mqtt_run(&config, mqtt, start, end, window).await);
        }
        _ => {}
    }
    let outcome = Arc::new(Mutex::new(PublishOutcome {
        final_offsets: vec![0; config.channels.len()],
        ..PublishOutcome::default()
    }));
    let connections = config.connections.max(1);
    let mut tasks = Vec::with_capacity(connections);
    for k in 0..connections {
        tasks.push(tokio::spawn(connection_loop(
            config.clone(),
            outcome.clone(),
            k as u64,
            connections as u64,
            (start, end, window),
        )));
    }
    for task in tasks {
        task.await?;
    }
    let mut outcome = outcome
        .lock()
        .map_err(|_| anyhow::anyhow!("a publisher task panicked"))?;
    Ok(std::mem::take(&mut *outcome))
}

async fn connection_loop(
    config: Arc<PublisherConfig>,
    outcome: Arc<Mutex<PublishOutcome>>,
    first: u64,
    step: u64,
    (start, end, window): (Instant, Instant, (u64, u64)),
) {
    let interval = config.batch as f64 / config.rate;
    let batch = config.batch > 1;
    let peer = config.kind.is_peer();
    let mut connection: Option<RawConnection> = None;
    let mut j = first;
    loop {
        let due = start + Duration::from_secs_f64(j as f64 * interval);
        if due >= end {
            return;
        }
        tokio::time::sleep_until(due.into()).await;
        let now = Instant::now();
        if now >= end {
            lock(&outcome).unsent_late += config.batch as u64;
            j += step;
            continue;
        }
        let lag = u64::try_from(now.saturating_duration_since(due).as_micros()).unwrap_or(u64::MAX);
        let sent_ns = push::now_ns();
        let in_window = sent_ns >= window.0 && sent_ns < window.1;
        let request = config.request(j, sent_ns);
        j += step;
        if connection.is_none() {
            match RawConnection::connect(config.addr).await {
                Ok(fresh) => connection = Some(fresh.accept_close()),
                Err(error) => {
                    lock(&outcome).error(error);
                    continue;
                }
            }
        }
        let Some(live) = connection.as_mut() else {
            continue;
        };
        let (result, close) = match live.round_trip(&request).await {
            Ok(reply) if peer => (
                peerpub::accepted(reply.status, reply.body, config.batch),
                reply.close,
            ),
            Ok(reply) => (offsets_of(reply.status, reply.body, batch), reply.close),
            Err(error) => (Err(error), true),
        };
        if close {
            connection = None;
        }
        let mut outcome = lock(&outcome);
        outcome.max_lag_us = outcome.max_lag_us.max(lag);
        match result {
            Ok(offsets) => {
                for (c, offset) in config.channels_of(j - step).zip(offsets) {
                    match offset {
                        Ok(offset) => {
                            outcome.publications += 1;
                            if in_window {
                                outcome.publications_in_window += 1;
                            }
                            let top = &mut outcome.final_offsets[c];
                            // Peers: how many were accepted (the highest sequence number
                            // when none failed).
                            *top = if peer { *top + 1 } else { (*top).max(offset) };
                        }
                        Err(error) => outcome.error(error),
                    }
                }
            }
            Err(error) => outcome.error(error),
        }
    }
}

pub(crate) fn lock(outcome: &Mutex<PublishOutcome>) -> std::sync::MutexGuard<'_, PublishOutcome> {
    // A panicking task poisons the lock; its counts are still worth reporting.
    outcome
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(batch: usize, channels: usize) -> PublisherConfig {
        PublisherConfig {
            addr: "127.0.0.1:1".parse().expect("addr"),
            host: "h:1".into(),
            kind: PublishKind::Herald {
                api_key: "k".into(),
            },
            channels: (0..channels).map(|c| format!("fan-{c}")).collect(),
            rate: 100.0,
            batch,
            payload: 64,
            connections: 1,
        }
    }

    fn body(request: &[u8]) -> serde_json::Value {
        let text = String::from_utf8_lossy(request);
        let (_, body) = text.split_once("\r\n\r\n").expect("head and body");
        serde_json::from_str(body).expect("JSON body")
    }

    #[test]
    fn requests_round_robin_over_channels() {
        let single = config(1, 3);
        let request = single.request(4, 77);
        assert!(request.starts_with(b"POST /api/publish HTTP/1.1\r\n"));
        let value = body(&request);
        assert_eq!(value["channel"], "fan-1");
        assert_eq!(value["data"]["t"], 77);
        let batch = config(4, 10);
        let value = body(&batch.request(3, 5));
        let channels: Vec<&str> = value["commands"]
            .as_array()
            .expect("commands")
            .iter()
            .map(|c| c["publish"]["channel"].as_str().expect("channel"))
            .collect();
        assert_eq!(channels, ["fan-2", "fan-3", "fan-4", "fan-5"]);
    }

    /// A target that takes 100 ms to answer each publish (10/s) against 100/s offered: the
    /// run still ends at `end`, and what was due but held back is counted, not sent late.
    #[tokio::test]
    async fn a_slow_target_gets_nothing_after_the_end() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, server) = crate::testserver::serve_one(|mut socket| async move {
            let mut buf = vec![0u8; 65536];
            let mut requests = 0u64;
            // One request per read is enough: the publisher waits for each reply.
            while let Ok(n) = socket.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                requests += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let body = format!(r#"{{"result":{{"offset":{requests},"epoch":"e"}}}}"#);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if socket.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
            requests
        })
        .await;
        let config = Arc::new(PublisherConfig {
            addr,
            ..config(1, 1)
        });
        let start = Instant::now();
        let end = start + Duration::from_millis(500);
        let window = (push::now_ns(), push::now_ns() + 500_000_000);
        let outcome = run(config, start, end, window).await.expect("run");
        let finished = start.elapsed();
        // Due before the end: j = 0..50. The last request sent may end up to 100 ms late.
        assert!(finished < Duration::from_millis(700), "took {finished:?}");
        assert_eq!(outcome.publications + outcome.unsent_late, 50);
        assert!((4..=6).contains(&outcome.publications), "{outcome:?}");
        assert_eq!(outcome.final_offsets, [outcome.publications]);
        assert_eq!(outcome.errors, 0);
        drop(server);
    }

    #[test]
    fn replies_give_offsets() {
        assert_eq!(
            offsets_of(200, br#"{"result":{"offset":42,"epoch":"e"}}"#, false),
            Ok(vec![Ok(42)])
        );
        assert!(offsets_of(200, br#"{"error":{"code":102}}"#, false).is_err());
        assert!(offsets_of(401, b"{}", false).is_err());
        let replies = offsets_of(
            200,
            br#"{"replies":[{"publish":{"offset":3}},{"error":{"code":106}}]}"#,
            true,
        )
        .expect("batch reply");
        assert_eq!(replies[0], Ok(3));
        assert!(replies[1].is_err());
    }
}
