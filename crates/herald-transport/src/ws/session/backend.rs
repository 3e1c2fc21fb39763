//! The WebSocket session's calls to the application's backend (the [`BackendProxy`] port):
//! connect, refresh, subscribe, publish and rpc, and how the backend's answers become replies,
//! errors with the backend's own codes, or disconnects.

use std::sync::Arc;

use herald_core::auth::{Credentials, SubscriptionGrant};
use herald_core::proxy::{ProxyContext, ProxyReply};
use herald_core::publication::ClientInfo;
use herald_core::{ChannelName, ErrorCode, HeraldError};

use super::Session;
use crate::outbound::CloseReason;
use crate::ws::protocol::{self, ResultBody};

/// How long to wait before asking again when the refresh backend could not be reached.
const REFRESH_RETRY_SECS: u64 = 10;

/// A backend's disconnect code as a close frame: 3000–3499 ask the client to reconnect,
/// 3500–4999 not to; anything else becomes 3503.
fn backend_close(code: u16) -> CloseReason {
    match code {
        3000..=3499 => CloseReason {
            code,
            reason: "backend reconnect",
        },
        3500..=4999 => CloseReason {
            code,
            reason: "backend disconnect",
        },
        _ => CloseReason::FORCE_DISCONNECT,
    }
}

impl Session {
    pub(super) fn proxy_context(&self) -> ProxyContext {
        ProxyContext {
            client: self.client_id.clone(),
            user: self.user().to_owned(),
            transport: "websocket",
            protocol: self.encoding.name(),
            headers: self.proxy_headers.clone(),
        }
    }

    /// The granted value, or `None` when the backend refused: its error is queued as the
    /// reply to `id` (or the connection is closed, or error 100 is sent when the backend could
    /// not be asked — temporary, so SDKs retry).
    pub(super) fn backend_answer<T>(
        &self,
        id: u32,
        answer: Result<ProxyReply<T>, HeraldError>,
    ) -> Option<T> {
        match answer {
            Ok(ProxyReply::Ok(value)) => Some(value),
            Ok(ProxyReply::Error { code, message }) => {
                let temporary = false;
                self.outbound
                    .push(self.encoding.error_with(id, code, &message, temporary));
                None
            }
            Ok(ProxyReply::Disconnect { code }) => {
                self.outbound.close(backend_close(code));
                None
            }
            Err(error) => {
                tracing::warn!(error = %error, "backend proxy unavailable");
                self.reply_err(
                    id,
                    &HeraldError::new(ErrorCode::Internal, "the backend is unavailable"),
                );
                None
            }
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

    /// A subscription the namespace leaves to the backend. `None`: refused (reply queued).
    pub(super) async fn subscribe_via_backend(
        &mut self,
        id: u32,
        name: &ChannelName,
        data: Option<&herald_core::Payload>,
    ) -> Option<SubscriptionGrant> {
        let proxy = self.state.proxy.clone()?;
        let answer = proxy
            .subscribe(&self.proxy_context(), name.as_str(), data)
            .await;
        let grant = self.backend_answer(id, answer)?;
        Some(SubscriptionGrant {
            user: self.user().to_owned(),
            channel: name.as_str().to_owned(),
            expires_at: None,
            info: grant.info,
        })
    }

    /// A client publication the namespace leaves to the backend, which may rewrite it.
    pub(super) async fn publish_via_backend(&mut self, id: u32, request: protocol::PublishRequest) {
        let Some(proxy) = self.state.proxy.clone() else {
            return;
        };
        let name = match self.state.node.resolve(&request.channel) {
            Ok((name, _)) => name,
            Err(error) => return self.reply_err(id, &error),
        };
        if let Err(error) = self.take_publish_token() {
            return self.reply_err(id, &error);
        }
        let answer = proxy
            .publish(&self.proxy_context(), name.as_str(), &request.data)
            .await;
        let Some(grant) = self.backend_answer(id, answer) else {
            return;
        };
        let data = grant.data.unwrap_or(request.data);
        match self
            .publish_as_client(&name, data, grant.skip_history)
            .await
        {
            Ok(_) => self.reply(id, ResultBody::Publish),
            Err(error) => self.reply_err(id, &error),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_disconnect_codes_keep_their_meaning() {
        assert_eq!(backend_close(3000).code, 3000);
        assert_eq!(backend_close(4500).reason, "backend disconnect");
        assert_eq!(backend_close(1000), CloseReason::FORCE_DISCONNECT);
        assert_eq!(backend_close(5000), CloseReason::FORCE_DISCONNECT);
    }
}
