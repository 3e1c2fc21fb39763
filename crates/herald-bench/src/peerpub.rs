//! Publishing to Herald's peers: the HTTP requests each one takes (the ceiling's, Node `ws`'s
//! and Socket.IO's `POST /pub/<channel>`, the signed Pusher API, Pushpin's publish endpoint
//! with `http-stream` or `ws-message` items), how their replies are judged, and the NATS
//! publisher (core protocol over TCP, `PUB` lines on one connection, open loop, then `PING`
//! and its `PONG` to know every `PUB` was taken), and the MQTT publisher (3.1.1 over TCP, one
//! connection: at QoS 0 open loop then `PINGREQ`/`PINGRESP`, at QoS 1 each `PUBLISH` counted
//! at its `PUBACK`, a bounded number in flight).
//!
//! Owns only the peers' wire formats and the NATS and MQTT connections; the schedule and counting are
//! [`crate::publisher`]'s. May touch: the network (only the server it is given).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mqtt::{self, MqttEvent, MqttReader};
use crate::publisher::{MqttPublish, PublishKind, PublishOutcome, PublisherConfig, PushpinFormat};
use crate::push;
use crate::rawhttp::{RawConnection, encode_request};

/// The HTTP request publishing each `(channel, data)` (data: a [`push::seq_payload`]); only
/// Pushpin takes more than one per request, the others publish the first.
pub fn http_request(kind: &PublishKind, host: &str, items: &[(&str, String)]) -> Vec<u8> {
    let json = |text: &str| serde_json::Value::from(text).to_string();
    let (channel, data) = items.first().map_or(("", ""), |(c, d)| (*c, d.as_str()));
    match kind {
        PublishKind::Pusher(app) => {
            let body = format!(
                "{{\"name\":\"m\",\"channel\":{},\"data\":{}}}",
                json(channel),
                json(data)
            );
            let path = app.events_path(body.as_bytes(), push::now_ns() / 1_000_000_000);
            encode_request(
                &path,
                host,
                "Content-Type: application/json\r\n",
                body.as_bytes(),
            )
        }
        PublishKind::Pushpin(format) => {
            let items: Vec<String> = items
                .iter()
                .map(|(channel, data)| {
                    let (name, content) = match format {
                        PushpinFormat::HttpStream => {
                            ("http-stream", json(&format!("event: m\ndata: {data}\n\n")))
                        }
                        PushpinFormat::WsMessage => ("ws-message", json(data)),
                    };
                    format!(
                        "{{\"channel\":{},\"formats\":{{\"{name}\":{{\"content\":{content}}}}}}}",
                        json(channel)
                    )
                })
                .collect();
            let body = format!("{{\"items\":[{}]}}", items.join(","));
            encode_request(
                "/publish/",
                host,
                "Content-Type: application/json\r\n",
                body.as_bytes(),
            )
        }
        // The ceiling, Node `ws`, Socket.IO (and nothing else reaches here).
        _ => encode_request(
            &format!("/pub/{channel}"),
            host,
            "Content-Type: text/plain\r\n",
            data.as_bytes(),
        ),
    }
}

/// A peer's reply to a request of `count` publications: any 2xx accepts them all (peers have
/// no offsets: 0).
pub fn accepted(
    status: u16,
    body: &[u8],
    count: usize,
) -> Result<Vec<Result<u64, String>>, String> {
    if (200..300).contains(&status) {
        Ok(vec![Ok(0); count])
    } else {
        Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    }
}

/// One publication (or, for NATS, a connection and a `PING`) before the run, so a wrong
/// address or key fails loudly.
pub async fn probe(
    kind: &PublishKind,
    config: &PublisherConfig,
    channel: &str,
) -> anyhow::Result<()> {
    match kind {
        PublishKind::Nats => {
            let mut nats = NatsPublisher::connect(config).await?;
            return nats.flush(Duration::from_secs(5)).await;
        }
        PublishKind::Mqtt(how) => {
            let mut mqtt = MqttPublisher::connect(config, how).await?;
            return mqtt.flush(Duration::from_secs(5)).await;
        }
        _ => {}
    }
    let mut connection = RawConnection::connect(config.addr)
        .await
        .map_err(anyhow::Error::msg)?
        .accept_close();
    let data = push::seq_payload(push::now_ns(), 1, config.payload);
    let request = http_request(kind, &config.host, &[(channel, data)]);
    let reply = connection
        .round_trip(&request)
        .await
        .map_err(anyhow::Error::msg)?;
    match accepted(reply.status, reply.body, 1) {
        Ok(_) => Ok(()),
        Err(error) => bail!("the first publish failed: {error}"),
    }
}

