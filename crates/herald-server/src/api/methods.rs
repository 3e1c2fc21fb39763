//! The core server API methods (publishing, history, presence, channels, info and the
//! control commands): one typed function per method, called by the layer in [`super`] for
//! every adapter. Each checks its parameters, calls the node facade (or applies a control
//! command on every node) and returns its typed result.
//!
//! May touch: the node facade and the cluster control commands, through the app state.

use std::collections::BTreeMap;

use super::request::Reply;
use super::types::*;
use super::{CallError, ErrorBody};
use crate::app::AppState;
use crate::cluster::{ControlCommand, apply_everywhere, disconnect_reason};
use herald_core::PublishRequest;
use herald_core::error::{ErrorCode, HeraldError};
use herald_core::node::Node;
use herald_core::publication::StreamPosition;
use herald_core::store::HistoryQuery;
use serde_json::value::RawValue;

/// How long a revocation is remembered without `expire_at`: a day (set `expire_at` to the
/// latest `exp` of the tokens concerned when they live longer).
const DEFAULT_REVOCATION_SECS: u64 = 24 * 3600;

fn require_user(user: &str) -> Result<(), HeraldError> {
    if user.is_empty() {
        return Err(HeraldError::bad_request("user is required"));
    }
    Ok(())
}

fn require_channel(channel: &str) -> Result<(), HeraldError> {
    if channel.is_empty() {
        return Err(HeraldError::bad_request("channel is required"));
    }
    Ok(())
}

/// A `push` section needs push notifications on: say so rather than ignore it.
fn require_push_if_asked(state: &AppState, asked: bool) -> Result<(), HeraldError> {
    if asked && state.push.is_none() {
        return Err(crate::push::api::not_enabled());
    }
    Ok(())
}

pub async fn disconnect(state: &AppState, params: DisconnectParams) -> Result<Reply, HeraldError> {
    require_user(&params.user)?;
    let (code, given) = match params.disconnect {
        Some(d) => (Some(d.code), d.reason),
        None => (None, String::new()),
    };
    let reason = disconnect_reason(code, &given)?;
    let command = ControlCommand::Disconnect {
        user: params.user,
        client: params.client,
        whitelist: params.whitelist,
        code: reason.code,
        reason: given,
    };
    apply_everywhere(state, command).await?;
    Ok(Reply::Empty(EmptyResult {}))
}

pub async fn revoke_token(
    state: &AppState,
    params: RevokeTokenParams,
) -> Result<Reply, HeraldError> {
    if params.uid.is_empty() {
        return Err(HeraldError::bad_request(
            "uid (the token's jti) is required",
        ));
    }
    let now = herald_core::time::now_ms() / 1000;
    let until = params.expire_at.unwrap_or(now + DEFAULT_REVOCATION_SECS);
    let command = ControlCommand::RevokeToken {
        uid: params.uid,
        until,
    };
    apply_everywhere(state, command).await?;
    Ok(Reply::Empty(EmptyResult {}))
}

pub async fn invalidate_user_tokens(
    state: &AppState,
    params: InvalidateUserTokensParams,
) -> Result<Reply, HeraldError> {
    require_user(&params.user)?;
    let now = herald_core::time::now_ms() / 1000;
    let command = ControlCommand::InvalidateUser {
        user: params.user,
        before: params.issued_before.unwrap_or(now),
        until: params.expire_at.unwrap_or(now + DEFAULT_REVOCATION_SECS),
    };
    apply_everywhere(state, command).await?;
    Ok(Reply::Empty(EmptyResult {}))
}

pub async fn unsubscribe(
    state: &AppState,
    params: UnsubscribeParams,
) -> Result<Reply, HeraldError> {
    require_user(&params.user)?;
    require_channel(&params.channel)?;
    // An unknown channel is the caller's mistake: say so rather than doing nothing.
    state.node.resolve(&params.channel)?;
    let command = ControlCommand::Unsubscribe {
        user: params.user,
        client: params.client,
        channel: params.channel,
    };
    apply_everywhere(state, command).await?;
    Ok(Reply::Empty(EmptyResult {}))
}

