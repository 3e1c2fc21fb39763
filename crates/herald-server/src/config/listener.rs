//! `[server]` and `[client]`: the listener (address, TLS, connection limits, HTTP/2
//! keep-alive, trusted proxies) and the real-time client connections it takes (pings, queues,
//! message sizes, rates).
//!
//! Owns those sections' schema and their translation into the listener's and the transports'
//! settings. May touch: nothing (plain data).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use herald_core::duration::HumanDuration;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the HTTP listener.
    pub listen: SocketAddr,
    /// Node name shown by `/api/info`.
    pub name: String,
    /// Largest request body the HTTP API accepts.
    pub max_body_size: usize,
    /// Largest publication payload in bytes.
    pub max_publication_size: usize,
    /// How long a graceful shutdown may take before in-flight requests are cut.
    pub shutdown_timeout: HumanDuration,
    /// How long the server keeps accepting after SIGTERM while `/ready` answers 503, so load
    /// balancers take it out of rotation before it stops listening.
    pub shutdown_delay: HumanDuration,
    /// Longest a server API request may take, from reading its body to the response (408 after).
    pub request_timeout: HumanDuration,
    /// Most open connections (HTTP and real-time together); 0: no limit but the OS's.
    pub max_connections: usize,
    /// Most open connections from one IP address; 0: no limit.
    pub max_connections_per_ip: usize,
    /// New connections per second from one IP address (bursts of the same size); 0: no limit.
    pub connection_rate_per_ip: u32,
    /// Time a client has to send a request's headers (slowloris), and a TLS handshake.
    pub header_read_timeout: HumanDuration,
    /// HTTP/2 PING to a connection silent this long (gRPC streams, h2 requests); 0: never.
    pub http2_keepalive_interval: HumanDuration,
    /// A PING not acknowledged in this time closes the connection (a dead peer).
    pub http2_keepalive_timeout: HumanDuration,
    /// PEM certificate chain: with `tls_key_file`, the listener speaks HTTPS/WSS only.
    pub tls_cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `tls_cert_file`.
    pub tls_key_file: PathBuf,
    /// Reverse proxies and load balancers (CIDRs or addresses) whose `forwarded_header` names
    /// the client: per-IP limits and logs then use the client's address.
    pub trusted_proxies: Vec<String>,
    /// The header the trusted proxies set: `x-forwarded-for` or `forwarded` (RFC 7239).
    pub forwarded_header: crate::forwarded::ForwardedHeader,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            name: "herald".into(),
            max_body_size: 1024 * 1024,
            max_publication_size: 64 * 1024,
            shutdown_timeout: HumanDuration::from_secs(10),
            shutdown_delay: HumanDuration::from_secs(0),
            request_timeout: HumanDuration::from_secs(30),
            max_connections: 0,
            max_connections_per_ip: 0,
            connection_rate_per_ip: 0,
            header_read_timeout: HumanDuration::from_secs(10),
            http2_keepalive_interval: HumanDuration::from_secs(30),
            http2_keepalive_timeout: HumanDuration::from_secs(20),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            trusted_proxies: Vec::new(),
            forwarded_header: crate::forwarded::ForwardedHeader::XForwardedFor,
        }
    }
}

/// Real-time client connections (WebSocket and the other transports).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Connections without a token are accepted as anonymous users. Anonymous users still
    /// need a namespace with `allow_subscribe_for_anonymous` to subscribe.
    pub allow_anonymous: bool,
    /// Server ping interval ("0s" disables pings).
    pub ping_interval: HumanDuration,
    /// How long a client may take to answer a ping.
    pub pong_timeout: HumanDuration,
    /// Bytes queued for one connection before it is disconnected as slow (code 3008).
    pub max_queue_bytes: usize,
    /// Bytes queued for all connections together before the connections holding the most
    /// are disconnected as slow (3008); 0: no limit. Unset: a quarter of the memory the
    /// process may use (the machine's, or the cgroup's limit when lower).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_total_queue_bytes: Option<usize>,
    /// Largest incoming WebSocket message.
    pub max_message_size: usize,
    /// Most publications one subscribe may recover; beyond it the answer is "not recovered".
    pub recovery_max_publications: usize,
    /// Most channels per connection.
    pub max_subscriptions: usize,
    /// Time a new connection has to send its connect command.
    pub connect_timeout: HumanDuration,
    /// Grace after a token's `exp` before a WebSocket connection that did not refresh is
    /// closed (SDKs refresh exactly at expiry).
    pub expired_close_delay: HumanDuration,
    /// Web origins (besides the server's own) whose pages may connect: exact
    /// (`https://app.example.com`), any subdomain (`https://*.example.com`) or `*`.
    pub allowed_origins: Vec<String>,
    /// Commands per second per WebSocket connection (error 111 over it); 0: no limit.
    pub commands_per_second: u32,
    /// Client publications per second per user (error 111 over it); 0: no limit.
    pub publications_per_second_per_user: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        let rt = herald_transport::realtime::RealtimeConfig::default();
        Self {
            allow_anonymous: rt.allow_anonymous,
            ping_interval: HumanDuration(rt.ping_interval),
            pong_timeout: HumanDuration(rt.pong_timeout),
            max_queue_bytes: rt.max_queue_bytes,
            max_total_queue_bytes: None,
            max_message_size: rt.max_message_size,
            recovery_max_publications: rt.recovery_max_publications,
            max_subscriptions: rt.max_subscriptions,
            connect_timeout: HumanDuration(rt.connect_timeout),
            expired_close_delay: HumanDuration(rt.expired_close_delay),
            allowed_origins: Vec::new(),
            commands_per_second: rt.commands_per_second,
            publications_per_second_per_user: rt.publications_per_second_per_user,
        }
    }
}

impl ServerConfig {
    /// The TLS files, when both are set.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        (set(&self.tls_cert_file) && set(&self.tls_key_file))
            .then_some((self.tls_cert_file.as_path(), self.tls_key_file.as_path()))
    }

    pub fn connection_limits(&self) -> crate::listener::ConnectionLimits {
        crate::listener::ConnectionLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            accepts_per_ip_per_second: self.connection_rate_per_ip,
            header_read_timeout: self.header_read_timeout.as_duration(),
            http2_keepalive: (!self.http2_keepalive_interval.is_zero()).then(|| {
                (
                    self.http2_keepalive_interval.as_duration(),
                    self.http2_keepalive_timeout.as_duration(),
                )
            }),
        }
    }
}

impl ClientConfig {
    /// The real-time settings; `memory` is what the process may use, for the default
    /// `max_total_queue_bytes`.
    pub fn realtime(&self, memory: Option<u64>) -> herald_transport::realtime::RealtimeConfig {
        herald_transport::realtime::RealtimeConfig {
            allow_anonymous: self.allow_anonymous,
            ping_interval: self.ping_interval.as_duration(),
            pong_timeout: self.pong_timeout.as_duration(),
            max_queue_bytes: self.max_queue_bytes,
            max_total_queue_bytes: self.max_total_queue_bytes.unwrap_or_else(|| {
                memory.map_or(0, |bytes| usize::try_from(bytes / 4).unwrap_or(usize::MAX))
            }),
            max_message_size: self.max_message_size,
            recovery_max_publications: self.recovery_max_publications,
            max_subscriptions: self.max_subscriptions,
            connect_timeout: self.connect_timeout.as_duration(),
            expired_close_delay: self.expired_close_delay.as_duration(),
            commands_per_second: self.commands_per_second,
            publications_per_second_per_user: self.publications_per_second_per_user,
            proxy_headers: Vec::new(),
        }
    }
}
