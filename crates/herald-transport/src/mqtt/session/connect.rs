//! A connection's CONNECT: who it is (the connection JWT, or the backend's connect proxy
//! for a username and password, or anonymous), its client id, its persistent session
//! (loaded and resumed, or discarded), and the CONNACK.
//!
//! May touch: the authenticator and the backend proxy, the session store, through the
//! MQTT state.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use herald_core::admission::Refusal;
use herald_core::auth::Credentials;
use herald_core::proxy::ProxyContext;
use herald_core::publication::{ClientInfo, Payload};
use parking_lot::RwLock;

use super::super::MqttState;
use super::super::codec::{self, ConnAckProperties, Connect, Level, reason};
use super::super::delivery::{MqttEncoder, Table};
use super::super::persist::{self, Positions};
use super::{Persistence, Session};
use crate::chanmap::ChannelMap;
use crate::registry::{Control, Inbox};

impl Session {
    /// Authenticates the CONNECT and answers it; `None` when refused (the CONNACK saying
    /// why is in `out`).
    pub(super) async fn connect(
        state: Arc<MqttState>,
        level: Level,
        connect: Connect,
        in_buf: BytesMut,
        out: &mut BytesMut,
    ) -> Option<Self> {
        let refuse = |out: &mut BytesMut, code: u8, why: &str| {
            tracing::debug!(code, why, "mqtt: connect refused");
            let properties = ConnAckProperties {
                reason_string: Some(why.to_owned()),
                ..ConnAckProperties::default()
            };
            codec::connack(out, level, false, code, &properties);
        };
        let realtime = &state.realtime;
        let herald_client = uuid::Uuid::new_v4().to_string();
        let credentials = match authenticate(realtime, &connect, &herald_client).await {
            Ok(credentials) => credentials,
            Err((code, why)) => {
                refuse(out, code, &why);
                return None;
            }
        };
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if level == Level::V311 && !connect.clean_start {
                refuse(
                    out,
                    reason::CLIENT_ID_NOT_VALID,
                    "a persistent session needs a client id",
                );
                return None;
            }
            let id = format!("herald-{}", uuid::Uuid::new_v4().simple());
            assigned = Some(id.clone());
            id
        } else {
            connect.client_id.clone()
        };
        let info = Arc::new(ClientInfo {
            client: herald_client,
            user: credentials.user.clone(),
            conn_info: credentials.info.clone(),
            chan_info: None,
        });
        realtime.connections.fetch_add(1, Ordering::Relaxed);
        let outbound = realtime.new_outbound();
        // The registry lists no anonymous connection, so the server API cannot reach one.
        let control = (!credentials.is_anonymous()).then(|| Arc::new(Inbox::default()));
        let registration = realtime.register(
            &info,
            "mqtt",
            Control::new(outbound.clone(), control.clone()),
        );
        let connection = state.connected(&credentials.user, &client_id, &outbound);
        let max_inflight = state.config.max_inflight.max(1);
        let receive_maximum = connect
            .receive_maximum
            .map_or(max_inflight, |m| m.min(max_inflight));
        // Sessions: kept after the connection for `session_expiry` (capped), resumed unless
        // the client starts clean.
        let max_expiry = u32::try_from(state.config.max_session_expiry.as_duration().as_secs())
            .unwrap_or(u32::MAX);
        let expiry = connect.session_expiry.min(max_expiry);
        let key = persist::session_key(&credentials.user, &client_id);
        let mut saved = None;
        let persistence = match state.sessions.clone() {
            Some(store) => {
                if connect.clean_start {
                    persist::remove(&*store, &key).await;
                } else {
                    saved = persist::load(&*store, &key, herald_core::time::now_ms()).await;
                }
                (expiry > 0 || saved.is_some()).then(|| {
                    Box::new(Persistence {
                        store,
                        key,
                        expiry_secs: expiry,
                        positions: Positions::default(),
                        last_save: Instant::now(),
                    })
                })
            }
            None => None,
        };
        let shared_available =
            realtime.node.hub().sees_every_channel() || state.shared.membership().is_some();
        let table = Arc::new(RwLock::new(Table::default()));
        // MQTT 5 no-local needs the connection's own encoder (its client id and table);
        // 3.1.1 connections share one.
        let encoder = match level {
            Level::V311 => state.v311_encoder.clone(),
            Level::V5 => Arc::new(MqttEncoder {
                level,
                topics: state.topics.clone(),
                own: Some((info.client.clone(), table.clone())),
            }),
        };
        let mut session = Self {
            level,
            info,
            mqtt_client_id: client_id.into_boxed_str(),
            connection,
            outbound,
            encoder,
            table,
            exact: ChannelMap::new(),
            wildcards: None,
            acks: None,
            next_pkid: 0,
            receive_maximum,
            client_max_packet: connect.max_packet_size.unwrap_or(u32::MAX),
            pending: VecDeque::new(),
            in_buf,
            out_buf: BytesMut::new(),
            keep_alive: (connect.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
            last_packet: Instant::now(),
            will: connect.will.map(Box::new),
            persistence,
            _registration: registration,
            control,
            topic_aliases: None,
            retained_replies: None,
            out_aliases: (level == Level::V5 && connect.topic_alias_maximum > 0).then(|| {
                Box::new(super::OutAliases {
                    maximum: connect.topic_alias_maximum,
                    by_channel: HashMap::new(),
                })
            }),
            credentials: (!is_bare_anonymous(&credentials)).then(|| Box::new(credentials)),
            state,
        };
        let (session_present, reason_string) = match saved {
            Some(saved) => session.resume(saved).await,
            None => (false, None),
        };
        let kept = session.persistence.as_ref().map_or(0, |p| p.expiry_secs);
        let properties = ConnAckProperties {
            receive_maximum: Some(session.state.config.max_inflight.max(1)),
            max_packet_size: Some(
                u32::try_from(session.state.config.max_packet_size).unwrap_or(u32::MAX),
            ),
            assigned_client_id: assigned,
            // Told when it differs from what the client asked (capped, or no store).
            session_expiry: (connect.session_expiry != kept).then_some(kept),
            retain_available: true,
            wildcards_available: true,
            shared_available,
            topic_alias_maximum: session.state.config.topic_alias_maximum,
            reason_string,
        };
        codec::connack(out, level, session_present, reason::SUCCESS, &properties);
        tracing::debug!(client_id = %session.mqtt_client_id, user = %session.credentials().user, ?level, session_present, "mqtt: connected");
        Some(session)
    }
}

