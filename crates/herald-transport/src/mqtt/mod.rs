//! MQTT 3.1.1 and 5 over TCP, on the same channels as every other transport.
//!
//! A topic is a channel of one namespace (`[mqtt] namespace`, see [`topic`]), so the
//! namespace's options apply. A connection authenticates with the connection JWT as its
//! CONNECT password through the same [`Authenticator`](herald_core::auth::Authenticator) as
//! the WebSocket; every subscription and every publication is decided by the one admission
//! path ([`herald_core::admission`]) and every exact subscription goes through the one
//! subscribe-with-recovery step ([`crate::subscription`]). Wildcard filters are pattern
//! subscriptions of the hub, admitted per namespace
//! ([`herald_core::admission::Admission::subscribe_pattern`]), each holding the channel
//! prefix it needs so that, in a cluster, other nodes' channels reach this one
//! ([`herald_core::Node::want_prefix`]). Deliveries are queued in the
//! connection's bounded [`Outbound`](crate::outbound::Outbound) queue (counted against the
//! process budget) as PUBLISH templates, and get their QoS and packet id when written, as
//! the inflight window allows ([`session`]). QoS 1 and 2 publishes are acknowledged after
//! `Node::publish` returned: after the publication is in history (when the namespace keeps
//! history).
//!
//! Persistent sessions are kept in the document store beside the outbound queue and resume
//! from history ([`persist`]). [`run_connection`] takes any byte stream, so the server hands
//! it TCP and TLS sockets alike.
//!
//! Packets are decoded with the `rumqttc` crate's packet modules and encoded by us
//! ([`codec`] says why).
//!
//! May touch: the node (publish, subscribe, patterns), the admission path, the registry,
//! the sockets it is handed. The accept loop and its connection limits are the server's.

pub mod codec;
mod delivery;
pub mod membership;
pub mod persist;
mod session;
pub mod shared;
pub mod topic;
pub mod websocket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use herald_core::duration::HumanDuration;
use herald_core::webhook_store::WebhookStore;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::outbound::{CloseReason, Outbound};
use crate::realtime::RealtimeState;

pub use session::run_connection;
pub use topic::TopicMap;

/// `[mqtt]` in config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Serve MQTT.
    pub enabled: bool,
    /// Where to listen (TCP).
    pub listen: SocketAddr,
    /// The namespace MQTT topics live in: topic `a/b` is channel `<namespace>:a/b`. Must be
    /// a configured `[[namespaces]]` entry.
    pub namespace: String,
    /// Largest packet accepted from a client, in bytes (MQTT 5 clients are told).
    pub max_packet_size: usize,
    /// Most QoS 1/2 deliveries awaiting the client's acknowledgement (MQTT 5 clients may ask
    /// for fewer with Receive Maximum); further deliveries wait in the connection's queue.
    pub max_inflight: u16,
    /// Most topic filters one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Topic aliases an MQTT 5 client may set in its PUBLISHes (the CONNACK's Topic Alias
    /// Maximum); 0: none.
    pub topic_alias_maximum: u16,
    /// The HTTP path of MQTT over WebSocket (subprotocol `mqtt`) on the server's listener;
    /// empty: none.
    pub websocket_path: String,
    /// A second listener for MQTT over TLS (conventionally port 8883); unset: none.
    pub tls_listen: Option<SocketAddr>,
    /// The TLS certificate chain and key (PEM); empty: `[server] tls_cert_file` and
    /// `tls_key_file`.
    pub tls_cert_file: std::path::PathBuf,
    pub tls_key_file: std::path::PathBuf,
    /// Longest a persistent session is kept after its connection ends (3.1.1 sessions, which
    /// have no expiry of their own, and longer MQTT 5 session expiry intervals get this).
    pub max_session_expiry: HumanDuration,
    /// How often sessions whose expiry passed while their device was away are deleted.
    pub session_purge_interval: HumanDuration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            namespace: "mqtt".into(),
            max_packet_size: 256 * 1024,
            max_inflight: 32,
            max_subscriptions: 100,
            topic_alias_maximum: 16,
            websocket_path: "/mqtt".into(),
            tls_listen: None,
            tls_cert_file: std::path::PathBuf::new(),
            tls_key_file: std::path::PathBuf::new(),
            max_session_expiry: HumanDuration::from_secs(7 * 24 * 3600),
            session_purge_interval: HumanDuration::from_secs(60),
        }
    }
}

/// A connection ended because another connected with the same client id (MQTT 5 reason
/// 0x8E).
pub const TAKEN_OVER: CloseReason = CloseReason {
    code: 3503,
    reason: "session taken over",
};

/// (user, MQTT client id).
type ClientKey = (String, String);

/// A connection's handle in the takeover map, and its queue (closed when taken over).
type Connected = (u64, Arc<Outbound>);

