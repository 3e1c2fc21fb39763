//! What a webhook says: the event types, the JSON body of each, and the queue jobs that carry
//! one event to one endpoint.
//!
//! Owns: [`EventType`], [`Event`] (type, identity, channel, time and `data`), the body every
//! delivery posts — `{"type", "timestamp", "id", "data"}`, the shape Standard Webhooks
//! recommends — and the ids: an event's `id` (`evt_…`) is derived from what identifies it
//! (a publication's channel, epoch and offset), and a delivery's `webhook-id` (`msg_…`) from
//! the event and the endpoint, so enqueueing the same event for the same endpoint twice (a
//! retried publish, a re-run) is one job, and every retry of it carries the same id.
//!
//! May touch: nothing.

use bytes::{BufMut, Bytes, BytesMut};
use herald_core::outbound::NewJob;
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::endpoint::Endpoint;

/// The queue's job kind for webhook deliveries.
pub const KIND: &str = "webhook";

/// Every kind of event an endpoint can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Publication,
    ClientConnected,
    ClientDisconnected,
    ClientSubscribed,
    ClientUnsubscribed,
    PresenceJoin,
    PresenceLeave,
    PushFailed,
    PushDeviceRemoved,
    EndpointDisabled,
}

impl EventType {
    pub const ALL: [EventType; 10] = [
        EventType::Publication,
        EventType::ClientConnected,
        EventType::ClientDisconnected,
        EventType::ClientSubscribed,
        EventType::ClientUnsubscribed,
        EventType::PresenceJoin,
        EventType::PresenceLeave,
        EventType::PushFailed,
        EventType::PushDeviceRemoved,
        EventType::EndpointDisabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Publication => "publication",
            EventType::ClientConnected => "client.connected",
            EventType::ClientDisconnected => "client.disconnected",
            EventType::ClientSubscribed => "client.subscribed",
            EventType::ClientUnsubscribed => "client.unsubscribed",
            EventType::PresenceJoin => "presence.join",
            EventType::PresenceLeave => "presence.leave",
            EventType::PushFailed => "push.failed",
            EventType::PushDeviceRemoved => "push.device_removed",
            EventType::EndpointDisabled => "webhook.endpoint_disabled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == text)
    }

    /// The webhook type of a client lifecycle event.
    pub fn of_client_event(kind: herald_core::events::ClientEventKind) -> Self {
        use herald_core::events::ClientEventKind as K;
        match kind {
            K::Connected => EventType::ClientConnected,
            K::Disconnected => EventType::ClientDisconnected,
            K::Subscribed => EventType::ClientSubscribed,
            K::Unsubscribed => EventType::ClientUnsubscribed,
            K::PresenceJoin => EventType::PresenceJoin,
            K::PresenceLeave => EventType::PresenceLeave,
        }
    }
}

/// One event, ready to be sent to every endpoint that wants it.
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: EventType,
    /// What identifies the event (equal keys: the same event); hashed into the ids.
    pub key: String,
    /// The channel, for events that have one (endpoints select by it).
    pub channel: Option<String>,
    /// When it happened, ms since the Unix epoch.
    pub time_ms: u64,
    /// The event's `data` object, JSON.
    pub data: Box<RawValue>,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    id: &'a str,
    data: &'a RawValue,
}

fn hashed(prefix: &str, parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0u8]);
    }
    let digest = hash.finalize();
    format!("{prefix}{}", hex::encode(&digest[..16]))
}

/// A random event key, for events nothing else identifies (lifecycle events).
pub fn random_key(kind: EventType) -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    format!("{}:{}", kind.as_str(), hex::encode(bytes))
}

/// RFC 3339 time of `ms` (UTC, milliseconds).
pub fn rfc3339(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(at) => format!("{at:.3}"),
        Err(_) => String::new(),
    }
}

impl Event {
    /// Builds an event whose `data` is `data` serialised.
    pub fn new(
        kind: EventType,
        key: String,
        channel: Option<String>,
        time_ms: u64,
        data: &impl Serialize,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            kind,
            key,
            channel,
            time_ms,
            data: serde_json::value::to_raw_value(data)?,
        })
    }

    /// `evt_…`: the same for every endpoint.
    pub fn id(&self) -> String {
        hashed("evt_", &[&self.key])
    }

    /// The `webhook-id` of this event's delivery to `endpoint`.
    pub fn message_id(&self, endpoint: &str) -> String {
        hashed("msg_", &[endpoint, &self.key])
    }

    /// The JSON body every endpoint gets.
    pub fn body(&self) -> Result<Bytes, serde_json::Error> {
        let id = self.id();
        let body = Body {
            kind: self.kind.as_str(),
            timestamp: rfc3339(self.time_ms),
            id: &id,
            data: &self.data,
        };
        serde_json::to_vec(&body).map(Bytes::from)
    }

    /// The job delivering `body` (this event's [`Event::body`]) to `endpoint`.
    pub fn job(&self, body: &Bytes, endpoint: &Endpoint, now: u64) -> NewJob {
        let message = self.message_id(&endpoint.id);
        NewJob {
            payload: frame(&message, body),
            id: message,
            kind: KIND.to_owned(),
            group: self.id(),
            recipient: endpoint.id.clone(),
            not_before: now,
            expire_at: None,
            order_key: endpoint.ordered.then(|| order_key(&endpoint.id)),
        }
    }
}

/// The `order_key` of an ordered endpoint's deliveries.
pub fn order_key(endpoint: &str) -> String {
    format!("webhook:{endpoint}")
}

/// A job's payload: the `webhook-id`, a newline, the body. The id travels in the payload
/// (not only as the job id) so that a replay — a new job — sends the same `webhook-id`.
pub fn frame(message: &str, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(message.len() + 1 + body.len());
    out.put_slice(message.as_bytes());
    out.put_u8(b'\n');
    out.put_slice(body);
    out.freeze()
}

/// The `webhook-id` and body of a job's payload.
pub fn unframe(payload: &Bytes) -> Option<(&str, Bytes)> {
    let newline = payload.iter().position(|&b| b == b'\n')?;
    let message = std::str::from_utf8(&payload[..newline]).ok()?;
    Some((message, payload.slice(newline + 1..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_event_and_endpoint() {
        let event = |key: &str| {
            Event::new(
                EventType::Publication,
                key.into(),
                None,
                0,
                &serde_json::json!({}),
            )
            .expect("event")
        };
        let a = event("pub:chat:e:1");
        assert_eq!(a.message_id("x"), event("pub:chat:e:1").message_id("x"));
        assert_ne!(a.message_id("x"), a.message_id("y"));
        assert_ne!(a.message_id("x"), event("pub:chat:e:2").message_id("x"));
        assert!(a.message_id("x").starts_with("msg_"));
        assert!(a.id().starts_with("evt_"));
    }

    #[test]
    fn payload_frames_round_trip_and_bodies_have_the_recommended_shape() {
        let event = Event::new(
            EventType::ClientConnected,
            "k".into(),
            None,
            1_700_000_000_123,
            &serde_json::json!({"client": "c"}),
        )
        .expect("event");
        let body = event.body().expect("body");
        let framed = frame("msg_1", &body);
        let (id, unframed) = unframe(&framed).expect("unframe");
        assert_eq!((id, &unframed), ("msg_1", &body));
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["type"], "client.connected");
        assert_eq!(json["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(json["data"]["client"], "c");
    }
}
