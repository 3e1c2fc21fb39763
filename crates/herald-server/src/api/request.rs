//! Typed requests and results of the server API: [`Request`] (one variant per method, its
//! parameters decoded) and [`Reply`] (the method's result). Adapters build a [`Request`] from
//! their wire format — [`Request::from_json`] for the HTTP API and `batch` commands, the gRPC
//! adapter from Protobuf messages — and encode a [`Reply`] back; a [`Reply`] serializes to
//! exactly the JSON result object of the HTTP API.
//!
//! May touch: nothing; types and decoding only.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::Method;
use super::types::*;
use crate::push::api::{PushReply, PushRequest};
use crate::webhook::api::{WebhookReply, WebhookRequest};

/// A server API call, decoded.
#[derive(Debug)]
pub enum Request {
    Publish(PublishParams),
    Broadcast(BroadcastParams),
    History(HistoryParams),
    HistoryRemove(ChannelParams),
    Presence(ChannelParams),
    PresenceStats(ChannelParams),
    Channels(ChannelsParams),
    Info(EmptyParams),
    Disconnect(DisconnectParams),
    Unsubscribe(UnsubscribeParams),
    RevokeToken(RevokeTokenParams),
    InvalidateUserTokens(InvalidateUserTokensParams),
    Batch(BatchRequest),
    Push(Method, PushRequest),
    Webhook(Method, WebhookRequest),
}

/// `batch`: commands decoded one by one, so that one malformed command is that command's
/// error and not the whole batch's.
#[derive(Debug)]
pub struct BatchRequest {
    pub commands: Vec<BatchCommand>,
    pub parallel: bool,
}

/// One command of a batch: the method it names (when it names a known one) and its request,
/// or why it could not be decoded.
#[derive(Debug)]
pub struct BatchCommand {
    pub method: Option<Method>,
    pub request: Result<Request, herald_core::error::HeraldError>,
}

/// A method's result.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Empty(EmptyResult),
    Publish(PublishResult),
    Broadcast(BroadcastResult),
    History(HistoryResult),
    Presence(PresenceResult),
    PresenceStats(PresenceStatsResult),
    Channels(ChannelsResult),
    Info(InfoResult),
    Batch(BatchResult),
    Push(PushReply),
    Webhook(WebhookReply),
}

/// `batch`'s result: one reply per command, in order.
#[derive(Debug)]
pub struct BatchResult {
    pub replies: Vec<Result<(Method, Reply), herald_core::error::HeraldError>>,
}

impl Request {
    /// The method this request calls.
    pub fn method(&self) -> Method {
        match self {
            Self::Publish(_) => Method::Publish,
            Self::Broadcast(_) => Method::Broadcast,
            Self::History(_) => Method::History,
            Self::HistoryRemove(_) => Method::HistoryRemove,
            Self::Presence(_) => Method::Presence,
            Self::PresenceStats(_) => Method::PresenceStats,
            Self::Channels(_) => Method::Channels,
            Self::Info(_) => Method::Info,
            Self::Disconnect(_) => Method::Disconnect,
            Self::Unsubscribe(_) => Method::Unsubscribe,
            Self::RevokeToken(_) => Method::RevokeToken,
            Self::InvalidateUserTokens(_) => Method::InvalidateUserTokens,
            Self::Batch(_) => Method::Batch,
            Self::Push(method, _) | Self::Webhook(method, _) => *method,
        }
    }

