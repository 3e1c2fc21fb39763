//! The WebSocket session's calls to the application's backend (the [`BackendProxy`] port):
//! connect, refresh, subscribe, publish and rpc, and how the backend's answers become replies,
//! errors with the backend's own codes, or disconnects.

use std::sync::Arc;

use herald_core::admission::{Refusal, backend_decision};
use herald_core::auth::Credentials;
use herald_core::proxy::{ProxyContext, ProxyReply};
use herald_core::publication::ClientInfo;
use herald_core::{ErrorCode, HeraldError};

use super::Session;
use crate::outbound::CloseReason;
use crate::ws::protocol::{self, ResultBody};

/// How long to wait before asking again when the refresh backend could not be reached.
const REFRESH_RETRY_SECS: u64 = 10;

impl Session {
    pub(super) fn proxy_context(&self) -> ProxyContext {
        ProxyContext {
            client: self.client_id.clone(),
            user: self.user().to_owned(),
            transport: self.transport,
            protocol: self.encoding.name(),
            headers: self.proxy_headers.clone(),
        }
    }

    /// The granted value, or `None` when the backend refused (see [`Self::refuse`]).
    pub(super) fn backend_answer<T>(
        &self,
        id: u32,
        answer: Result<ProxyReply<T>, HeraldError>,
    ) -> Option<T> {
        match backend_decision(answer) {
            Ok(value) => Some(value),
            Err(refusal) => {
                self.refuse(id, refusal);
                None
            }
        }
    }

    /// Answers a refused command: Herald's error, the backend's own error (code and
    /// message), a close when the backend asked for a disconnect, or error 100 (temporary, so
    /// SDKs retry) when the backend could not be asked.
    pub(super) fn refuse(&self, id: u32, refusal: Refusal) {
        match refusal {
            Refusal::Denied(error) => self.reply_err(id, &error),
            Refusal::Backend { code, message } => {
                let temporary = false;
                self.outbound
                    .push(self.encoding.error_with(id, code, &message, temporary));
            }
            Refusal::Disconnect { code } => self.outbound.close(CloseReason::from_backend(code)),
            Refusal::Unavailable => self.reply_err(
                id,
                &HeraldError::new(ErrorCode::Internal, "the backend is unavailable"),
            ),
        }
    }

    /// Connect without a token, decided by the backend. `None`: refused (reply queued).
    pub(super) async fn connect_via_backend(
        &mut self,
        id: u32,
        request: &protocol::ConnectRequest,
    ) -> Option<(Credentials, Option<herald_core::Payload>)> {
        let proxy = self.state.proxy.clone()?;
        let answer = proxy
            .connect(&self.proxy_context(), request.data.as_ref())
            .await;
        let grant = self.backend_answer(id, answer)?;
        self.refresh_via_backend = grant.expire_at.is_some() && proxy.handles_refresh();
        let data = grant.data.map(|raw| {
            herald_core::Payload::Json(bytes::Bytes::from(String::from(Box::<str>::from(raw))))
        });
        Some((
            Credentials {
                user: grant.user,
                expires_at: grant.expire_at,
                info: grant.info,
                channels: grant.channels,
            },
            data,
        ))
    }

    /// At expiry of a backend-granted connection: asks the refresh proxy. False: close (3005).
    pub(super) async fn refresh_via_backend(&mut self) -> bool {
        let Some(proxy) = self.state.proxy.clone() else {
            return false;
        };
        let now = herald_core::time::now_ms() / 1000;
        match proxy.refresh(&self.proxy_context()).await {
            // A new expiry that is already past counts as expired: taking it would ask the
            // backend again at once, in a loop.
            Ok(ProxyReply::Ok(grant))
                if !grant.expired && grant.expire_at.is_none_or(|at| at > now) =>
            {
                if let Some(credentials) = self.credentials.as_mut() {
                    credentials.expires_at = grant.expire_at;
                    if let Some(info) = grant.info {
                        credentials.info = Some(info.clone());
                        if let Some(current) = &self.info {
                            self.info = Some(Arc::new(ClientInfo {
                                conn_info: Some(info),
                                ..(**current).clone()
                            }));
                        }
                    }
                }
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(error = %error, "refresh backend unavailable; asking again later");
                if let Some(credentials) = self.credentials.as_mut() {
                    credentials.expires_at = Some(now + REFRESH_RETRY_SECS);
                }
                true
            }
        }
    }

    /// An `rpc` command, answered by the backend.
    pub(super) async fn rpc_via_backend(&mut self, id: u32, request: protocol::RpcRequest) {
        let Some(proxy) = self.state.proxy.clone() else {
            return;
        };
        let answer = proxy
            .rpc(
                &self.proxy_context(),
                &request.method,
                request.data.as_ref(),
            )
            .await;
        if let Some(result) = self.backend_answer(id, answer) {
            let result = protocol::RpcResult { data: result.data };
            self.reply(id, ResultBody::Rpc(&result));
        }
    }
}
