//! Publications, stream positions and the events the hub fans out.
//!
//! A [`PublicationEvent`] is created once per publication and shared (`Arc`) by every
//! subscriber; each wire format encodes it at most once into its cache slot, so a
//! publication to N subscribers costs one encoding per format, not N.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Where a channel's stream is: the last offset and the epoch it belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamPosition {
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub epoch: String,
}

impl StreamPosition {
    pub fn new(offset: u64, epoch: impl Into<String>) -> Self {
        Self {
            offset,
            epoch: epoch.into(),
        }
    }
}

/// Publication data: JSON text, or opaque bytes (base64 in JSON APIs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Valid JSON text, passed through verbatim.
    Json(Bytes),
    /// Arbitrary bytes.
    Binary(Bytes),
}

impl Payload {
    pub fn bytes(&self) -> &Bytes {
        match self {
            Self::Json(b) | Self::Binary(b) => b,
        }
    }

    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    pub fn is_binary(&self) -> bool {
        matches!(self, Self::Binary(_))
    }
}

/// Who published, for client-side publications, presence and join/leave.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientInfo {
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<Box<RawValue>>,
}

impl PartialEq for ClientInfo {
    fn eq(&self, other: &Self) -> bool {
        let raw = |v: &Option<Box<RawValue>>| v.as_ref().map(|r| r.get().to_owned());
        self.client == other.client
            && self.user == other.user
            && raw(&self.conn_info) == raw(&other.conn_info)
            && raw(&self.chan_info) == raw(&other.chan_info)
    }
}

impl Eq for ClientInfo {}

/// One message in a channel's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    /// Position in the channel's stream; 0 for publications that skip history.
    pub offset: u64,
    /// Milliseconds since the Unix epoch when the node accepted it.
    pub time_ms: u64,
    pub data: Payload,
    pub tags: BTreeMap<String, String>,
    pub info: Option<Arc<ClientInfo>>,
}

/// Number of per-format encoding slots a [`PublicationEvent`] carries.
pub const ENCODING_SLOTS: usize = 6;

/// A publication on its way to subscribers, with encode-once caches.
#[derive(Debug)]
pub struct PublicationEvent {
    pub channel: Arc<str>,
    pub epoch: Arc<str>,
    pub publication: Publication,
    encoded: [OnceLock<Bytes>; ENCODING_SLOTS],
}

impl PublicationEvent {
    pub fn new(channel: Arc<str>, epoch: Arc<str>, publication: Publication) -> Self {
        Self {
            channel,
            epoch,
            publication,
            encoded: Default::default(),
        }
    }

    /// The encoding in `slot`, computed by `encode` the first time any subscriber asks.
    ///
    /// # Panics
    /// If `slot >= ENCODING_SLOTS` (a programming error in a transport, not input-driven).
    pub fn encoded(&self, slot: usize, encode: impl FnOnce(&Self) -> Bytes) -> Bytes {
        self.encoded[slot].get_or_init(|| encode(self)).clone()
    }
}

/// What the hub delivers to a channel's subscribers.
#[derive(Clone, Debug)]
pub enum ChannelEvent {
    Publication(Arc<PublicationEvent>),
    Join {
        channel: Arc<str>,
        info: Arc<ClientInfo>,
    },
    Leave {
        channel: Arc<str>,
        info: Arc<ClientInfo>,
    },
    /// This node cannot vouch for every publication of the channel in order (the engine
    /// lost some that history no longer holds, or the node has not reached its engine for
    /// too long): its subscribers must recover from their own positions — here later, or on
    /// another node — which tells each of them exactly what it missed or that it cannot.
    Unrecoverable {
        channel: Arc<str>,
    },
}

impl ChannelEvent {
    pub fn channel(&self) -> &Arc<str> {
        match self {
            Self::Publication(p) => &p.channel,
            Self::Join { channel, .. }
            | Self::Leave { channel, .. }
            | Self::Unrecoverable { channel } => channel,
        }
    }
}

/// A short random epoch identifier (8 alphanumeric characters).
pub fn new_epoch() -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(8)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn encodes_each_slot_once() {
        let event = PublicationEvent::new(
            Arc::from("ch"),
            Arc::from("e"),
            Publication {
                offset: 1,
                time_ms: 0,
                data: Payload::Json(Bytes::from_static(b"{}")),
                tags: BTreeMap::new(),
                info: None,
            },
        );
        let calls = AtomicUsize::new(0);
        for _ in 0..3 {
            let bytes = event.encoded(0, |e| {
                calls.fetch_add(1, Ordering::SeqCst);
                Bytes::from(format!("{}", e.publication.offset))
            });
            assert_eq!(&bytes[..], b"1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn epochs_differ() {
        assert_ne!(new_epoch(), new_epoch());
        assert_eq!(new_epoch().len(), 8);
    }
}
