//! One function per server API method, shared by the single-method endpoints and `batch`.
//! Each decodes its parameters, calls the node facade and encodes its result.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use herald_core::PublishRequest;
use herald_core::error::{ErrorCode, HeraldError};
use herald_core::node::Node;
use herald_core::publication::StreamPosition;
use herald_core::store::HistoryQuery;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::ApiError;
use super::types::*;
use crate::app::AppState;
use crate::cluster::{ControlCommand, apply_everywhere, disconnect_reason};

const METHODS: &[&str] = &[
    "revoke_token",
    "invalidate_user_tokens",
    "disconnect",
    "unsubscribe",
    "publish",
    "broadcast",
    "history",
    "history_remove",
    "presence",
    "presence_stats",
    "channels",
    "info",
];

pub fn is_known(method: &str) -> bool {
    METHODS.contains(&method)
        || crate::push::api::is_method(method)
        || crate::webhook::api::is_method(method)
}

fn parse<T: DeserializeOwned>(params: &RawValue) -> Result<T, ApiError> {
    serde_json::from_str(params.get()).map_err(|e| ApiError::bad_json(&e))
}

fn encode<T: Serialize>(value: &T) -> Result<Box<RawValue>, ApiError> {
    serde_json::value::to_raw_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    })
}

fn node_err(error: HeraldError) -> ApiError {
    ApiError::from_node(error)
}

/// How long a revocation is remembered without `expire_at`: a day (set `expire_at` to the
/// latest `exp` of the tokens concerned when they live longer).
const DEFAULT_REVOCATION_SECS: u64 = 24 * 3600;

fn require_user(user: &str) -> Result<(), ApiError> {
    if user.is_empty() {
        return Err(node_err(HeraldError::bad_request("user is required")));
    }
    Ok(())
}

fn require_channel(channel: &str) -> Result<(), ApiError> {
    if channel.is_empty() {
        return Err(node_err(HeraldError::bad_request("channel is required")));
    }
    Ok(())
}

/// A `push` section needs push notifications on: say so rather than ignore it.
fn require_push_if_asked(state: &AppState, asked: bool) -> Result<(), ApiError> {
    if asked && state.push.is_none() {
        return Err(node_err(crate::push::api::not_enabled()));
    }
    Ok(())
}

/// Runs `method` with `params`; the result is the method's result object.
pub async fn call(
    state: &AppState,
    method: &str,
    params: &RawValue,
) -> Result<Box<RawValue>, ApiError> {
    let node = &state.node;
    match method {
        "disconnect" => {
            let params: DisconnectParams = parse(params)?;
            require_user(&params.user)?;
            let code = params.disconnect.map(|d| d.code);
            let reason = disconnect_reason(code).map_err(node_err)?;
            let command = ControlCommand::Disconnect {
                user: params.user,
                client: params.client,
                whitelist: params.whitelist,
                code: reason.code,
            };
            apply_everywhere(state, command).await.map_err(node_err)?;
            encode(&EmptyResult {})
        }
        "revoke_token" => {
            let params: RevokeTokenParams = parse(params)?;
            if params.uid.is_empty() {
                return Err(node_err(HeraldError::bad_request(
                    "uid (the token's jti) is required",
                )));
            }
            let now = herald_core::time::now_ms() / 1000;
            let until = params.expire_at.unwrap_or(now + DEFAULT_REVOCATION_SECS);
            let command = ControlCommand::RevokeToken {
                uid: params.uid,
                until,
            };
            apply_everywhere(state, command).await.map_err(node_err)?;
            encode(&EmptyResult {})
        }
        "invalidate_user_tokens" => {
            let params: InvalidateUserTokensParams = parse(params)?;
            require_user(&params.user)?;
            let now = herald_core::time::now_ms() / 1000;
            let command = ControlCommand::InvalidateUser {
                user: params.user,
                before: params.issued_before.unwrap_or(now),
                until: params.expire_at.unwrap_or(now + DEFAULT_REVOCATION_SECS),
            };
            apply_everywhere(state, command).await.map_err(node_err)?;
            encode(&EmptyResult {})
        }
        "unsubscribe" => {
            let params: UnsubscribeParams = parse(params)?;
            require_user(&params.user)?;
            require_channel(&params.channel)?;
            // An unknown channel is the caller's mistake: say so rather than doing nothing.
            node.resolve(&params.channel).map_err(node_err)?;
            let command = ControlCommand::Unsubscribe {
                user: params.user,
                client: params.client,
                channel: params.channel,
            };
            apply_everywhere(state, command).await.map_err(node_err)?;
            encode(&EmptyResult {})
        }
        "publish" => {
            let params: PublishParams = parse(params)?;
            require_push_if_asked(state, params.push.is_some())?;
            publish(node, params).await
        }
        "broadcast" => {
            let params: BroadcastParams = parse(params)?;
            require_push_if_asked(state, params.push.is_some())?;
            broadcast(node, params).await
        }
        "history" => history(node, parse(params)?).await,
        "history_remove" => {
            let params: ChannelParams = parse(params)?;
            require_channel(&params.channel)?;
            node.remove_history(&params.channel)
                .await
                .map_err(node_err)?;
            encode(&EmptyResult {})
        }
        "presence" => {
            let params: ChannelParams = parse(params)?;
            require_channel(&params.channel)?;
            let presence = node.presence(&params.channel).await.map_err(node_err)?;
            encode(&PresenceResult { presence })
        }
        "presence_stats" => {
            let params: ChannelParams = parse(params)?;
            require_channel(&params.channel)?;
            let stats = node
                .presence_stats(&params.channel)
                .await
                .map_err(node_err)?;
            encode(&PresenceStatsResult::from(stats))
        }
        "channels" => {
            let params: ChannelsParams = parse(params)?;
            let pattern = params.pattern.as_deref();
            #[allow(unused_mut)]
            let mut counts = crate::cluster::channel_counts(state, pattern);
            #[cfg(feature = "redis")]
            if let Some(cluster) = &state.cluster {
                counts = cluster.channels(state, pattern).await.map_err(node_err)?;
            }
            let channels: BTreeMap<String, ChannelInfo> = counts
                .into_iter()
                .map(|(name, num_clients)| (name, ChannelInfo { num_clients }))
                .collect();
            encode(&ChannelsResult { channels })
        }
        "info" => {
            let _: EmptyParams = parse(params)?;
            let mut result = NodeResult::from(node.info());
            result.num_clients = state
                .realtime
                .connections
                .load(std::sync::atomic::Ordering::Relaxed);
            result.num_users = state.realtime.sessions.user_count() as u64;
            #[allow(unused_mut)]
            let mut nodes = vec![result];
            #[cfg(feature = "redis")]
            if let Some(cluster) = &state.cluster {
                nodes = cluster
                    .nodes(state)
                    .await
                    .into_iter()
                    .map(NodeResult::from)
                    .collect();
            }
            encode(&InfoResult { nodes })
        }
        push if crate::push::api::is_method(push) => {
            crate::push::api::call(state, push, params).await
        }
        webhook if crate::webhook::api::is_method(webhook) => {
            crate::webhook::api::call(state, webhook, params).await
        }
        other => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::MethodNotFound,
            format!("no API method {other:?}"),
        )),
    }
}

