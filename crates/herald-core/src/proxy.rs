//! The backend proxy port: the application's own backend decides (and may enrich) connects,
//! refreshes, subscriptions and client publications, and answers RPC calls. The server
//! implements it over HTTP (Centrifugo's proxy protocol); transports only call this trait.

use async_trait::async_trait;
use serde_json::value::RawValue;

use crate::error::HeraldError;
use crate::publication::Payload;

/// Who is asking, as the backend sees it.
#[derive(Clone, Debug, Default)]
pub struct ProxyContext {
    pub client: String,
    /// Empty before connect, and for anonymous users.
    pub user: String,
    /// `websocket`, `sse`, …
    pub transport: &'static str,
    /// `json` or `protobuf`.
    pub protocol: &'static str,
    /// Headers of the client's HTTP request that the config passes through.
    pub headers: Vec<(String, String)>,
}

/// The backend's answer: a result, an error for the client (its own code and message), or a
/// disconnect.
#[derive(Clone, Debug)]
pub enum ProxyReply<T> {
    Ok(T),
    Error { code: u32, message: String },
    Disconnect { code: u16 },
}

/// What a connect proxy grants.
#[derive(Clone, Debug, Default)]
pub struct ConnectGrant {
    /// The user; empty means anonymous.
    pub user: String,
    /// Unix seconds; the connection must be refreshed (through the refresh proxy) by then.
    pub expire_at: Option<u64>,
    pub info: Option<Box<RawValue>>,
    /// Server-side subscriptions.
    pub channels: Vec<String>,
    /// Returned to the client in the connect reply.
    pub data: Option<Box<RawValue>>,
}

/// What a refresh proxy answers.
#[derive(Clone, Debug, Default)]
pub struct RefreshGrant {
    /// The connection must end (3005).
    pub expired: bool,
    pub expire_at: Option<u64>,
    pub info: Option<Box<RawValue>>,
}

/// What a subscribe proxy grants.
#[derive(Clone, Debug, Default)]
pub struct SubscribeGrant {
    /// Shown as `chan_info`.
    pub info: Option<Box<RawValue>>,
}

/// What a publish proxy answers.
#[derive(Clone, Debug, Default)]
pub struct PublishGrant {
    /// Replaces the client's data when set.
    pub data: Option<Payload>,
    pub skip_history: bool,
}

/// The backend's RPC result.
#[derive(Clone, Debug, Default)]
pub struct RpcResult {
    pub data: Option<Payload>,
}

/// A backend that decides. `Err` means the backend could not be asked (down, timed out,
/// answered garbage): the client gets error 100, marked temporary, and may retry.
#[async_trait]
pub trait BackendProxy: Send + Sync + 'static {
    fn handles_connect(&self) -> bool;
    fn handles_refresh(&self) -> bool;
    fn handles_subscribe(&self) -> bool;
    fn handles_publish(&self) -> bool;
    fn handles_rpc(&self) -> bool;

    async fn connect(
        &self,
        context: &ProxyContext,
        data: Option<&Payload>,
    ) -> Result<ProxyReply<ConnectGrant>, HeraldError>;

    async fn refresh(
        &self,
        context: &ProxyContext,
    ) -> Result<ProxyReply<RefreshGrant>, HeraldError>;

    async fn subscribe(
        &self,
        context: &ProxyContext,
        channel: &str,
        data: Option<&Payload>,
    ) -> Result<ProxyReply<SubscribeGrant>, HeraldError>;

    async fn publish(
        &self,
        context: &ProxyContext,
        channel: &str,
        data: &Payload,
    ) -> Result<ProxyReply<PublishGrant>, HeraldError>;

    async fn rpc(
        &self,
        context: &ProxyContext,
        method: &str,
        data: Option<&Payload>,
    ) -> Result<ProxyReply<RpcResult>, HeraldError>;
}