    /// Decodes `method`'s JSON parameters (the HTTP API's body, a batch command's value).
    /// Unknown fields are refused (see [`super::types`]); a `batch` inside a batch is not a
    /// method.
    pub fn from_json(method: Method, params: &RawValue) -> Result<Self, serde_json::Error> {
        use crate::push::api::PushRequest as P;
        use crate::webhook::api::WebhookRequest as W;
        let push = |request| Self::Push(method, request);
        let webhook = |request| Self::Webhook(method, request);
        Ok(match method {
            Method::Publish => Self::Publish(parse(params)?),
            Method::Broadcast => Self::Broadcast(parse(params)?),
            Method::History => Self::History(parse(params)?),
            Method::HistoryRemove => Self::HistoryRemove(parse(params)?),
            Method::Presence => Self::Presence(parse(params)?),
            Method::PresenceStats => Self::PresenceStats(parse(params)?),
            Method::Channels => Self::Channels(parse(params)?),
            Method::Info => Self::Info(parse(params)?),
            Method::Disconnect => Self::Disconnect(parse(params)?),
            Method::Unsubscribe => Self::Unsubscribe(parse(params)?),
            Method::RevokeToken => Self::RevokeToken(parse(params)?),
            Method::InvalidateUserTokens => Self::InvalidateUserTokens(parse(params)?),
            Method::Batch => Self::Batch(batch_from_json(params)?),
            Method::DeviceRegister => push(P::DeviceRegister(parse(params)?)),
            Method::DeviceUpdate => push(P::DeviceUpdate(parse(params)?)),
            Method::DeviceRemove => push(P::DeviceRemove(parse(params)?)),
            Method::DeviceList => push(P::DeviceList(parse(params)?)),
            Method::DeviceTopicList => push(P::DeviceTopicList(parse(params)?)),
            Method::DeviceTopicUpdate => push(P::DeviceTopicUpdate(parse(params)?)),
            Method::UserTopicList => push(P::UserTopicList(parse(params)?)),
            Method::UserTopicUpdate => push(P::UserTopicUpdate(parse(params)?)),
            Method::SendPushNotification => push(P::SendPushNotification(parse(params)?)),
            Method::CancelPush => push(P::CancelPush(parse(params)?)),
            Method::UpdatePushStatus => push(P::UpdatePushStatus(parse(params)?)),
            Method::PushStatus => push(P::PushStatus(parse(params)?)),
            Method::DeviceRemovals => push(P::DeviceRemovals(parse(params)?)),
            Method::WebhookEndpointCreate => webhook(W::EndpointCreate(parse(params)?)),
            Method::WebhookEndpointUpdate => webhook(W::EndpointUpdate(parse(params)?)),
            Method::WebhookEndpointDelete => webhook(W::EndpointDelete(parse(params)?)),
            Method::WebhookEndpointList => webhook(W::EndpointList(parse(params)?)),
            Method::WebhookDeliveries => webhook(W::Deliveries(parse(params)?)),
            Method::WebhookAttempts => webhook(W::Attempts(parse(params)?)),
            Method::WebhookReplay => webhook(W::Replay(parse(params)?)),
        })
    }
}

fn parse<T: DeserializeOwned>(params: &RawValue) -> Result<T, serde_json::Error> {
    serde_json::from_str(params.get())
}

/// `{"commands": [{"<method>": {...}}, ...], "parallel": bool}`: the outer shape must parse;
/// each command is decoded on its own.
fn batch_from_json(params: &RawValue) -> Result<BatchRequest, serde_json::Error> {
    let params: BatchParams = parse(params)?;
    let commands = params
        .commands
        .into_iter()
        .map(|command| {
            let mut entries = command.into_iter();
            match (entries.next(), entries.next()) {
                (Some((name, params)), None) => {
                    match Method::from_name(&name).filter(|m| *m != Method::Batch) {
                        Some(method) => BatchCommand {
                            method: Some(method),
                            request: Request::from_json(method, &params)
                                .map_err(|e| super::malformed(&e).error),
                        },
                        None => BatchCommand {
                            method: None,
                            request: Err(super::unknown_method(&name).error),
                        },
                    }
                }
                _ => BatchCommand {
                    method: None,
                    request: Err(herald_core::error::HeraldError::bad_request(
                        "each batch command is an object with exactly one method key",
                    )),
                },
            }
        })
        .collect();
    Ok(BatchRequest {
        commands,
        parallel: params.parallel,
    })
}
