//! The NATS sink: each publication is published on a subject made from its channel (a
//! [`Template`]), with Herald's metadata as headers and the job id as `Nats-Msg-Id` (JetStream
//! drops a redelivery within its stream's duplicate window).
//!
//! Whether a stream captures the subject is asked of JetStream (and remembered a few
//! seconds), not found out by trying: a JetStream publish is a request, and a core
//! subscriber on a subject without a stream would receive it and leave it unanswered.
//!
//! Acknowledged means, by [`NatsMode`]:
//! - JetStream (a stream captures the subject): the stream's publish ack — the message is
//!   stored in the stream (replicated, for a replicated stream);
//! - core NATS (no stream does): the publish followed by a flush that the server answered —
//!   the server has the message; subscribers connected then get it, nobody else ever will
//!   (core NATS keeps nothing).
//!
//! Owns: one NATS client per sink (async-nats reconnects it by itself; while it is down,
//! publishes time out and are retried).
//! May touch: the NATS server named in the sink's URL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::{GetStreamByNameErrorKind, PublishErrorKind};
use async_trait::async_trait;

use super::{Sink, SinkError, SinkMessage, Template};

/// How a NATS sink publishes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsMode {
    /// JetStream when a stream captures the subject, else core NATS.
    #[default]
    Auto,
    /// JetStream only: a subject no stream captures is retried until one does.
    Jetstream,
    /// Core NATS only (publish and flush).
    Core,
}

/// Where and how a NATS sink publishes.
#[derive(Clone, Debug)]
pub struct NatsSinkConfig {
    /// `nats://host:port` (several comma-separated; credentials in the URL).
    pub url: String,
    pub subject: Template,
    pub mode: NatsMode,
    /// How long a publish may wait for its ack (or flush).
    pub timeout: Duration,
}

pub struct NatsSink {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    config: NatsSinkConfig,
    /// `auto` mode: whether a stream captures a subject, as JetStream said at that instant.
    captured: parking_lot::Mutex<HashMap<String, (bool, Instant)>>,
}