/// Anonymous credentials holding nothing: not kept (see `Session::credentials`).
fn is_bare_anonymous(credentials: &Credentials) -> bool {
    credentials.is_anonymous()
        && credentials.expires_at.is_none()
        && credentials.info.is_none()
        && credentials.channels.is_empty()
}

/// Who a CONNECT is. A password shaped like a JWT (three dot-separated parts) is the
/// connection token, verified like the WebSocket's. Otherwise, with `[proxy]
/// connect_endpoint`, the application's backend decides: it gets the username, password and
/// MQTT client id as the connect request's `data` and answers as it does for WebSocket
/// connects (user, expiry, info, channels). Otherwise no password means anonymous where the
/// config allows it. Refusals are an MQTT 5 CONNACK reason and a text.
async fn authenticate(
    realtime: &crate::realtime::RealtimeState,
    connect: &Connect,
    herald_client: &str,
) -> Result<Credentials, (u8, String)> {
    let token = connect
        .password
        .as_deref()
        .filter(|p| p.split('.').count() == 3);
    let backend = realtime.proxy.as_ref().filter(|p| p.handles_connect());
    if let Some(token) = token {
        return realtime
            .authenticator
            .authenticate(token)
            .await
            .map_err(|error| (reason::BAD_USERNAME_OR_PASSWORD, error.to_string()));
    }
    if let Some(proxy) = backend
        && (connect.username.is_some() || connect.password.is_some())
    {
        let data = serde_json::json!({
            "username": connect.username,
            "password": connect.password,
            "client_id": connect.client_id,
        });
        let data = Payload::Json(bytes::Bytes::from(data.to_string()));
        let context = ProxyContext {
            client: herald_client.to_owned(),
            user: String::new(),
            transport: "mqtt",
            protocol: "mqtt",
            headers: Vec::new(),
        };
        let answer = proxy.connect(&context, Some(&data)).await;
        return match herald_core::admission::backend_decision(answer) {
            Ok(grant) => Ok(Credentials {
                user: grant.user,
                expires_at: grant.expire_at,
                info: grant.info,
                channels: grant.channels,
            }),
            Err(Refusal::Unavailable) => Err((
                reason::SERVER_UNAVAILABLE,
                "the backend could not be asked".into(),
            )),
            Err(refusal) => Err((reason::NOT_AUTHORIZED, refusal.message())),
        };
    }
    match &connect.password {
        Some(_) => Err((
            reason::BAD_USERNAME_OR_PASSWORD,
            "the password is not a connection token (JWT)".into(),
        )),
        None if realtime.config.allow_anonymous => Ok(Credentials::anonymous()),
        None => Err((
            reason::NOT_AUTHORIZED,
            "the connection token is the CONNECT password".into(),
        )),
    }
}
