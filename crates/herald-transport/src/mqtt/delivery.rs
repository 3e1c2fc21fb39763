//! What an MQTT connection delivers: publications of its channels as PUBLISH templates
//! ([`MqttEncoder`]), its subscription table (exact topics and wildcard filters with their
//! granted QoS, read by the writer and by the hub), and the hub's pattern subscriber for
//! its wildcard filters ([`PatternSink`]).
//!
//! A publication carries the highest QoS it may be delivered at: the MQTT publisher's QoS
//! (kept in the tag [`QOS_TAG`] for QoS 0 and 1), or 2 for everything else — a publication
//! from the HTTP API, a WebSocket client or a bridge is durable in history, so it is
//! delivered at whatever QoS the subscription was granted.
//!
//! A publication with the tag [`EXPIRY_TAG`] (an MQTT 5 publisher's Message Expiry
//! Interval, or set by any publisher) expires that many seconds after it was published: it
//! is not delivered afterwards, and MQTT 5 subscribers are sent what remains of the interval.
//!
//! May touch: the connection's outbound queue.

use std::sync::Arc;

use herald_core::hub::{Delivery, PatternSubscriber, Subscriber};
use herald_core::publication::{ChannelEvent, PublicationEvent};
use parking_lot::RwLock;

use super::codec::{self, Level};
use super::topic::{Filter, TopicMap};
use crate::chanmap::ChannelMap;
use crate::outbound::{EventEncoder, Frame, FramePosition, Outbound};

/// Tag holding an MQTT publisher's QoS when below 2.
pub const QOS_TAG: &str = "mqtt_qos";

/// Tag set on a publication an MQTT publisher sent with RETAIN (what MQTT 5
/// retain-as-published subscribers see on live deliveries).
pub const RETAIN_TAG: &str = "mqtt_retain";

/// Tag holding a publication's message expiry interval (seconds after its time).
pub const EXPIRY_TAG: &str = "mqtt_expiry";

/// Seconds left of `publication`'s message expiry interval at `now_ms`: `None` without
/// one, `Some(0)` when it has expired.
pub fn expiry_left(publication: &herald_core::Publication, now_ms: u64) -> Option<u32> {
    let ends_ms = expires_at_ms(publication)?;
    Some(seconds_left(ends_ms, now_ms))
}

/// When `publication`'s message expiry ends (ms since the Unix epoch), if it has one.
pub fn expires_at_ms(publication: &herald_core::Publication) -> Option<u64> {
    let interval: u64 = publication.tags.get(EXPIRY_TAG)?.parse().ok()?;
    Some(
        publication
            .time_ms
            .saturating_add(interval.saturating_mul(1000)),
    )
}

/// Whole seconds from `now_ms` to `ends_ms`, rounded up: a message with 0.4 s left has not
/// expired; 0 when it has.
pub fn seconds_left(ends_ms: u64, now_ms: u64) -> u32 {
    let left_ms = ends_ms.saturating_sub(now_ms);
    u32::try_from(left_ms.div_ceil(1000)).unwrap_or(u32::MAX)
}

/// Encoding slots of a publication's PUBLISH templates (see
/// [`herald_core::publication::ENCODING_SLOTS`]).
const V311_SLOT: usize = 4;
const V5_SLOT: usize = 5;

/// Encodes publications as PUBLISH templates of one protocol level (once per publication,
/// shared by every MQTT subscriber of that level).
pub struct MqttEncoder {
    pub level: Level,
    pub topics: TopicMap,
    /// The connection's own client id and subscriptions, for MQTT 5 no-local: its own
    /// publications are not delivered where every matching subscription asked so.
    pub own: Option<(String, Arc<RwLock<Table>>)>,
}

