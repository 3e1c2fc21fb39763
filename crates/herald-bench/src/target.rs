//! Which server `fanout` and `idle` measure: Herald, one of its peers, or the ceiling
//! server, and what each needs to be reached — the subscribers' protocol
//! ([`crate::worker::Transport`]) and how publications reach it
//! ([`crate::publisher::PublishKind`]).
//!
//! Owns only this mapping and the flags that go with it; the servers themselves are started
//! by `bench/run`.

use anyhow::Context;
use serde::Serialize;

use crate::publisher::{MqttPublish, PublishKind, PushpinFormat};
use crate::pusher::PusherApp;
use crate::worker::Transport;

/// A server to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Herald (`--transport` says WebSocket or SSE; publishes over its HTTP API).
    Herald,
    /// `herald-bench ceiling-server`: plain WebSocket, `POST /pub/<channel>`.
    Ceiling,
    /// NATS: subscribers over its WebSocket listener, publisher over core TCP (`--publish-url`
    /// is `nats://HOST:PORT` or `http://HOST:PORT`).
    Nats,
    /// bench/peers/ws-node: Node `ws`, plain WebSocket, `POST /pub/<channel>`.
    WsNode,
    /// bench/peers/socketio: Socket.IO rooms, `POST /pub/<channel>`.
    Socketio,
    /// Sockudo: the Pusher protocol and the Pusher HTTP API (`--app-id/--app-key/--app-secret`).
    Sockudo,
    /// Pushpin: SSE through GRIP (bench/peers/pushpin origin), publishing to its HTTP
    /// publish endpoint (`--publish-url`, port 5561 by default).
    Pushpin,
    /// Pushpin: WebSocket through GRIP (the same origin, over WebSocket-over-HTTP), publishing
    /// `ws-message` items to the same endpoint.
    PushpinWs,
    /// Mosquitto: MQTT 3.1.1 over TCP for subscribers and the publisher (`--url
    /// http://HOST:PORT` names its MQTT port).
    Mosquitto,
    /// Herald's MQTT listener, like Mosquitto (`--token` for the subscribers,
    /// `--mqtt-password` for the publisher).
    HeraldMqtt,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Self::Herald => "herald",
            Self::Ceiling => "ceiling",
            Self::Nats => "nats",
            Self::WsNode => "ws-node",
            Self::Socketio => "socketio",
            Self::Sockudo => "sockudo",
            Self::Pushpin => "pushpin",
            Self::PushpinWs => "pushpin-ws",
            Self::Mosquitto => "mosquitto",
            Self::HeraldMqtt => "herald-mqtt",
        }
    }

    /// How its subscribers connect (`herald`: Herald's own transport).
    pub fn transport(self, herald: Transport) -> Transport {
        match self {
            Self::Herald => herald,
            Self::Ceiling | Self::WsNode => Transport::Plain,
            Self::Nats => Transport::Nats,
            Self::Socketio => Transport::Socketio,
            Self::Sockudo => Transport::Pusher,
            Self::Pushpin => Transport::PushpinSse,
            Self::PushpinWs => Transport::PushpinWs,
            Self::Mosquitto | Self::HeraldMqtt => Transport::Mqtt,
        }
    }

    /// How the publisher reaches it.
    pub fn publish_kind(
        self,
        api_key: Option<&str>,
        peer: &PeerArgs,
    ) -> anyhow::Result<PublishKind> {
        Ok(match self {
            Self::Herald => PublishKind::Herald {
                api_key: api_key
                    .context("--api-key (or HERALD_API_KEY) is required for Herald")?
                    .to_owned(),
            },
            Self::Ceiling | Self::WsNode | Self::Socketio => PublishKind::Post,
            Self::Nats => PublishKind::Nats,
            Self::Pushpin => PublishKind::Pushpin(PushpinFormat::HttpStream),
            Self::PushpinWs => PublishKind::Pushpin(PushpinFormat::WsMessage),
            Self::Mosquitto | Self::HeraldMqtt => PublishKind::Mqtt(MqttPublish {
                password: peer.mqtt_password.clone(),
                qos: match peer.mqtt_qos {
                    0 | 1 => peer.mqtt_qos,
                    other => anyhow::bail!("--mqtt-qos {other}: the publisher speaks QoS 0 or 1"),
                },
                inflight: peer.mqtt_inflight.max(1),
            }),
            Self::Sockudo => PublishKind::Pusher(PusherApp {
                id: peer
                    .app_id
                    .clone()
                    .context("--app-id is required for Sockudo")?,
                key: peer
                    .app_key
                    .clone()
                    .context("--app-key is required for Sockudo")?,
                secret: peer
                    .app_secret
                    .clone()
                    .context("--app-secret (or PUSHER_APP_SECRET) is required for Sockudo")?,
            }),
        })
    }
}

/// Flags for the peers.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PeerArgs {
    /// Where publications go, when not to `--url` (NATS's TCP port, Pushpin's publish port).
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Pusher application id (Sockudo).
    #[arg(long)]
    pub app_id: Option<String>,
    /// Pusher application key (Sockudo).
    #[arg(long)]
    pub app_key: Option<String>,
    /// Pusher application secret (Sockudo).
    #[arg(long, env = "PUSHER_APP_SECRET", hide_env_values = true)]
    pub app_secret: Option<String>,
    /// MQTT: the publisher's QoS (0 or 1).
    #[arg(long, default_value_t = 0)]
    pub mqtt_qos: u8,
    /// MQTT at QoS 1: publications awaiting their PUBACK at most.
    #[arg(long, default_value_t = 256)]
    pub mqtt_inflight: usize,
    /// MQTT: the publisher's CONNECT password (Herald: a connection token that may publish).
    #[arg(long, env = "HERALD_BENCH_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,
}
