//! The backend proxy over HTTP, in Centrifugo's proxy format so existing backends work: a
//! `POST` of JSON per event to the configured endpoint, answered with `{"result":{…}}`,
//! `{"error":{"code","message"}}` or `{"disconnect":{"code","reason"}}`. The configured
//! request headers of the client's connection are passed through; every call has a timeout.
//!
//! May touch: the network (the configured endpoints).

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use herald_core::proxy::{
    BackendProxy, ConnectGrant, ProxyContext, ProxyReply, PublishGrant, RefreshGrant, RpcResult,
    SubscribeGrant,
};
use herald_core::{ErrorCode, HeraldError, Payload};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::ProxyConfig;

/// Largest backend answer read.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

#[derive(Debug)]
pub struct HttpProxy {
    client: reqwest::Client,
    config: ProxyConfig,
}

#[derive(Debug, Deserialize)]
struct Answer {
    result: Option<Box<RawValue>>,
    error: Option<AnswerError>,
    disconnect: Option<AnswerDisconnect>,
}

#[derive(Debug, Deserialize)]
struct AnswerError {
    code: u32,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct AnswerDisconnect {
    code: u16,
}

#[derive(Debug, Default, Deserialize)]
struct ConnectResult {
    #[serde(default)]
    user: String,
    expire_at: Option<u64>,
    info: Option<Box<RawValue>>,
    b64info: Option<String>,
    data: Option<Box<RawValue>>,
    #[serde(default)]
    channels: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RefreshResult {
    #[serde(default)]
    expired: bool,
    expire_at: Option<u64>,
    info: Option<Box<RawValue>>,
}

#[derive(Debug, Default, Deserialize)]
struct SubscribeResult {
    info: Option<Box<RawValue>>,
}

#[derive(Debug, Default, Deserialize)]
struct PublishResult {
    data: Option<Box<RawValue>>,
    b64data: Option<String>,
    #[serde(default)]
    skip_history: bool,
}

#[derive(Debug, Default, Deserialize)]
struct RpcAnswer {
    data: Option<Box<RawValue>>,
    b64data: Option<String>,
}

fn unavailable(detail: impl std::fmt::Display) -> HeraldError {
    HeraldError::new(ErrorCode::Internal, format!("backend proxy: {detail}"))
}

fn raw_payload(raw: Box<RawValue>) -> Payload {
    Payload::Json(bytes::Bytes::from(String::from(Box::<str>::from(raw))))
}

/// `data` as JSON, or `b64data` for binary, as the proxy format has it.
fn put_data(body: &mut Map<String, Value>, data: Option<&Payload>) {
    match data {
        Some(Payload::Json(bytes)) => {
            if let Ok(value) = serde_json::from_slice::<Value>(bytes) {
                body.insert("data".into(), value);
            }
        }
        Some(Payload::Binary(bytes)) => {
            body.insert(
                "b64data".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
        }
        None => {}
    }
}

fn data_from(
    raw: Option<Box<RawValue>>,
    b64: Option<String>,
) -> Result<Option<Payload>, HeraldError> {
    if let Some(raw) = raw {
        return Ok(Some(raw_payload(raw)));
    }
    match b64 {
        Some(text) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(|bytes| Some(Payload::Binary(bytes.into())))
            .map_err(|e| unavailable(format!("bad b64data: {e}"))),
        None => Ok(None),
    }
}

impl HttpProxy {
    pub fn new(config: &ProxyConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout.as_duration().max(Duration::from_millis(1)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            config: config.clone(),
        })
    }

    /// POSTs `body` (plus the context's fields) to `endpoint` and reads the answer.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: &str,
        context: &ProxyContext,
        mut body: Map<String, Value>,
    ) -> Result<ProxyReply<T>, HeraldError> {
        body.insert("client".into(), Value::String(context.client.clone()));
        body.insert("transport".into(), Value::String(context.transport.into()));
        body.insert("protocol".into(), Value::String(context.protocol.into()));
        body.insert("encoding".into(), Value::String("json".into()));
        if !context.user.is_empty() {
            body.insert("user".into(), Value::String(context.user.clone()));
        }
        let mut request = self.client.post(endpoint).json(&Value::Object(body));
        for (name, value) in &context.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let mut response = request.send().await.map_err(unavailable)?;
        if !response.status().is_success() {
            return Err(unavailable(format!("HTTP {}", response.status())));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(unavailable("answer too large"));
            }
            bytes.extend_from_slice(&chunk);
        }
        let answer: Answer =
            serde_json::from_slice(&bytes).map_err(|e| unavailable(format!("bad answer: {e}")))?;
        if let Some(disconnect) = answer.disconnect {
            return Ok(ProxyReply::Disconnect {
                code: disconnect.code,
            });
        }
        if let Some(error) = answer.error {
            return Ok(ProxyReply::Error {
                code: error.code,
                message: error.message,
            });
        }
        let result = match answer.result {
            Some(raw) => serde_json::from_str(raw.get())
                .map_err(|e| unavailable(format!("bad result: {e}")))?,
            None => serde_json::from_str("{}").map_err(|e| unavailable(e.to_string()))?,
        };
        Ok(ProxyReply::Ok(result))
    }
}

