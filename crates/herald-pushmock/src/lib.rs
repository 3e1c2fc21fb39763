//! Local emulators of the two mobile push services Herald calls, for its tests and
//! benchmarks: APNs (HTTP/2, token authentication) and FCM HTTP v1 with the Google OAuth
//! token endpoint its service accounts use. They check what the real services check and
//! answer with the documented statuses and error bodies; tests script failures and read what
//! was accepted, in Rust ([`ApnsMock`], [`FcmMock`]) or over the [`control`] HTTP API.
//!
//! Both speak HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one port; the real services
//! are HTTPS with ALPN `h2`, which senders reach by their configured base URL.
//!
//! Owns: the listeners [`PushMock::start`] binds and the emulators' state. May touch: files
//! it is asked to write keys to.

pub mod apns;
pub mod clock;
pub mod control;
pub mod fcm;
mod http;
pub mod keys;
mod script;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use apns::{ApnsFailure, ApnsMock, ApnsMockConfig, ApnsMockKey, ApnsRecord, ApnsStats};
pub use clock::MockClock;
pub use fcm::{FcmFailure, FcmMock, FcmMockAccount, FcmMockConfig, FcmRecord, FcmStats};
pub use keys::{ApnsKey, KeyError, ServiceAccount};

/// Where to listen and how to start.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushMockConfig {
    pub apns_listen: SocketAddr,
    pub fcm_listen: SocketAddr,
    /// The control API's address; none: no control API.
    pub control_listen: Option<SocketAddr>,
    pub apns: ApnsMockConfig,
    pub fcm: FcmMockConfig,
}

impl Default for PushMockConfig {
    fn default() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            apns_listen: any,
            fcm_listen: any,
            control_listen: Some(any),
            apns: ApnsMockConfig::default(),
            fcm: FcmMockConfig::default(),
        }
    }
}

/// Why the emulators could not start.
#[derive(Debug, thiserror::Error)]
pub enum PushMockError {
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Both emulators (and the control API) running on their own ports; stopped on drop.
pub struct PushMock {
    pub apns: ApnsMock,
    pub fcm: FcmMock,
    pub clock: MockClock,
    apns_addr: SocketAddr,
    fcm_addr: SocketAddr,
    control_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for PushMock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushMock")
            .field("apns", &self.apns_addr)
            .field("fcm", &self.fcm_addr)
            .field("control", &self.control_addr)
            .finish_non_exhaustive()
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), PushMockError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| PushMockError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| PushMockError::Listen { addr, source })?;
    Ok((listener, local))
}

impl PushMock {
    /// Binds the listeners and starts serving (on the current tokio runtime).
    pub async fn start(config: PushMockConfig) -> Result<Self, PushMockError> {
        let clock = MockClock::new();
        let apns = ApnsMock::new(config.apns, clock.clone())?;
        let fcm = FcmMock::new(config.fcm, clock.clone())?;
        let (apns_listener, apns_addr) = bind(config.apns_listen).await?;
        let (fcm_listener, fcm_addr) = bind(config.fcm_listen).await?;
        fcm.set_token_url(&format!("http://{fcm_addr}/token"));
        let (shutdown, watch) = watch::channel(false);
        let mut tasks = vec![
            tokio::spawn(http::serve(
                apns_listener,
                Arc::new(apns.clone()),
                watch.clone(),
            )),
            tokio::spawn(http::serve(
                fcm_listener,
                Arc::new(fcm.clone()),
                watch.clone(),
            )),
        ];
        let control_addr = match config.control_listen {
            Some(addr) => {
                let (listener, addr) = bind(addr).await?;
                let control = control::Control {
                    apns: apns.clone(),
                    fcm: fcm.clone(),
                    clock: clock.clone(),
                };
                tasks.push(tokio::spawn(http::serve(
                    listener,
                    Arc::new(control),
                    watch.clone(),
                )));
                Some(addr)
            }
            None => None,
        };
        Ok(Self {
            apns,
            fcm,
            clock,
            apns_addr,
            fcm_addr,
            control_addr,
            shutdown,
            tasks,
        })
    }

    /// Starts with the defaults: everything on 127.0.0.1, ephemeral ports.
    pub async fn start_default() -> Result<Self, PushMockError> {
        Self::start(PushMockConfig::default()).await
    }

    /// The APNs base URL (`http://127.0.0.1:port`), to configure senders with.
    pub fn apns_url(&self) -> String {
        format!("http://{}", self.apns_addr)
    }

    /// The FCM base URL.
    pub fn fcm_url(&self) -> String {
        format!("http://{}", self.fcm_addr)
    }

    /// The OAuth token endpoint (a service account's `token_uri`).
    pub fn token_url(&self) -> String {
        self.fcm.token_url()
    }

    pub fn control_url(&self) -> Option<String> {
        self.control_addr.map(|addr| format!("http://{addr}"))
    }

    /// Generates an APNs key for `team_id` and makes the emulator accept it for `topics`.
    pub fn apns_key(
        &self,
        key_id: &str,
        team_id: &str,
        topics: &[&str],
    ) -> Result<ApnsKey, KeyError> {
        let key = ApnsKey::generate(key_id, team_id)?;
        self.apns.add_key(ApnsMockKey {
            key_id: key.key_id.clone(),
            team_id: key.team_id.clone(),
            public_key_pem: key.public_key_pem.clone(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        })?;
        Ok(key)
    }

    /// Generates a service account of `project_id` whose `token_uri` is this emulator's, and
    /// makes the token endpoint accept it.
    pub fn fcm_account(&self, project_id: &str) -> Result<ServiceAccount, KeyError> {
        let account = ServiceAccount::generate(project_id, &self.token_url())?;
        self.fcm.add_account(FcmMockAccount {
            project_id: account.project_id.clone(),
            client_email: account.client_email.clone(),
            public_key_pem: account.public_key_pem.clone(),
        })?;
        Ok(account)
    }

    /// Moves both emulators' clock forward.
    pub fn advance_clock(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Stops accepting, lets open connections finish what they are doing, and waits.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for PushMock {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}