/// What every MQTT connection shares.
pub struct MqttState {
    pub realtime: Arc<RealtimeState>,
    pub config: MqttConfig,
    pub topics: TopicMap,
    /// Where persistent sessions are kept ([`persist`]); without it every session is clean.
    pub sessions: Option<Arc<dyn WebhookStore>>,
    /// Connections by (user, client id), as their session key ([`persist::session_key`]):
    /// a new one with the same pair takes over (MQTT allows one connection per client id).
    /// Scoped by user, so nobody can push another user's device off by naming its client
    /// id. One string per entry: the map holds an entry for every connection.
    connected: Mutex<HashMap<Box<str>, Connected>>,
    /// Will messages waiting for their MQTT 5 will delay; a new connection of the client id
    /// cancels its will (sets the flag).
    pending_wills: Mutex<HashMap<ClientKey, Arc<std::sync::atomic::AtomicBool>>>,
    next_connection: AtomicU64,
    /// Shared subscriptions' groups ([`shared`]).
    shared: shared::SharedGroups,
    /// The encoder every MQTT 3.1.1 connection shares (one per connection would be an
    /// allocation in every idle connection; only MQTT 5 no-local needs its own).
    v311_encoder: Arc<delivery::MqttEncoder>,
}

impl std::fmt::Debug for MqttState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl MqttState {
    pub fn new(realtime: Arc<RealtimeState>, config: MqttConfig) -> Self {
        let topics = TopicMap::new(
            &config.namespace,
            realtime.node.config().channel_rules.max_length,
        );
        let v311_encoder = Arc::new(delivery::MqttEncoder {
            level: codec::Level::V311,
            topics: topics.clone(),
            own: None,
        });
        Self {
            realtime,
            config,
            topics,
            v311_encoder,
            sessions: None,
            connected: Mutex::new(HashMap::new()),
            pending_wills: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            shared: shared::SharedGroups::default(),
        }
    }

    /// Keeps persistent sessions in `store` (the document store beside the outbound queue).
    /// In a cluster the same store keeps which nodes have members of which shared
    /// subscription group ([`membership`]).
    pub fn with_session_store(mut self, store: Option<Arc<dyn WebhookStore>>) -> Self {
        if let Some(store) = &store
            && !self.realtime.node.hub().sees_every_channel()
        {
            self.shared =
                shared::SharedGroups::clustered(membership::Membership::new(store.clone()));
        }
        self.sessions = store;
        self
    }

    /// In a cluster: rewrites this node's shared subscription groups and reads the other
    /// nodes' every [`membership::REFRESH`], until the server shuts down (then removes them).
    pub async fn refresh_shared_groups(self: Arc<Self>) {
        let Some(membership) = self.shared.membership().cloned() else {
            return;
        };
        loop {
            tokio::select! {
                () = self.realtime.shutdown.wait() => break,
                () = tokio::time::sleep(membership::REFRESH) => {}
            }
            let keys = self.shared.keys();
            if keys.is_empty() {
                continue;
            }
            if let Err(error) = membership.refresh(keys).await {
                tracing::warn!(%error, "mqtt: could not refresh the shared subscription groups");
            }
        }
        membership.leave_all().await;
    }

    /// Records a connection of `client_id`, closing the one it takes over; returns the
    /// handle [`Self::disconnected`] needs.
    fn connected(&self, user: &str, client_id: &str, outbound: &Arc<Outbound>) -> u64 {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        if let Some(cancelled) = self
            .pending_wills
            .lock()
            .remove(&(user.to_owned(), client_id.to_owned()))
        {
            cancelled.store(true, Ordering::SeqCst);
        }
        let key = persist::session_key(user, client_id).into_boxed_str();
        let previous = self.connected.lock().insert(key, (id, outbound.clone()));
        if let Some((_, previous)) = previous {
            previous.close_if_open(TAKEN_OVER);
        }
        id
    }

    /// Registers a will waiting for its delay; the flag is set if the client connects
    /// again meanwhile.
    fn will_pending(&self, user: &str, client_id: &str) -> Arc<std::sync::atomic::AtomicBool> {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let previous = self
            .pending_wills
            .lock()
            .insert((user.to_owned(), client_id.to_owned()), flag.clone());
        if let Some(previous) = previous {
            previous.store(true, Ordering::SeqCst);
        }
        flag
    }

    /// The delay of the will behind `flag` is over: whether to publish it.
    fn will_due(
        &self,
        user: &str,
        client_id: &str,
        flag: &Arc<std::sync::atomic::AtomicBool>,
    ) -> bool {
        let mut pending = self.pending_wills.lock();
        let key = (user.to_owned(), client_id.to_owned());
        if pending.get(&key).is_some_and(|f| Arc::ptr_eq(f, flag)) {
            pending.remove(&key);
        }
        !flag.load(Ordering::SeqCst)
    }

    /// Deletes the persistent sessions that expired while their device was away, every
    /// `session_purge_interval`, until the server shuts down. Sessions connected to this
    /// node are left alone (saved again when they end).
    pub async fn purge_sessions(self: Arc<Self>) {
        let Some(store) = self.sessions.clone() else {
            return;
        };
        let interval = self.config.session_purge_interval.as_duration();
        if interval.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                () = self.realtime.shutdown.wait() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let connected: std::collections::HashSet<String> = self
                .connected
                .lock()
                .keys()
                .map(|key| key.to_string())
                .collect();
            let purged =
                persist::purge_expired(&*store, herald_core::time::now_ms(), &connected).await;
            if purged > 0 {
                tracing::info!(purged, "mqtt: expired sessions deleted");
            }
        }
    }

    /// Forgets connection `id` of `client_id`; false if another took it over meanwhile.
    fn disconnected(&self, user: &str, client_id: &str, id: u64) -> bool {
        let key = persist::session_key(user, client_id);
        let mut connected = self.connected.lock();
        if connected
            .get(key.as_str())
            .is_some_and(|(current, _)| *current == id)
        {
            connected.remove(key.as_str());
            return true;
        }
        false
    }
}