impl MqttEncoder {
    /// The template of `publication` on `topic`, `retain` set (recovered or retained
    /// deliveries are encoded per connection, live ones once).
    pub fn template(&self, topic: &str, event: &PublicationEvent, retain: bool) -> bytes::Bytes {
        let publication = &event.publication;
        let max_qos = publication
            .tags
            .get(QOS_TAG)
            .and_then(|q| q.parse::<u8>().ok())
            .unwrap_or(2);
        let properties: Vec<(&str, &str)> = publication
            .tags
            .iter()
            .filter(|(key, _)| ![QOS_TAG, EXPIRY_TAG, RETAIN_TAG].contains(&key.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        codec::publish_template(
            self.level,
            topic,
            publication.data.bytes(),
            max_qos,
            retain,
            &properties,
            expiry_left(publication, herald_core::time::now_ms()),
        )
    }

    /// The frame of a live publication, `None` for other events or channels without a topic.
    pub fn frame(&self, event: &Arc<PublicationEvent>) -> Option<Frame> {
        let topic = self.topics.topic(&event.channel)?;
        if expiry_left(&event.publication, herald_core::time::now_ms()) == Some(0) {
            return None;
        }
        if let Some((client, table)) = &self.own
            && event
                .publication
                .info
                .as_ref()
                .is_some_and(|info| info.client == *client)
            && table.read().no_local_only(&event.channel, topic)
        {
            return None;
        }
        let slot = match self.level {
            Level::V311 => V311_SLOT,
            Level::V5 => V5_SLOT,
        };
        // The publisher's RETAIN, cleared as it is written unless a matching subscription
        // asked for retain-as-published.
        let retain = event.publication.tags.contains_key(RETAIN_TAG);
        let bytes = event.encoded(slot, |event| self.template(topic, event, retain));
        Some(Frame {
            bytes,
            position: Some(FramePosition {
                channel: event.channel.clone(),
                offset: event.publication.offset,
                epoch: event.epoch.clone(),
            }),
            conflate_key: None,
            expires_at_ms: expires_at_ms(&event.publication).unwrap_or(0),
        })
    }
}

impl EventEncoder for MqttEncoder {
    fn encode(&self, event: &ChannelEvent) -> Option<Frame> {
        match event {
            ChannelEvent::Publication(publication) => self.frame(publication),
            // Join/leave have no MQTT form; an unrecoverable channel closes the queue.
            _ => None,
        }
    }
}

/// A connection's subscriptions as deliveries need them.
#[derive(Debug, Default)]
pub struct Table {
    /// Channels subscribed by exact topic, with the granted QoS (a small map: most
    /// connections have one or a few).
    pub exact: ChannelMap<u8>,
    /// Wildcard filters with the granted QoS.
    pub wildcards: Vec<(Filter, u8)>,
    /// Shared subscriptions with the granted QoS (their groups deliver into the queue).
    pub shared: Vec<(super::shared::SharedFilter, u8)>,
    /// MQTT 5 subscription options (boxed, and only while one is set: most connections
    /// have none, and the table is in every connection).
    options: Option<Box<FilterOptions>>,
}

/// The MQTT 5 options of a connection's filters.
#[derive(Debug, Default)]
struct FilterOptions {
    /// Filters (exact topics and wildcards) subscribed with no-local.
    no_local: std::collections::HashSet<String>,
    /// Subscription identifiers, by filter.
    subscription_ids: Vec<(Filter, u32)>,
    /// Filters subscribed with retain-as-published.
    retain_as_published: Vec<Filter>,
}

impl FilterOptions {
    fn is_empty(&self) -> bool {
        self.no_local.is_empty()
            && self.subscription_ids.is_empty()
            && self.retain_as_published.is_empty()
    }
}

impl Table {
    /// The QoS a publication of `channel` (topic `topic`) is delivered at, before the
    /// publication's own maximum: the highest of the matching subscriptions; `None` when
    /// none matches (anymore).
    pub fn granted(&self, channel: &str, topic: &str) -> Option<u8> {
        let exact = self.exact.get(channel).copied();
        let wildcard = self
            .wildcards
            .iter()
            .filter(|(filter, _)| filter.matches(topic))
            .map(|(_, qos)| *qos)
            .max();
        let shared = self
            .shared
            .iter()
            .filter(|(shared, _)| shared.filter.matches(topic))
            .map(|(_, qos)| *qos)
            .max();
        exact.max(wildcard).max(shared)
    }

    /// Whether every subscription matching the channel asked for no-local (so the
    /// connection's own publications on it are not delivered back).
    pub fn no_local_only(&self, channel: &str, topic: &str) -> bool {
        let Some(no_local) = self
            .options
            .as_ref()
            .map(|o| &o.no_local)
            .filter(|n| !n.is_empty())
        else {
            return false;
        };
        let exact = self.exact.contains_key(channel).then_some(topic);
        let wildcards = self
            .wildcards
            .iter()
            .filter(|(filter, _)| filter.matches(topic))
            .map(|(filter, _)| filter.as_str());
        let mut matching = exact.into_iter().chain(wildcards).peekable();
        matching.peek().is_some() && matching.all(|filter| no_local.contains(filter))
    }

    /// The subscription identifiers of the filters matching `topic`, as the properties of
    /// a PUBLISH (empty: none).
    pub fn subscription_id_properties(&self, topic: &str) -> bytes::BytesMut {
        let mut properties = bytes::BytesMut::new();
        for (_, id) in self
            .subscription_ids()
            .iter()
            .filter(|(f, _)| f.matches(topic))
        {
            codec::subscription_identifier(&mut properties, *id);
        }
        properties
    }

    /// Whether a filter matching `topic` asked for retain-as-published.
    pub fn retains_as_published(&self, topic: &str) -> bool {
        self.options
            .as_ref()
            .is_some_and(|o| o.retain_as_published.iter().any(|f| f.matches(topic)))
    }

    /// The MQTT 5 subscription identifiers, by filter.
    pub fn subscription_ids(&self) -> &[(Filter, u32)] {
        self.options
            .as_ref()
            .map_or(&[], |o| o.subscription_ids.as_slice())
    }

    /// The filters subscribed with MQTT 5 no-local.
    pub fn no_local_filters(&self) -> impl Iterator<Item = &String> + '_ {
        self.options.iter().flat_map(|o| o.no_local.iter())
    }

    /// Changes the MQTT 5 options: made when the first is set, dropped with the last.
    fn change_options(&mut self, change: impl FnOnce(&mut FilterOptions)) {
        let options = self.options.get_or_insert_with(Box::default);
        change(options);
        if options.is_empty() {
            self.options = None;
        }
    }

    /// Sets (or clears) no-local for `filter` (its text).
    pub fn set_no_local(&mut self, filter: &str, on: bool) {
        if !on && self.options.is_none() {
            return;
        }
        self.change_options(|o| {
            if on {
                o.no_local.insert(filter.to_owned());
            } else {
                o.no_local.remove(filter);
            }
        });
    }

    /// Sets (or clears) retain-as-published for `filter`.
    pub fn set_retain_as_published(&mut self, filter: &Filter, on: bool) {
        if !on && self.options.is_none() {
            return;
        }
        self.change_options(|o| {
            o.retain_as_published.retain(|f| f != filter);
            if on {
                o.retain_as_published.push(filter.clone());
            }
        });
    }

    /// Sets (or with `None` clears) the subscription identifier of `filter`.
    pub fn set_subscription_id(&mut self, filter: &Filter, id: Option<u32>) {
        if id.is_none() && self.options.is_none() {
            return;
        }
        self.change_options(|o| {
            o.subscription_ids.retain(|(f, _)| f != filter);
            if let Some(id) = id {
                o.subscription_ids.push((filter.clone(), id));
            }
        });
    }

    /// Number of filters subscribed.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcards.len() + self.shared.len()
    }
}