/// One NATS client connection that only publishes.
struct NatsPublisher {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl NatsPublisher {
    /// Connects, reads `INFO`, sends `CONNECT`.
    async fn connect(config: &PublisherConfig) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(config.addr)
            .await
            .with_context(|| format!("cannot connect to NATS at {}", config.addr))?;
        stream.set_nodelay(true)?;
        let mut nats = Self {
            stream,
            buf: Vec::with_capacity(4096),
        };
        let info = nats.line(Duration::from_secs(5)).await?;
        if !info.starts_with("INFO") {
            bail!("NATS said {info:.100} instead of INFO");
        }
        nats.stream
            .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"name\":\"herald-bench-publisher\"}\r\n")
            .await?;
        Ok(nats)
    }

    /// The next protocol line from the server.
    async fn line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return Ok(line);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .context("NATS did not answer in time")??;
            if n == 0 {
                bail!("NATS closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// `PING`, then waits for the `PONG`: the server has processed everything sent before.
    async fn flush(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.stream.write_all(b"PING\r\n").await?;
        loop {
            let line = self.line(timeout).await?;
            match line.as_str() {
                "PONG" => return Ok(()),
                "PING" => self.stream.write_all(b"PONG\r\n").await?,
                _ if line.starts_with("-ERR") => bail!("NATS: {line}"),
                _ => {}
            }
        }
    }
}

/// The NATS publisher: publication j is due at `start + j / rate`, written as `PUB` on one
/// connection (so they stay in order); at the end a `PING`/`PONG` confirms them all.
pub async fn nats_run(
    config: &PublisherConfig,
    start: Instant,
    end: Instant,
    window: (u64, u64),
) -> PublishOutcome {
    let mut outcome = PublishOutcome {
        final_offsets: vec![0; config.channels.len()],
        ..PublishOutcome::default()
    };
    let mut nats = match NatsPublisher::connect(config).await {
        Ok(nats) => nats,
        Err(error) => {
            outcome.error(format!("{error:#}"));
            return outcome;
        }
    };
    let interval = 1.0 / config.rate;
    let mut sent = vec![0u64; config.channels.len()];
    let mut in_window = 0;
    let mut request = Vec::with_capacity(config.payload + 64);
    for j in 0u64.. {
        let due = start + Duration::from_secs_f64(j as f64 * interval);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let now = Instant::now();
        if now >= end {
            outcome.unsent_late += 1;
            continue;
        }
        let lag = now.saturating_duration_since(due).as_micros();
        outcome.max_lag_us = outcome
            .max_lag_us
            .max(u64::try_from(lag).unwrap_or(u64::MAX));
        let (c, seq) = config.peer_publication(j);
        let sent_ns = push::now_ns();
        let data = push::seq_payload(sent_ns, seq, config.payload);
        request.clear();
        request
            .extend_from_slice(format!("PUB {} {}\r\n", config.channels[c], data.len()).as_bytes());
        request.extend_from_slice(data.as_bytes());
        request.extend_from_slice(b"\r\n");
        if let Err(error) = nats.stream.write_all(&request).await {
            outcome.error(format!("NATS write: {error}"));
            return outcome;
        }
        sent[c] += 1;
        if sent_ns >= window.0 && sent_ns < window.1 {
            in_window += 1;
        }
    }
    match nats.flush(Duration::from_secs(30)).await {
        Ok(()) => {
            outcome.publications = sent.iter().sum();
            outcome.publications_in_window = in_window;
            outcome.final_offsets = sent;
        }
        Err(error) => outcome.error(format!("{error:#}")),
    }
    outcome
}

/// How long the MQTT publisher waits for the server's answers (CONNACK, the last PUBACKs,
/// PINGRESP).
const MQTT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// One MQTT connection that only publishes.
struct MqttPublisher {
    stream: TcpStream,
    reader: MqttReader,
}

impl MqttPublisher {
    /// Connects and waits for an accepting CONNACK.
    async fn connect(config: &PublisherConfig, how: &MqttPublish) -> anyhow::Result<Self> {
        let mut stream = TcpStream::connect(config.addr)
            .await
            .with_context(|| format!("cannot connect to the MQTT server at {}", config.addr))?;
        stream.set_nodelay(true)?;
        let mut hello = Vec::new();
        let client_id = format!("herald-bench-publisher-{}", std::process::id());
        mqtt::connect(&mut hello, &client_id, 60, how.password.as_deref());
        stream.write_all(&hello).await?;
        let mut publisher = Self {
            stream,
            reader: MqttReader::default(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            for event in publisher.read(deadline).await? {
                match event {
                    MqttEvent::ConnAck { code: 0, .. } => return Ok(publisher),
                    MqttEvent::ConnAck { code, .. } => {
                        bail!("the MQTT server refused the publisher: CONNACK code {code}")
                    }
                    _ => {}
                }
            }
        }
    }

    /// The packets that arrived in the next read.
    async fn read(&mut self, deadline: tokio::time::Instant) -> anyhow::Result<Vec<MqttEvent>> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
            .await
            .context("the MQTT server did not answer in time")??;
        if n == 0 {
            bail!("the MQTT server closed the connection");
        }
        let mut events = Vec::new();
        self.reader
            .feed(&chunk[..n], &mut |event| events.push(event))
            .map_err(anyhow::Error::msg)?;
        Ok(events)
    }

    /// `PINGREQ`, then waits for the `PINGRESP`: the server has read everything sent before.
    async fn flush(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.stream.write_all(&mqtt::PINGREQ).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.read(deadline).await?.contains(&MqttEvent::PingResp) {
                return Ok(());
            }
        }
    }
}