/// Decodes `data`/`b64data` and applies the publication size limit (413 when over it).
fn checked_payload(
    node: &Node,
    data: Option<Box<RawValue>>,
    b64data: Option<String>,
) -> Result<herald_core::Payload, ApiError> {
    let payload = payload(data, b64data).map_err(|e| node_err(HeraldError::bad_request(e)))?;
    let limit = node.config().max_publication_size;
    if payload.len() > limit {
        return Err(ApiError::payload_too_large(payload.len(), limit));
    }
    Ok(payload)
}

async fn publish(node: &Node, params: PublishParams) -> Result<Box<RawValue>, ApiError> {
    require_channel(&params.channel)?;
    let data = checked_payload(node, params.data, params.b64data)?;
    let request = PublishRequest {
        channel: params.channel,
        data,
        tags: params.tags,
        skip_history: params.skip_history,
        idempotency_key: params.idempotency_key.filter(|k| !k.is_empty()),
        info: None,
        push: params.push.map(std::sync::Arc::new),
    };
    let result = node.publish(request).await.map_err(node_err)?;
    encode(&PublishResult::from(result))
}

#[derive(Serialize)]
struct BroadcastReply {
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<PublishResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<super::ErrorBody>,
}

#[derive(Serialize)]
struct BroadcastResult {
    responses: Vec<BroadcastReply>,
}

/// Most channels in one broadcast.
pub const MAX_BROADCAST_CHANNELS: usize = 10_000;

async fn broadcast(node: &Node, params: BroadcastParams) -> Result<Box<RawValue>, ApiError> {
    if params.channels.is_empty() {
        return Err(node_err(HeraldError::bad_request("channels is required")));
    }
    if params.channels.len() > MAX_BROADCAST_CHANNELS {
        return Err(node_err(HeraldError::new(
            ErrorCode::LimitExceeded,
            format!("a broadcast reaches at most {MAX_BROADCAST_CHANNELS} channels"),
        )));
    }
    let data = checked_payload(node, params.data, params.b64data)?;
    let idempotency_key = params.idempotency_key.filter(|k| !k.is_empty());
    let push = params.push.map(std::sync::Arc::new);
    let publishes = params.channels.into_iter().map(|channel| {
        let request = PublishRequest {
            channel,
            data: data.clone(),
            tags: params.tags.clone(),
            skip_history: params.skip_history,
            idempotency_key: idempotency_key.clone(),
            info: None,
            push: push.clone(),
        };
        async move {
            if request.channel.is_empty() {
                return Err(HeraldError::bad_request("channel is required"));
            }
            node.publish(request).await
        }
    });
    let responses = futures::future::join_all(publishes)
        .await
        .into_iter()
        .map(|outcome| match outcome {
            Ok(result) => BroadcastReply {
                result: Some(PublishResult::from(result)),
                error: None,
            },
            Err(err) => BroadcastReply {
                result: None,
                error: Some(super::ErrorBody::from(&err)),
            },
        })
        .collect();
    encode(&BroadcastResult { responses })
}

/// Most publications returned by one history call.
pub const MAX_HISTORY_LIMIT: usize = 10_000;

async fn history(node: &Node, params: HistoryParams) -> Result<Box<RawValue>, ApiError> {
    require_channel(&params.channel)?;
    let limit = match usize::try_from(params.limit) {
        Ok(n) => Some(n.min(MAX_HISTORY_LIMIT)),
        Err(_) => Some(MAX_HISTORY_LIMIT),
    };
    let query = HistoryQuery {
        since: params.since.map(StreamPosition::from),
        limit,
        reverse: params.reverse,
    };
    let page = node
        .history(&params.channel, query)
        .await
        .map_err(node_err)?;
    encode(&HistoryResult {
        publications: page
            .publications
            .into_iter()
            .map(ApiPublication::from)
            .collect(),
        offset: page.position.offset,
        epoch: page.position.epoch,
    })
}
