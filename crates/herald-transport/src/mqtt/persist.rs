//! Persistent MQTT sessions (3.1.1 `clean session = 0`, MQTT 5 session expiry): what is kept
//! and where.
//!
//! A session is one JSON document per (user, client id) in the collection [`COLLECTION`] of
//! the document store beside the outbound queue (`herald_core::webhook_store::WebhookStore`:
//! `outbound.db` with SQLite, the cluster's Redis, memory), so a device that reconnects to
//! another node resumes. It holds the subscriptions (filter and granted QoS) and, per
//! channel, the last offset the client acknowledged — every delivery up to it was written
//! (QoS 0) or acknowledged (PUBACK, PUBREC) — with the epoch and the highest offset sent, so
//! publications sent but not acknowledged are redelivered from history with DUP.
//!
//! The positions are kept by [`Positions`] as deliveries are written and acknowledged, and
//! saved at most once a second while they move, at every (un)subscribe, every half session
//! expiry while connected (so no node's purge deletes a live session) and when the
//! connection ends: a node killed in between redelivers what was acknowledged in the last
//! second (at least once), never less.
//!
//! May touch: the document store it is given.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use herald_core::webhook_store::WebhookStore;
use serde::{Deserialize, Serialize};

/// The collection sessions are kept in.
pub const COLLECTION: &str = "mqtt_sessions";

/// A saved session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDocument {
    /// When the session expires once disconnected, ms since the Unix epoch (refreshed at
    /// every save while connected).
    pub expires_at_ms: u64,
    /// Filters in subscription order, with their granted QoS.
    pub subscriptions: Vec<(String, u8)>,
    /// Per channel, where the client is.
    pub positions: BTreeMap<String, SavedPosition>,
    /// MQTT 5 subscription identifiers, by filter.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subscription_ids: BTreeMap<String, u32>,
    /// Filters subscribed with MQTT 5 no-local.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub no_local: BTreeSet<String>,
}

/// A channel's position in a saved session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPosition {
    pub epoch: String,
    /// Every delivery up to here was acknowledged (or written, at QoS 0).
    pub acked: u64,
    /// The highest offset sent: what lies between is redelivered with DUP.
    pub sent: u64,
}

/// The document id of `client_id`'s session for `user` (the user's length first, so no two
/// pairs share an id).
pub fn session_key(user: &str, client_id: &str) -> String {
    format!("{}:{user}:{client_id}", user.len())
}

/// Reads a session; `None` when there is none, it expired, or it cannot be read (logged: a
/// session that cannot be read starts clean rather than keep the device out).
pub async fn load(store: &dyn WebhookStore, key: &str, now_ms: u64) -> Option<SessionDocument> {
    let bytes = match store.document(COLLECTION, key).await {
        Ok(bytes) => bytes?,
        Err(error) => {
            tracing::warn!(%error, "mqtt: reading the session failed; it starts clean");
            return None;
        }
    };
    match serde_json::from_slice::<SessionDocument>(&bytes) {
        Ok(document) if document.expires_at_ms > now_ms => Some(document),
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(%error, "mqtt: a saved session is unreadable; it starts clean");
            None
        }
    }
}

pub async fn save(store: &dyn WebhookStore, key: &str, document: &SessionDocument) {
    let bytes = match serde_json::to_vec(document) {
        Ok(bytes) => Bytes::from(bytes),
        Err(error) => {
            tracing::warn!(%error, "mqtt: cannot encode the session");
            return;
        }
    };
    if let Err(error) = store.put_document(COLLECTION, key, bytes).await {
        tracing::warn!(%error, "mqtt: saving the session failed");
    }
}

pub async fn remove(store: &dyn WebhookStore, key: &str) {
    if let Err(error) = store.delete_document(COLLECTION, key).await {
        tracing::warn!(%error, "mqtt: removing the session failed");
    }
}

/// Deletes the sessions whose expiry passed while their device was away, except those in
/// `connected` (keys of sessions connected here: their document is saved again when they
/// end). Returns how many were deleted.
pub async fn purge_expired(
    store: &dyn WebhookStore,
    now_ms: u64,
    connected: &std::collections::HashSet<String>,
) -> usize {
    let documents = match store.documents(COLLECTION).await {
        Ok(documents) => documents,
        Err(error) => {
            tracing::warn!(%error, "mqtt: listing sessions to purge failed");
            return 0;
        }
    };
    let mut purged = 0;
    for (key, bytes) in documents {
        let expired = serde_json::from_slice::<SessionDocument>(&bytes)
            .is_ok_and(|document| document.expires_at_ms <= now_ms);
        if expired && !connected.contains(&key) {
            remove(store, &key).await;
            purged += 1;
        }
    }
    purged
}

/// One channel's delivery progress on a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Progress {
    epoch: Arc<str>,
    acked: u64,
    sent: u64,
    /// Offsets sent at QoS 1/2 and not acknowledged yet.
    unacked: BTreeSet<u64>,
}

impl Progress {
    fn settle(&mut self) {
        self.acked = match self.unacked.first() {
            Some(first) => first - 1,
            None => self.sent,
        };
    }
}

/// Per channel, what was sent and acknowledged (only kept for persistent sessions).
#[derive(Debug, Default)]
pub struct Positions {
    channels: HashMap<Arc<str>, Progress>,
    /// Moved since the last save.
    pub dirty: bool,
}