fn map<T, U>(
    reply: ProxyReply<T>,
    f: impl FnOnce(T) -> Result<U, HeraldError>,
) -> Result<ProxyReply<U>, HeraldError> {
    Ok(match reply {
        ProxyReply::Ok(value) => ProxyReply::Ok(f(value)?),
        ProxyReply::Error { code, message } => ProxyReply::Error { code, message },
        ProxyReply::Disconnect { code } => ProxyReply::Disconnect { code },
    })
}

#[async_trait]
impl BackendProxy for HttpProxy {
    fn handles_connect(&self) -> bool {
        !self.config.connect_endpoint.is_empty()
    }
    fn handles_refresh(&self) -> bool {
        !self.config.refresh_endpoint.is_empty()
    }
    fn handles_subscribe(&self) -> bool {
        !self.config.subscribe_endpoint.is_empty()
    }
    fn handles_publish(&self) -> bool {
        !self.config.publish_endpoint.is_empty()
    }
    fn handles_rpc(&self) -> bool {
        !self.config.rpc_endpoint.is_empty()
    }

    async fn connect(
        &self,
        context: &ProxyContext,
        data: Option<&Payload>,
    ) -> Result<ProxyReply<ConnectGrant>, HeraldError> {
        let mut body = Map::new();
        put_data(&mut body, data);
        let reply: ProxyReply<ConnectResult> = self
            .call(&self.config.connect_endpoint, context, body)
            .await?;
        map(reply, |r| {
            let info = match (r.info, r.b64info) {
                (Some(info), _) => Some(info),
                // Binary info has no JSON form on this server: keep it as a JSON string.
                (None, Some(b64)) => serde_json::value::to_raw_value(&b64).ok(),
                (None, None) => None,
            };
            Ok(ConnectGrant {
                user: r.user,
                expire_at: r.expire_at,
                info,
                channels: r.channels,
                data: r.data,
            })
        })
    }

    async fn refresh(
        &self,
        context: &ProxyContext,
    ) -> Result<ProxyReply<RefreshGrant>, HeraldError> {
        let reply: ProxyReply<RefreshResult> = self
            .call(&self.config.refresh_endpoint, context, Map::new())
            .await?;
        map(reply, |r| {
            Ok(RefreshGrant {
                expired: r.expired,
                expire_at: r.expire_at,
                info: r.info,
            })
        })
    }

    async fn subscribe(
        &self,
        context: &ProxyContext,
        channel: &str,
        data: Option<&Payload>,
    ) -> Result<ProxyReply<SubscribeGrant>, HeraldError> {
        let mut body = Map::new();
        body.insert("channel".into(), Value::String(channel.into()));
        put_data(&mut body, data);
        let reply: ProxyReply<SubscribeResult> = self
            .call(&self.config.subscribe_endpoint, context, body)
            .await?;
        map(reply, |r| Ok(SubscribeGrant { info: r.info }))
    }

    async fn publish(
        &self,
        context: &ProxyContext,
        channel: &str,
        data: &Payload,
    ) -> Result<ProxyReply<PublishGrant>, HeraldError> {
        let mut body = Map::new();
        body.insert("channel".into(), Value::String(channel.into()));
        put_data(&mut body, Some(data));
        let reply: ProxyReply<PublishResult> = self
            .call(&self.config.publish_endpoint, context, body)
            .await?;
        map(reply, |r| {
            Ok(PublishGrant {
                data: data_from(r.data, r.b64data)?,
                skip_history: r.skip_history,
            })
        })
    }

    async fn rpc(
        &self,
        context: &ProxyContext,
        method: &str,
        data: Option<&Payload>,
    ) -> Result<ProxyReply<RpcResult>, HeraldError> {
        let mut body = Map::new();
        body.insert("method".into(), Value::String(method.into()));
        put_data(&mut body, data);
        let reply: ProxyReply<RpcAnswer> =
            self.call(&self.config.rpc_endpoint, context, body).await?;
        map(reply, |r| {
            Ok(RpcResult {
                data: data_from(r.data, r.b64data)?,
            })
        })
    }
}
