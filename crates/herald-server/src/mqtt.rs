//! The MQTT listeners (`[mqtt]`): plain TCP and, with `tls_listen`, TLS. Bound when the
//! server is built (so `herald serve` can print their addresses before serving, and a port
//! that is taken fails start-up), served from [`crate::Server::run`] until shutdown. Each
//! accepted socket is admitted by one [`Gate`] shared by both listeners with the `[server]`
//! connection limits (total, per IP, accept rate per IP, counted apart from HTTP's), goes
//! through the TLS handshake (under `server.header_read_timeout`) on the TLS listener, and is
//! handed to [`herald_transport::mqtt::run_connection`].
//!
//! May touch: the MQTT listening sockets, the sockets they accept, the certificate files.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use herald_core::webhook_store::WebhookStore;
use herald_transport::mqtt::MqttState;
use herald_transport::realtime::RealtimeState;
use parking_lot::Mutex;
use tokio::net::TcpListener;

use crate::build::BuildError;
use crate::config::Config;
use crate::listener::{ConnectionLimits, Gate};
use crate::tls::Tls;

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
    let path = mqtt.websocket_path.as_str();
    let taken = [
        "/api",
        "/connection",
        "/client",
        "/health",
        "/ready",
        "/metrics",
    ];
    if !path.is_empty()
        && (!path.starts_with('/')
            || path.contains(['{', '}', '*'])
            || taken
                .iter()
                .any(|t| path == *t || path.starts_with(&format!("{t}/"))))
    {
        return Err(format!(
            "mqtt.websocket_path {path:?} must start with '/', hold no '{{', '}}' or '*', and \
             stay out of Herald's own routes (/api, /connection, /client, /health, /ready, \
             /metrics); \"\" turns MQTT over WebSocket off"
        ));
    }
    if mqtt.tls_cert_file.as_os_str().is_empty() != mqtt.tls_key_file.as_os_str().is_empty() {
        return Err(
            "mqtt.tls_cert_file and mqtt.tls_key_file go together: set both or neither".into(),
        );
    }
    if mqtt.tls_listen.is_some() && tls_files(config).is_none() {
        return Err(
            "mqtt.tls_listen needs mqtt.tls_cert_file and mqtt.tls_key_file (or \
                    server.tls_cert_file and server.tls_key_file)"
                .into(),
        );
    }
    Ok(())
}

/// The certificate and key MQTT over TLS uses: its own, or the server's.
fn tls_files(config: &Config) -> Option<(&Path, &Path)> {
    let mqtt = &config.mqtt;
    let (cert, key) = if mqtt.tls_cert_file.as_os_str().is_empty() {
        (&config.server.tls_cert_file, &config.server.tls_key_file)
    } else {
        (&mqtt.tls_cert_file, &mqtt.tls_key_file)
    };
    (!cert.as_os_str().is_empty() && !key.as_os_str().is_empty())
        .then_some((cert.as_path(), key.as_path()))
}

/// The bound MQTT listeners and what their connections share.
pub struct MqttRuntime {
    pub state: Arc<MqttState>,
    pub local_addr: SocketAddr,
    /// The TLS listener's address, with `tls_listen`.
    pub tls_local_addr: Option<SocketAddr>,
    listener: Mutex<Option<std::net::TcpListener>>,
    tls_listener: Mutex<Option<(std::net::TcpListener, Arc<Tls>)>>,
    limits: ConnectionLimits,
}

impl std::fmt::Debug for MqttRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttRuntime")
            .field("local_addr", &self.local_addr)
            .field("tls_local_addr", &self.tls_local_addr)
            .finish_non_exhaustive()
    }
}

fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr), BuildError> {
    let bound = std::net::TcpListener::bind(addr).and_then(|listener| {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        Ok((listener, local))
    });
    bound.map_err(|error| BuildError::Mqtt { addr, error })
}

impl MqttRuntime {
    /// Binds `[mqtt] listen` (and `tls_listen`); persistent sessions are kept in `sessions`
    /// (the document store beside the outbound queue).
    pub fn bind(
        config: &Config,
        realtime: Arc<RealtimeState>,
        sessions: Option<Arc<dyn WebhookStore>>,
    ) -> Result<Self, BuildError> {
        let mqtt = &config.mqtt;
        let (listener, local_addr) = bind(mqtt.listen)?;
        tracing::info!(%local_addr, namespace = %mqtt.namespace, "mqtt listening");
        let (tls_listener, tls_local_addr) = match (mqtt.tls_listen, tls_files(config)) {
            (Some(addr), Some((cert, key))) => {
                // ALPN `mqtt` (clients that ask for none are served too).
                let tls = Tls::load_with_alpn(cert, key, vec![b"mqtt".to_vec()])?;
                let (listener, local) = bind(addr)?;
                tracing::info!(local_addr = %local, "mqtt over TLS listening");
                (Some((listener, tls)), Some(local))
            }
            _ => (None, None),
        };
        Ok(Self {
            state: Arc::new(MqttState::new(realtime, mqtt.clone()).with_session_store(sessions)),
            local_addr,
            tls_local_addr,
            listener: Mutex::new(Some(listener)),
            tls_listener: Mutex::new(tls_listener),
            limits: config.server.connection_limits(),
        })
    }

    /// Starts accepting (once); the loops end when the server shuts down.
    pub fn start(&self) -> tokio::task::JoinSet<()> {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.state.clone().purge_sessions());
        tasks.spawn(self.state.clone().refresh_shared_groups());
        let gate = Gate::new(self.limits.clone());
        let plain = self.listener.lock().take().map(|l| (l, None));
        let tls = self
            .tls_listener
            .lock()
            .take()
            .map(|(l, tls)| (l, Some(tls)));
        for (listener, tls) in plain.into_iter().chain(tls) {
            match TcpListener::from_std(listener) {
                Ok(listener) => {
                    let handshake = self.limits.header_read_timeout;
                    tasks.spawn(accept_loop(
                        listener,
                        self.state.clone(),
                        gate.clone(),
                        tls.map(|tls| (tls, handshake)),
                    ));
                }
                Err(error) => tracing::error!(%error, "mqtt: cannot use the listener"),
            }
        }
        tasks
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<MqttState>,
    gate: Arc<Gate>,
    tls: Option<(Arc<Tls>, Duration)>,
) {
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
                tokio::time::sleep(Duration::from_millis(100)).await;
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
        let tls = tls
            .as_ref()
            .map(|(tls, timeout)| (tls.acceptor(), *timeout));
        // Two spawns, not one future for both: a TCP connection's task would otherwise be
        // as large as a TLS handshake and stream (idle connections are most of the memory).
        match tls {
            None => {
                // The task is the connection's future itself, the permit dropped when it
                // ends: an `async` block around it would keep a second copy of the socket
                // (and of the permit) in every idle connection's task.
                let connection = herald_transport::mqtt::run_connection(socket, state);
                tokio::spawn(connection.map(move |()| drop(permit)));
            }
            Some((acceptor, timeout)) => {
                tokio::spawn(async move {
                    let _permit = permit;
                    let accepted =
                        Box::pin(tokio::time::timeout(timeout, acceptor.accept(socket))).await;
                    match accepted {
                        Ok(Ok(stream)) => {
                            herald_transport::mqtt::run_connection(stream, state).await;
                        }
                        _ => tracing::debug!(%peer, "mqtt: TLS handshake failed or timed out"),
                    }
                });
            }
        }
    }
}