/// How long `auto` mode trusts JetStream's answer about a subject (a stream created or
/// deleted is noticed within this).
const CAPTURED_TTL: Duration = Duration::from_secs(5);
/// Subjects remembered before the table is cleared.
const CAPTURED_MAX: usize = 10_000;

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("mode", &self.config.mode)
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    /// Starts the client; it connects in the background (and keeps reconnecting), so a NATS
    /// server that is down at start-up delays deliveries, not Herald. Needs a Tokio runtime.
    pub async fn connect(config: NatsSinkConfig) -> Result<Self, String> {
        let client = async_nats::ConnectOptions::new()
            .name("herald-sink")
            .retry_on_initial_connect()
            .connect(config.url.as_str())
            .await
            // The error names no URL: it may hold a password.
            .map_err(|e| format!("NATS: {e}"))?;
        let mut jetstream = async_nats::jetstream::new(client.clone());
        jetstream.set_timeout(config.timeout);
        Ok(Self {
            client,
            jetstream,
            config,
            captured: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// Whether a JetStream stream captures `subject` (asked at most every
    /// [`CAPTURED_TTL`]). Asked rather than tried: a JetStream publish to a subject without a
    /// stream but with a core subscriber reaches that subscriber and never gets an ack.
    async fn captured(&self, subject: &str) -> Result<bool, SinkError> {
        if let Some((captured, at)) = self.captured.lock().get(subject)
            && at.elapsed() < CAPTURED_TTL
        {
            return Ok(*captured);
        }
        let lookup = self.jetstream.stream_by_subject(subject);
        let captured = match tokio::time::timeout(self.config.timeout, lookup).await {
            Ok(Ok(_stream)) => true,
            Ok(Err(error)) if error.kind() == GetStreamByNameErrorKind::NotFound => false,
            Ok(Err(error)) => {
                return Err(SinkError::Unavailable(format!(
                    "NATS: asking JetStream which stream takes {subject:?}: {error} (without \
                     JetStream, set nats_mode = \"core\")"
                )));
            }
            Err(_) => {
                return Err(SinkError::Unavailable(format!(
                    "NATS: JetStream did not say within {:?} which stream takes {subject:?}",
                    self.config.timeout
                )));
            }
        };
        let mut cache = self.captured.lock();
        if cache.len() >= CAPTURED_MAX {
            cache.clear();
        }
        cache.insert(subject.to_string(), (captured, Instant::now()));
        Ok(captured)
    }

    async fn publish_core(
        &self,
        subject: String,
        headers: HeaderMap,
        message: &SinkMessage,
    ) -> Result<String, SinkError> {
        let publish = async {
            self.client
                .publish_with_headers(subject.clone(), headers, message.data.clone())
                .await
                .map_err(|e| e.to_string())?;
            self.client.flush().await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.config.timeout, publish).await {
            Ok(Ok(())) => Ok(format!("flushed to {subject}")),
            Ok(Err(error)) => Err(SinkError::Unavailable(format!("NATS: {error}"))),
            Err(_) => Err(SinkError::Unavailable(format!(
                "NATS did not answer the flush within {:?}",
                self.config.timeout
            ))),
        }
    }
}

/// A subject NATS accepts for publishing: not empty, no whitespace, no empty token, no
/// wildcard.
fn check_subject(subject: &str) -> Result<(), SinkError> {
    let bad = subject.is_empty()
        || subject.chars().any(char::is_whitespace)
        || subject
            .split('.')
            .any(|token| token.is_empty() || token == "*" || token == ">");
    if bad {
        return Err(SinkError::Rejected(format!(
            "{subject:?} is not a NATS subject one can publish to"
        )));
    }
    Ok(())
}

fn headers(id: &str, message: &SinkMessage) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (key, value) in message.headers(id) {
        headers.insert(key, value.as_str());
    }
    headers.insert("content-type", message.content_type());
    headers
}

#[async_trait]
impl Sink for NatsSink {
    async fn publish(&self, id: &str, message: &SinkMessage) -> Result<String, SinkError> {
        let subject = self.config.subject.render(&message.channel);
        check_subject(&subject)?;
        let jetstream = match self.config.mode {
            NatsMode::Core => false,
            NatsMode::Jetstream => true,
            NatsMode::Auto => self.captured(&subject).await?,
        };
        if !jetstream {
            return self
                .publish_core(subject, headers(id, message), message)
                .await;
        }
        let mut jetstream_headers = headers(id, message);
        jetstream_headers.insert("Nats-Msg-Id", id);
        let publish = async {
            self.jetstream
                .publish_with_headers(subject.clone(), jetstream_headers, message.data.clone())
                .await?
                .await
        };
        // The context's own timeout bounds the ack; this bounds the send while disconnected.
        let result = tokio::time::timeout(self.config.timeout, publish).await;
        match result {
            Ok(Ok(ack)) => Ok(format!(
                "stream {} sequence {}{}",
                ack.stream,
                ack.sequence,
                if ack.duplicate { " (duplicate)" } else { "" }
            )),
            Ok(Err(error)) if error.kind() == PublishErrorKind::StreamNotFound => {
                // The stream went away since we asked: ask again next time.
                self.captured.lock().remove(&subject);
                Err(SinkError::Unavailable(format!(
                    "NATS JetStream: no stream takes {subject:?}"
                )))
            }
            Ok(Err(error)) if error.kind() == PublishErrorKind::MaxPayloadExceeded => Err(
                SinkError::Rejected(format!("NATS refused the message: {error}")),
            ),
            Ok(Err(error)) => Err(SinkError::Unavailable(format!("NATS JetStream: {error}"))),
            Err(_) => Err(SinkError::Unavailable(format!(
                "NATS JetStream did not ack within {:?}",
                self.config.timeout
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_publishable_subjects_pass() {
        assert!(check_subject("herald.orders:1").is_ok());
        for bad in ["", "a b", "a..b", "a.*", "a.>", ".a", "a."] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
    }
}