/// The hub's pattern subscriber for one connection's wildcard filters. A channel the
/// connection also subscribes to by exact topic is left to that subscription (one delivery
/// per publication, at the highest granted QoS).
pub struct PatternSink {
    pub table: Arc<RwLock<Table>>,
    pub outbound: Arc<Outbound>,
    pub encoder: Arc<MqttEncoder>,
}

impl Subscriber for PatternSink {
    fn deliver(&self, event: &ChannelEvent) -> Delivery {
        let ChannelEvent::Publication(publication) = event else {
            return Delivery::Queued;
        };
        let Some(frame) = self.encoder.frame(publication) else {
            return Delivery::Queued;
        };
        if self.outbound.push(frame) {
            Delivery::Queued
        } else if self.outbound.closed().is_some() {
            Delivery::Closed
        } else {
            Delivery::Dropped
        }
    }
}

impl PatternSubscriber for PatternSink {
    fn matches(&self, channel: &str) -> bool {
        let Some(topic) = self.encoder.topics.topic(channel) else {
            return false;
        };
        let table = self.table.read();
        !table.exact.contains_key(channel)
            && table
                .wildcards
                .iter()
                .any(|(filter, _)| filter.matches(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use herald_core::publication::{Payload, Publication};

    fn event(channel: &str, qos_tag: Option<&str>) -> Arc<PublicationEvent> {
        let mut publication = Publication {
            offset: 3,
            time_ms: 0,
            data: Payload::Json(Bytes::from_static(b"{\"t\":1}")),
            tags: Default::default(),
            info: None,
        };
        if let Some(q) = qos_tag {
            publication.tags.insert(QOS_TAG.into(), q.into());
        }
        Arc::new(PublicationEvent::new(
            Arc::from(channel),
            Arc::from("ep"),
            publication,
        ))
    }

    #[test]
    fn the_table_grants_the_highest_matching_qos() {
        let mut table = Table::default();
        table.exact.insert(Arc::from("mqtt:a/b"), 0);
        table
            .wildcards
            .push((Filter::parse("a/+").expect("valid"), 2));
        table
            .wildcards
            .push((Filter::parse("#").expect("valid"), 1));
        assert_eq!(table.granted("mqtt:a/b", "a/b"), Some(2));
        assert_eq!(table.granted("mqtt:x", "x"), Some(1));
        assert_eq!(table.len(), 3);
        table.wildcards.clear();
        assert_eq!(table.granted("mqtt:x", "x"), None);
    }

    #[test]
    fn no_local_applies_only_where_every_matching_subscription_asked() {
        let mut table = Table::default();
        table.exact.insert(Arc::from("mqtt:a/b"), 1);
        table.set_no_local("a/b", true);
        assert!(table.no_local_only("mqtt:a/b", "a/b"));
        table
            .wildcards
            .push((Filter::parse("a/+").expect("valid"), 1));
        assert!(!table.no_local_only("mqtt:a/b", "a/b"), "a/+ wants them");
        table.set_no_local("a/+", true);
        assert!(table.no_local_only("mqtt:a/b", "a/b"));
        assert!(
            !table.no_local_only("mqtt:x", "x"),
            "no subscription matches"
        );
    }

    #[test]
    fn frames_carry_the_publishers_qos_and_the_position() {
        let encoder = MqttEncoder {
            level: Level::V311,
            topics: TopicMap::new("mqtt", 255),
            own: None,
        };
        let frame = encoder
            .frame(&event("mqtt:s/1", Some("1")))
            .expect("a topic");
        assert_eq!(codec::template_qos(&frame.bytes), 1);
        let position = frame.position.expect("a position");
        assert_eq!((&*position.channel, position.offset), ("mqtt:s/1", 3));
        let frame = encoder.frame(&event("mqtt:s/1", None)).expect("a topic");
        assert_eq!(codec::template_qos(&frame.bytes), 2, "durable: any QoS");
        assert!(encoder.frame(&event("other:s", None)).is_none());
        assert!(encoder.frame(&event("mqtt:inbox#alice", None)).is_none());
    }

    #[test]
    fn the_pattern_sink_leaves_exact_channels_to_their_subscription() {
        let table = Arc::new(RwLock::new(Table::default()));
        let outbound = Outbound::new(1 << 20);
        let sink = PatternSink {
            table: table.clone(),
            outbound: outbound.clone(),
            encoder: Arc::new(MqttEncoder {
                level: Level::V5,
                topics: TopicMap::new("mqtt", 255),
                own: None,
            }),
        };
        table
            .write()
            .wildcards
            .push((Filter::parse("s/#").expect("valid"), 1));
        assert!(sink.matches("mqtt:s/1"));
        assert!(!sink.matches("mqtt:t/1"));
        assert!(!sink.matches("other:s/1"));
        assert!(!sink.matches("mqtt:s/#alice"), "user-limited: never");
        table.write().exact.insert(Arc::from("mqtt:s/1"), 0);
        assert!(!sink.matches("mqtt:s/1"));
        let delivered = sink.deliver(&ChannelEvent::Publication(event("mqtt:s/2", None)));
        assert_eq!(delivered, Delivery::Queued);
        assert!(outbound.queued_bytes() > 0);
        outbound.close(crate::outbound::CloseReason::SHUTDOWN);
        let delivered = sink.deliver(&ChannelEvent::Publication(event("mqtt:s/2", None)));
        assert_eq!(delivered, Delivery::Closed);
    }
}