pub async fn history_remove(state: &AppState, params: ChannelParams) -> Result<Reply, HeraldError> {
    require_channel(&params.channel)?;
    state.node.remove_history(&params.channel).await?;
    Ok(Reply::Empty(EmptyResult {}))
}

pub async fn presence(state: &AppState, params: ChannelParams) -> Result<Reply, HeraldError> {
    require_channel(&params.channel)?;
    let presence = state.node.presence(&params.channel).await?;
    Ok(Reply::Presence(PresenceResult { presence }))
}

pub async fn presence_stats(state: &AppState, params: ChannelParams) -> Result<Reply, HeraldError> {
    require_channel(&params.channel)?;
    let stats = state.node.presence_stats(&params.channel).await?;
    Ok(Reply::PresenceStats(PresenceStatsResult::from(stats)))
}

pub async fn channels(state: &AppState, params: ChannelsParams) -> Result<Reply, HeraldError> {
    let pattern = params.pattern.as_deref();
    #[allow(unused_mut)]
    let mut counts = crate::cluster::channel_counts(state, pattern);
    #[cfg(feature = "redis")]
    if let Some(cluster) = &state.cluster {
        counts = cluster.channels(state, pattern).await?;
    }
    let channels: BTreeMap<String, ChannelInfo> = counts
        .into_iter()
        .map(|(name, num_clients)| (name, ChannelInfo { num_clients }))
        .collect();
    Ok(Reply::Channels(ChannelsResult { channels }))
}

pub async fn info(state: &AppState) -> Result<Reply, HeraldError> {
    let mut result = NodeResult::from(state.node.info());
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
    Ok(Reply::Info(InfoResult { nodes }))
}

/// Decodes `data`/`b64data` and applies the publication size limit (a
/// [`Fault::TooLarge`](super::Fault::TooLarge) when over it).
fn checked_payload(
    node: &Node,
    data: Option<Box<RawValue>>,
    b64data: Option<String>,
) -> Result<herald_core::Payload, CallError> {
    let payload = payload(data, b64data).map_err(HeraldError::bad_request)?;
    let limit = node.config().max_publication_size;
    if payload.len() > limit {
        return Err(CallError::too_large(format!(
            "publication data is {} bytes; the limit is {limit}",
            payload.len()
        )));
    }
    Ok(payload)
}

pub async fn publish(state: &AppState, params: PublishParams) -> Result<Reply, CallError> {
    require_push_if_asked(state, params.push.is_some())?;
    require_channel(&params.channel)?;
    let node = &state.node;
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
    let result = node.publish(request).await?;
    Ok(Reply::Publish(PublishResult::from(result)))
}

/// Most channels in one broadcast.
pub const MAX_BROADCAST_CHANNELS: usize = 10_000;

pub async fn broadcast(state: &AppState, params: BroadcastParams) -> Result<Reply, CallError> {
    require_push_if_asked(state, params.push.is_some())?;
    if params.channels.is_empty() {
        return Err(HeraldError::bad_request("channels is required").into());
    }
    if params.channels.len() > MAX_BROADCAST_CHANNELS {
        return Err(HeraldError::new(
            ErrorCode::LimitExceeded,
            format!("a broadcast reaches at most {MAX_BROADCAST_CHANNELS} channels"),
        )
        .into());
    }
    let node = &state.node;
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
                error: Some(ErrorBody::from(&err)),
            },
        })
        .collect();
    Ok(Reply::Broadcast(BroadcastResult { responses }))
}

/// Most publications returned by one history call.
pub const MAX_HISTORY_LIMIT: usize = 10_000;

pub async fn history(state: &AppState, params: HistoryParams) -> Result<Reply, HeraldError> {
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
    let page = state.node.history(&params.channel, query).await?;
    Ok(Reply::History(HistoryResult {
        publications: page.publications,
        offset: page.position.offset,
        epoch: page.position.epoch,
    }))
}
