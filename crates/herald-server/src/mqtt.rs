//! The MQTT listener (`[mqtt]`): bound when the server is built (so `herald serve` can print
//! its address before serving, and a port that is taken fails start-up), served from
//! [`crate::Server::run`] until shutdown. Each accepted socket is admitted by its own
//! [`Gate`] with the `[server]` connection limits (total, per IP, accept rate per IP, counted
//! apart from HTTP's) and handed to [`herald_transport::mqtt::run_connection`].
//!
//! May touch: the MQTT listening socket and the sockets it accepts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use herald_core::webhook_store::WebhookStore;
use herald_transport::mqtt::{MqttConfig, MqttState};
use herald_transport::realtime::RealtimeState;
use parking_lot::Mutex;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::listener::{ConnectionLimits, Gate};

/// Checks `[mqtt]` against the rest of the config.
pub fn validate(config: &Config) -> Result<(), String> {
    let mqtt = &config.mqtt;
    if !mqtt.enabled {
        return Ok(());
    }
    if !config.namespaces.iter().any(|ns| ns.name == mqtt.namespace) {
        return Err(format!(
            "mqtt.namespace {:?} must be one of the [[namespaces]]: its options (history, \
             who may publish and subscribe) apply to every MQTT topic",
            mqtt.namespace
        ));
    }
    if mqtt.max_packet_size < 64 || mqtt.max_packet_size > 268_435_455 {
        return Err("mqtt.max_packet_size must be between 64 and 268435455 bytes".into());
    }
    if mqtt.max_inflight == 0 {
        return Err("mqtt.max_inflight must be above 0".into());
    }
    if mqtt.max_subscriptions == 0 {
        return Err("mqtt.max_subscriptions must be above 0".into());
    }
    Ok(())
}

/// The bound MQTT listener and what its connections share.
pub struct MqttRuntime {
    pub state: Arc<MqttState>,
    pub local_addr: SocketAddr,
    listener: Mutex<Option<std::net::TcpListener>>,
    limits: ConnectionLimits,
}

impl std::fmt::Debug for MqttRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttRuntime")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl MqttRuntime {
    /// Binds `[mqtt] listen`; persistent sessions are kept in `sessions` (the document store
    /// beside the outbound queue).
    pub fn bind(
        config: &MqttConfig,
        limits: ConnectionLimits,
        realtime: Arc<RealtimeState>,
        sessions: Option<Arc<dyn WebhookStore>>,
    ) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(config.listen)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        tracing::info!(%local_addr, namespace = %config.namespace, "mqtt listening");
        Ok(Self {
            state: Arc::new(MqttState::new(realtime, config.clone()).with_session_store(sessions)),
            local_addr,
            listener: Mutex::new(Some(listener)),
            limits,
        })
    }

    /// Starts accepting (once); the loop ends when the server shuts down.
    pub fn start(&self) -> Option<tokio::task::JoinHandle<()>> {
        let listener = self.listener.lock().take()?;
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%error, "mqtt: cannot use the listener");
                return None;
            }
        };
        let gate = Gate::new(self.limits.clone());
        Some(tokio::spawn(accept_loop(
            listener,
            self.state.clone(),
            gate,
        )))
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<MqttState>, gate: Arc<Gate>) {
    let shutdown = state.realtime.clone();
    loop {
        let accepted = tokio::select! {
            () = shutdown.shutdown.wait() => return,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(%error, "mqtt: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match gate.admit(peer.ip(), false, Instant::now()) {
            Ok(permit) => permit,
            Err(refusal) => {
                tracing::debug!(?refusal, %peer, "mqtt: connection refused by the limits");
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            herald_transport::mqtt::run_connection(socket, state).await;
        });
    }
}