impl Positions {
    /// Starts from a saved session.
    pub fn restore(saved: &BTreeMap<String, SavedPosition>) -> Self {
        let channels = saved
            .iter()
            .map(|(channel, position)| {
                (
                    Arc::from(channel.as_str()),
                    Progress {
                        epoch: Arc::from(position.epoch.as_str()),
                        acked: position.acked,
                        sent: position.sent,
                        unacked: BTreeSet::new(),
                    },
                )
            })
            .collect();
        Self {
            channels,
            dirty: false,
        }
    }

    /// A delivery of `offset` was written; `acknowledged` for QoS 0.
    pub fn sent(&mut self, channel: &Arc<str>, epoch: &Arc<str>, offset: u64, acknowledged: bool) {
        let progress = self.channels.entry(channel.clone()).or_default();
        if *progress.epoch != **epoch {
            // A new stream (or the first delivery): earlier offsets mean nothing now.
            *progress = Progress {
                epoch: epoch.clone(),
                acked: offset.saturating_sub(1),
                sent: offset.saturating_sub(1),
                unacked: BTreeSet::new(),
            };
        }
        progress.sent = progress.sent.max(offset);
        if !acknowledged {
            progress.unacked.insert(offset);
        }
        progress.settle();
        self.dirty = true;
    }

    /// The client acknowledged the delivery of `offset`.
    pub fn acknowledged(&mut self, channel: &str, offset: u64) {
        if let Some(progress) = self.channels.get_mut(channel) {
            progress.unacked.remove(&offset);
            progress.settle();
            self.dirty = true;
        }
    }

    /// Where a channel resumes: (epoch, last acknowledged offset, highest sent offset).
    pub fn resume_point(&self, channel: &str) -> Option<(Arc<str>, u64, u64)> {
        self.channels
            .get(channel)
            .map(|p| (p.epoch.clone(), p.acked, p.sent))
    }

    /// Forgets a channel (unsubscribed).
    pub fn forget(&mut self, channel: &str) {
        if self.channels.remove(channel).is_some() {
            self.dirty = true;
        }
    }

    /// The positions as saved.
    pub fn saved(&self) -> BTreeMap<String, SavedPosition> {
        self.channels
            .iter()
            .map(|(channel, p)| {
                (
                    channel.to_string(),
                    SavedPosition {
                        epoch: p.epoch.to_string(),
                        acked: p.acked,
                        sent: p.sent,
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::webhook_store::MemoryWebhookStore;

    #[test]
    fn the_acknowledged_position_never_passes_an_unacknowledged_delivery() {
        let mut positions = Positions::default();
        let ch: Arc<str> = Arc::from("mqtt:a");
        let epoch: Arc<str> = Arc::from("e1");
        positions.sent(&ch, &epoch, 5, false);
        positions.sent(&ch, &epoch, 6, false);
        positions.sent(&ch, &epoch, 7, true); // QoS 0 between QoS 1s
        assert_eq!(
            positions.resume_point("mqtt:a"),
            Some((epoch.clone(), 4, 7))
        );
        positions.acknowledged("mqtt:a", 6); // out of order
        assert_eq!(positions.resume_point("mqtt:a").map(|p| p.1), Some(4));
        positions.acknowledged("mqtt:a", 5);
        assert_eq!(positions.resume_point("mqtt:a").map(|p| p.1), Some(7));
        // A new epoch starts over.
        let other: Arc<str> = Arc::from("e2");
        positions.sent(&ch, &other, 2, false);
        assert_eq!(positions.resume_point("mqtt:a"), Some((other, 1, 2)));
        let saved = positions.saved();
        let restored = Positions::restore(&saved);
        assert_eq!(
            restored.resume_point("mqtt:a").map(|p| (p.1, p.2)),
            Some((1, 2))
        );
        assert!(!restored.dirty);
        positions.forget("mqtt:a");
        assert_eq!(positions.resume_point("mqtt:a"), None);
    }

    #[tokio::test]
    async fn sessions_round_trip_and_expire() {
        let store = MemoryWebhookStore::new();
        let key = session_key("alice", "dev");
        assert_ne!(key, session_key("alice:dev", ""), "ids never collide");
        assert!(load(&store, &key, 0).await.is_none());
        let document = SessionDocument {
            expires_at_ms: 1_000,
            subscriptions: vec![("a/+".into(), 1)],
            positions: BTreeMap::from([(
                "mqtt:a/b".into(),
                SavedPosition {
                    epoch: "e".into(),
                    acked: 3,
                    sent: 4,
                },
            )]),
            subscription_ids: BTreeMap::from([("a/+".into(), 7)]),
            no_local: BTreeSet::from(["a/+".to_owned()]),
        };
        save(&store, &key, &document).await;
        assert_eq!(load(&store, &key, 999).await, Some(document));
        assert!(load(&store, &key, 1_000).await.is_none(), "expired");
        remove(&store, &key).await;
        assert!(load(&store, &key, 0).await.is_none());
        store
            .put_document(COLLECTION, &key, Bytes::from_static(b"not json"))
            .await
            .expect("stored");
        assert!(load(&store, &key, 0).await.is_none(), "unreadable: clean");
    }
}