/// The MQTT publisher: publication j is due at `start + j / rate`, one `PUBLISH` on one
/// connection (so they stay in order). At QoS 1 at most `inflight` wait for their `PUBACK`
/// (a publication due while the window is full waits: the schedule's lag shows it) and the
/// publications counted are the acknowledged ones; at QoS 0 a `PINGREQ` at the end confirms
/// them all.
pub async fn mqtt_run(
    config: &PublisherConfig,
    how: &MqttPublish,
    start: Instant,
    end: Instant,
    window: (u64, u64),
) -> PublishOutcome {
    let mut outcome = PublishOutcome {
        final_offsets: vec![0; config.channels.len()],
        ..PublishOutcome::default()
    };
    let publisher = match MqttPublisher::connect(config, how).await {
        Ok(publisher) => publisher,
        Err(error) => {
            outcome.error(format!("{error:#}"));
            return outcome;
        }
    };
    let MqttPublisher { stream, reader } = publisher;
    let (mut read_half, mut write_half) = stream.into_split();
    // QoS 1: the reader task gives a permit back per PUBACK (servers acknowledge QoS 1
    // publishes in the order they were received, so a count is enough).
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(how.inflight.max(1)));
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (ping_tx, mut ping_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let reader_task = tokio::spawn({
        let permits = permits.clone();
        let acked = acked.clone();
        let mut reader = reader;
        async move {
            let mut chunk = vec![0u8; 8192];
            loop {
                let n = match read_half.read(&mut chunk).await {
                    Ok(0) => return Some("the MQTT server closed the connection".to_owned()),
                    Ok(n) => n,
                    Err(e) => return Some(format!("MQTT read: {e}")),
                };
                let fed = reader.feed(&chunk[..n], &mut |event| match event {
                    MqttEvent::PubAck { .. } => {
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        permits.add_permits(1);
                    }
                    MqttEvent::PingResp => {
                        let _ = ping_tx.send(());
                    }
                    _ => {}
                });
                if let Err(error) = fed {
                    return Some(error);
                }
            }
        }
    });
    let interval = 1.0 / config.rate;
    let mut sent = vec![0u64; config.channels.len()];
    let mut in_window = 0;
    let mut packet = Vec::with_capacity(config.payload + 64);
    let mut packet_id: u16 = 0;
    let mut failure = None;
    for j in 0u64.. {
        let due = start + Duration::from_secs_f64(j as f64 * interval);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        // QoS 1: a place in the window, given back by its PUBACK (or here, if it goes unused).
        let permit = if how.qos > 0 {
            match tokio::time::timeout_at(end.into(), permits.acquire()).await {
                Ok(Ok(permit)) => Some(permit),
                Ok(Err(_)) => break,
                Err(_) => {
                    outcome.unsent_late += 1;
                    continue;
                }
            }
        } else {
            None
        };
        let now = Instant::now();
        if now >= end {
            outcome.unsent_late += 1;
            continue;
        }
        let lag = now.saturating_duration_since(due).as_micros();
        outcome.max_lag_us = outcome
            .max_lag_us
            .max(u64::try_from(lag).unwrap_or(u64::MAX));
        let (c, seq) = config.peer_publication(j);
        let sent_ns = push::now_ns();
        let data = push::seq_payload(sent_ns, seq, config.payload);
        packet_id = packet_id.checked_add(1).unwrap_or(1);
        packet.clear();
        mqtt::publish(
            &mut packet,
            &config.channels[c],
            data.as_bytes(),
            how.qos,
            packet_id,
        );
        if let Err(error) = write_half.write_all(&packet).await {
            failure = Some(format!("MQTT write: {error}"));
            break;
        }
        if let Some(permit) = permit {
            permit.forget();
        }
        sent[c] += 1;
        if sent_ns >= window.0 && sent_ns < window.1 {
            in_window += 1;
        }
    }
    let total: u64 = sent.iter().sum();
    if failure.is_none() {
        let confirmed = if how.qos > 0 {
            // Every permit back: every PUBLISH acknowledged.
            let all = u32::try_from(how.inflight.max(1)).unwrap_or(u32::MAX);
            tokio::time::timeout(MQTT_ANSWER_TIMEOUT, permits.acquire_many(all))
                .await
                .is_ok_and(|permit| permit.is_ok())
        } else {
            write_half.write_all(&mqtt::PINGREQ).await.is_ok()
                && tokio::time::timeout(MQTT_ANSWER_TIMEOUT, ping_rx.recv())
                    .await
                    .is_ok_and(|pong| pong.is_some())
        };
        if !confirmed {
            failure = Some(format!(
                "the MQTT server confirmed {} of {total} publications in time",
                acked.load(std::sync::atomic::Ordering::Relaxed)
            ));
        }
    }
    let _ = write_half.write_all(&mqtt::DISCONNECT).await;
    reader_task.abort();
    if let Ok(Some(reason)) = reader_task.await
        && failure.is_some()
    {
        failure = failure.map(|failure| format!("{failure} ({reason})"));
    }
    let acked = acked.load(std::sync::atomic::Ordering::Relaxed);
    match failure {
        None => {
            outcome.publications = total;
            outcome.publications_in_window = in_window;
            outcome.final_offsets = sent;
        }
        Some(error) => {
            outcome.publications = if how.qos > 0 { acked } else { 0 };
            outcome.error(error);
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pusher::PusherApp;

    fn body(request: &[u8]) -> (String, String) {
        let text = String::from_utf8_lossy(request).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        (head.to_owned(), body.to_owned())
    }

    #[test]
    fn peer_requests() {
        let data = push::seq_payload(5, 7, 60);
        let one = [("c-0", data.clone())];
        let (head, posted) = body(&http_request(&PublishKind::Post, "h:1", &one));
        assert!(head.starts_with("POST /pub/c-0 HTTP/1.1\r\nHost: h:1\r\n"));
        assert_eq!(posted, data);

        let two = [("c-0", data.clone()), ("c-1", data.clone())];
        let pushpin = |format| {
            let kind = PublishKind::Pushpin(format);
            let (head, body) = body(&http_request(&kind, "h:1", &two));
            assert!(head.starts_with("POST /publish/ HTTP/1.1\r\n"));
            let value: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            assert_eq!(value["items"][0]["channel"], "c-0");
            assert_eq!(value["items"][1]["channel"], "c-1");
            value
        };
        let sse = pushpin(PushpinFormat::HttpStream);
        assert_eq!(
            sse["items"][1]["formats"]["http-stream"]["content"],
            format!("event: m\ndata: {data}\n\n")
        );
        // WebSocket: the message is the data itself, one format per item.
        let ws = pushpin(PushpinFormat::WsMessage);
        for item in ws["items"].as_array().expect("items") {
            assert_eq!(item["formats"]["ws-message"]["content"], data.as_str());
            assert_eq!(item["formats"].as_object().map(|f| f.len()), Some(1));
        }

        let app = PusherApp {
            id: "1".into(),
            key: "k".into(),
            secret: "s".into(),
        };
        let (head, pusher) = body(&http_request(&PublishKind::Pusher(app), "h:1", &one));
        assert!(head.starts_with("POST /apps/1/events?auth_key=k&auth_timestamp="));
        assert!(head.contains("&auth_signature="));
        let value: serde_json::Value = serde_json::from_str(&pusher).expect("JSON");
        assert_eq!(value["data"], data.as_str());
        assert_eq!(push::peer_fields(&pusher), Some((5, 7)));
    }

    #[test]
    fn any_2xx_is_accepted() {
        assert_eq!(accepted(200, b"{}", 1), Ok(vec![Ok(0)]));
        assert_eq!(accepted(202, b"", 3).map(|v| v.len()), Ok(3));
        assert!(accepted(401, b"bad signature", 1).is_err());
    }
}
