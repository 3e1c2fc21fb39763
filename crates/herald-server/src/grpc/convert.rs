//! Protobuf ↔ the typed API layer: each `CentrifugoApi` request message becomes a typed
//! [`Request`], and a [`Reply`] (or an error) becomes the proto `Reply` that both the unary
//! responses and `Batch` replies are cut from. JSON carried in `bytes` fields (`data`, FCM
//! messages, APNs payloads) must be valid JSON, as in the HTTP API; options Herald does not
//! have are refused with error 107 rather than ignored.
//!
//! May touch: nothing; pure conversions.

use std::collections::BTreeMap;

use herald_core::error::{ErrorCode, HeraldError};
use herald_core::publication::{ClientInfo, Publication};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::proto as pb;
use crate::api::types::*;
use crate::api::{BatchCommand, CallError, Fault, Method, Reply, Request};
use crate::push::api as push;
use crate::push::api::{PushReply, PushRequest as P};

fn unsupported(field: &str) -> CallError {
    HeraldError::bad_request(format!("{field} is not supported by Herald")).into()
}

pub(super) fn invalid(detail: impl Into<String>) -> CallError {
    CallError::new(Fault::Malformed, ErrorCode::BadRequest, detail)
}

fn non_empty(value: String) -> Option<String> {
    Some(value).filter(|v| !v.is_empty())
}

/// JSON carried in a `bytes` field; empty bytes are "absent".
fn json_bytes(bytes: Vec<u8>, field: &str) -> Result<Option<Box<RawValue>>, CallError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| invalid(format!("{field} is not UTF-8 JSON (binary data: b64data)")))?;
    RawValue::from_string(text)
        .map(Some)
        .map_err(|e| invalid(format!("{field} is not valid JSON: {e}")))
}

fn json_value(bytes: Vec<u8>, field: &str) -> Result<Option<Value>, CallError> {
    match json_bytes(bytes, field)? {
        Some(raw) => serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|e| invalid(format!("{field} is not valid JSON: {e}"))),
        None => Ok(None),
    }
}

/// Unix seconds in an `int64`: 0 is "not set"; negative is refused.
fn unix_seconds(value: i64, field: &str) -> Result<Option<u64>, CallError> {
    match value {
        0 => Ok(None),
        v => u64::try_from(v)
            .map(Some)
            .map_err(|_| invalid(format!("{field} must not be negative"))),
    }
}

pub(super) fn page_limit(limit: i32) -> Result<u64, CallError> {
    u64::try_from(limit).map_err(|_| invalid("limit must not be negative"))
}

fn no_versioning(version: u64, epoch: &str) -> Result<(), CallError> {
    if version != 0 || !epoch.is_empty() {
        return Err(unsupported("version / version_epoch"));
    }
    Ok(())
}

pub fn publish(p: pb::PublishRequest) -> Result<Request, CallError> {
    no_versioning(p.version, &p.version_epoch)?;
    Ok(Request::Publish(PublishParams {
        channel: p.channel,
        data: json_bytes(p.data, "data")?,
        b64data: non_empty(p.b64data),
        skip_history: p.skip_history,
        tags: p.tags,
        idempotency_key: non_empty(p.idempotency_key),
        delta: p.delta,
        push: None,
    }))
}

pub fn broadcast(p: pb::BroadcastRequest) -> Result<Request, CallError> {
    no_versioning(p.version, &p.version_epoch)?;
    Ok(Request::Broadcast(BroadcastParams {
        channels: p.channels,
        data: json_bytes(p.data, "data")?,
        b64data: non_empty(p.b64data),
        skip_history: p.skip_history,
        tags: p.tags,
        idempotency_key: non_empty(p.idempotency_key),
        delta: p.delta,
        push: None,
    }))
}

pub fn unsubscribe(p: pb::UnsubscribeRequest) -> Result<Request, CallError> {
    if !p.session.is_empty() {
        return Err(unsupported("session"));
    }
    Ok(Request::Unsubscribe(UnsubscribeParams {
        user: p.user,
        channel: p.channel,
        client: non_empty(p.client),
    }))
}

pub fn disconnect(p: pb::DisconnectRequest) -> Result<Request, CallError> {
    if !p.session.is_empty() {
        return Err(unsupported("session"));
    }
    let disconnect = match p.disconnect {
        Some(d) => Some(DisconnectCode {
            code: u16::try_from(d.code)
                .map_err(|_| invalid(format!("disconnect code {} is out of range", d.code)))?,
            reason: d.reason,
        }),
        None => None,
    };
    Ok(Request::Disconnect(DisconnectParams {
        user: p.user,
        client: non_empty(p.client),
        whitelist: p.whitelist,
        disconnect,
    }))
}

pub fn presence(p: pb::PresenceRequest) -> Result<Request, CallError> {
    Ok(Request::Presence(ChannelParams { channel: p.channel }))
}

pub fn presence_stats(p: pb::PresenceStatsRequest) -> Result<Request, CallError> {
    Ok(Request::PresenceStats(ChannelParams { channel: p.channel }))
}

pub fn history(p: pb::HistoryRequest) -> Result<Request, CallError> {
    Ok(Request::History(HistoryParams {
        channel: p.channel,
        limit: i64::from(p.limit),
        since: p.since.map(|s| SincePosition {
            offset: s.offset,
            epoch: s.epoch,
        }),
        reverse: p.reverse,
    }))
}

pub fn history_remove(p: pb::HistoryRemoveRequest) -> Result<Request, CallError> {
    Ok(Request::HistoryRemove(ChannelParams { channel: p.channel }))
}

pub fn info(_: pb::InfoRequest) -> Result<Request, CallError> {
    Ok(Request::Info(EmptyParams {}))
}

pub fn channels(p: pb::ChannelsRequest) -> Result<Request, CallError> {
    Ok(Request::Channels(ChannelsParams {
        pattern: non_empty(p.pattern),
    }))
}

pub fn revoke_token(p: pb::RevokeTokenRequest) -> Result<Request, CallError> {
    Ok(Request::RevokeToken(RevokeTokenParams {
        uid: p.uid,
        expire_at: unix_seconds(p.expire_at, "expire_at")?,
    }))
}

pub fn invalidate_user_tokens(p: pb::InvalidateUserTokensRequest) -> Result<Request, CallError> {
    if !p.channel.is_empty() {
        return Err(unsupported("channel"));
    }
    Ok(Request::InvalidateUserTokens(InvalidateUserTokensParams {
        user: p.user,
        issued_before: unix_seconds(p.issued_before, "issued_before")?,
        expire_at: unix_seconds(p.expire_at, "expire_at")?,
    }))
}

fn push_request(method: Method, request: P) -> Result<Request, CallError> {
    Ok(Request::Push(method, request))
}

pub fn device_register(p: pb::DeviceRegisterRequest) -> Result<Request, CallError> {
    push_request(
        Method::DeviceRegister,
        P::DeviceRegister(push::RegisterParams {
            id: non_empty(p.id),
            provider: p.provider,
            token: p.token,
            platform: p.platform,
            user: non_empty(p.user),
            app: None,
            timezone: non_empty(p.timezone),
            locale: non_empty(p.locale),
            meta: Some(p.meta),
            topics: Some(p.topics),
        }),
    )
}

pub fn device_update(p: pb::DeviceUpdateRequest) -> Result<Request, CallError> {
    push_request(
        Method::DeviceUpdate,
        P::DeviceUpdate(push::UpdateParams {
            ids: p.ids,
            users: p.users,
            user_update: p.user_update.map(|u| push::UserUpdate { user: u.user }),
            timezone_update: p.timezone_update.map(|u| push::TimezoneUpdate {
                timezone: u.timezone,
            }),
            locale_update: p
                .locale_update
                .map(|u| push::LocaleUpdate { locale: u.locale }),
            meta_update: p.meta_update.map(|u| push::MetaUpdate { meta: u.meta }),
            topics_update: p.topics_update.map(|u| push::TopicsUpdate {
                op: u.op,
                topics: u.topics,
            }),
        }),
    )
}

pub fn device_remove(p: pb::DeviceRemoveRequest) -> Result<Request, CallError> {
    push_request(
        Method::DeviceRemove,
        P::DeviceRemove(push::RemoveParams {
            ids: p.ids,
            users: p.users,
        }),
    )
}

pub fn device_list(p: pb::DeviceListRequest) -> Result<Request, CallError> {
    push_request(
        Method::DeviceList,
        P::DeviceList(push::ListParams {
            filter: p.filter.map(|f| push::FilterParams {
                ids: f.ids,
                users: f.users,
                topics: f.topics,
                providers: f.providers,
                platforms: f.platforms,
            }),
            include_total_count: p.include_total_count,
            include_meta: p.include_meta,
            include_topics: p.include_topics,
            cursor: p.cursor,
            limit: page_limit(p.limit)?,
        }),
    )
}

pub fn device_topic_list(p: pb::DeviceTopicListRequest) -> Result<Request, CallError> {
    push_request(
        Method::DeviceTopicList,
        P::DeviceTopicList(push::DeviceTopicListParams {
            filter: p.filter.map(|f| push::DeviceTopicFilterParams {
                device_ids: f.device_ids,
                device_providers: f.device_providers,
                device_platforms: f.device_platforms,
                device_users: f.device_users,
                topics: f.topics,
                topic_prefix: f.topic_prefix,
            }),
            include_total_count: p.include_total_count,
            include_device: p.include_device,
            cursor: p.cursor,
            limit: page_limit(p.limit)?,
        }),
    )
}

pub fn device_topic_update(p: pb::DeviceTopicUpdateRequest) -> Result<Request, CallError> {
    push_request(
        Method::DeviceTopicUpdate,
        P::DeviceTopicUpdate(push::DeviceTopicUpdateParams {
            device_id: p.device_id,
            op: p.op,
            topics: p.topics,
        }),
    )
}

pub fn user_topic_list(p: pb::UserTopicListRequest) -> Result<Request, CallError> {
    push_request(
        Method::UserTopicList,
        P::UserTopicList(push::UserTopicListParams {
            filter: p.filter.map(|f| push::UserTopicFilterParams {
                users: f.users,
                topics: f.topics,
                topic_prefix: f.topic_prefix,
            }),
            include_total_count: p.include_total_count,
            cursor: p.cursor,
            limit: page_limit(p.limit)?,
        }),
    )
}

pub fn user_topic_update(p: pb::UserTopicUpdateRequest) -> Result<Request, CallError> {
    push_request(
        Method::UserTopicUpdate,
        P::UserTopicUpdate(push::UserTopicUpdateParams {
            user: p.user,
            op: p.op,
            topics: p.topics,
        }),
    )
}

pub fn update_push_status(p: pb::UpdatePushStatusRequest) -> Result<Request, CallError> {
    push_request(
        Method::UpdatePushStatus,
        P::UpdatePushStatus(push::PushStatusUpdate {
            analytics_uid: p.analytics_uid,
            status: p.status,
            device_id: p.device_id,
            msg_id: non_empty(p.msg_id),
        }),
    )
}

pub fn cancel_push(p: pb::CancelPushRequest) -> Result<Request, CallError> {
    push_request(
        Method::CancelPush,
        P::CancelPush(push::CancelParams { uid: p.uid }),
    )
}

/// Sets `key` when `value` is not the Protobuf default.
fn put(map: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(n) => n.as_i64() == Some(0),
    };
    if !empty {
        map.insert(key.to_owned(), value);
    }
}

/// The request as the HTTP API's JSON, decoded by the same [`herald_outbound::push::SendPush`]
/// rules (one validation for both adapters).
pub fn send_push_notification(p: pb::SendPushNotificationRequest) -> Result<Request, CallError> {
    let mut recipient = Map::new();
    if let Some(r) = p.recipient {
        if let Some(f) = r.filter {
            recipient.insert(
                "filter".into(),
                json!({"ids": f.ids, "users": f.users, "topics": f.topics,
                       "providers": f.providers, "platforms": f.platforms}),
            );
        }
        put(&mut recipient, "fcm_tokens", json!(r.fcm_tokens));
        put(&mut recipient, "fcm_topic", json!(r.fcm_topic));
        put(&mut recipient, "fcm_condition", json!(r.fcm_condition));
        put(&mut recipient, "hms_tokens", json!(r.hms_tokens));
        put(&mut recipient, "hms_topic", json!(r.hms_topic));
        put(&mut recipient, "hms_condition", json!(r.hms_condition));
        put(&mut recipient, "apns_tokens", json!(r.apns_tokens));
    }
    let mut notification = Map::new();
    if let Some(n) = p.notification {
        if let Some(fcm) = n.fcm {
            let message = json_value(fcm.message, "notification.fcm.message")?;
            notification.insert("fcm".into(), json!({ "message": message }));
        }
        if let Some(hms) = n.hms {
            let message = json_value(hms.message, "notification.hms.message")?;
            notification.insert("hms".into(), json!({ "message": message }));
        }
        if let Some(apns) = n.apns {
            let mut part = Map::new();
            put(&mut part, "headers", json!(apns.headers));
            if let Some(payload) = json_value(apns.payload, "notification.apns.payload")? {
                part.insert("payload".into(), payload);
            }
            notification.insert("apns".into(), Value::Object(part));
        }
        put(&mut notification, "expire_at", json!(n.expire_at));
    }
    let mut body = Map::new();
    body.insert("recipient".into(), Value::Object(recipient));
    body.insert("notification".into(), Value::Object(notification));
    put(&mut body, "uid", json!(p.uid));
    put(&mut body, "send_at", json!(p.send_at));
    put(
        &mut body,
        "optimize_for_reliability",
        json!(p.optimize_for_reliability),
    );
    put(&mut body, "analytics_uid", json!(p.analytics_uid));
    put(&mut body, "use_templating", json!(p.use_templating));
    put(&mut body, "use_meta", json!(p.use_meta));
    if !p.localizations.is_empty() {
        let localizations: BTreeMap<_, _> = p
            .localizations
            .into_iter()
            .map(|(lang, l)| (lang, json!({ "translations": l.translations })))
            .collect();
        body.insert("localizations".into(), json!(localizations));
    }
    if let Some(strategy) = p.limit_strategy {
        let mut limit = Map::new();
        if let Some(rate) = strategy.rate_limit {
            let policies: Vec<Value> = rate
                .policies
                .into_iter()
                .map(|p| json!({"rate": p.rate, "interval_ms": p.interval_ms}))
                .collect();
            let mut part = Map::new();
            put(&mut part, "key", json!(rate.key));
            part.insert("policies".into(), json!(policies));
            put(
                &mut part,
                "drop_if_rate_limited",
                json!(rate.drop_if_rate_limited),
            );
            limit.insert("rate_limit".into(), Value::Object(part));
        }
        if let Some(time) = strategy.time_limit {
            limit.insert(
                "time_limit".into(),
                json!({"send_after_time": time.send_after_time,
                       "send_before_time": time.send_before_time,
                       "no_tz_send_now": time.no_tz_send_now}),
            );
        }
        body.insert("limit_strategy".into(), Value::Object(limit));
    }
    let request =
        serde_json::from_value(Value::Object(body)).map_err(|e| invalid(e.to_string()))?;
    push_request(
        Method::SendPushNotification,
        P::SendPushNotification(request),
    )
}

/// A batch command: the one request field it sets, decoded (a decoding failure is that
/// command's error, after its method is admitted).
pub fn command(c: pb::Command) -> BatchCommand {
    let set: Vec<(Method, Result<Request, CallError>)> = [
        c.publish.map(|p| (Method::Publish, publish(p))),
        c.broadcast.map(|p| (Method::Broadcast, broadcast(p))),
        c.unsubscribe.map(|p| (Method::Unsubscribe, unsubscribe(p))),
        c.disconnect.map(|p| (Method::Disconnect, disconnect(p))),
        c.presence.map(|p| (Method::Presence, presence(p))),
        c.presence_stats
            .map(|p| (Method::PresenceStats, presence_stats(p))),
        c.history.map(|p| (Method::History, history(p))),
        c.history_remove
            .map(|p| (Method::HistoryRemove, history_remove(p))),
        c.info.map(|p| (Method::Info, info(p))),
        c.channels.map(|p| (Method::Channels, channels(p))),
        c.revoke_token
            .map(|p| (Method::RevokeToken, revoke_token(p))),
        c.invalidate_user_tokens
            .map(|p| (Method::InvalidateUserTokens, invalidate_user_tokens(p))),
        c.device_register
            .map(|p| (Method::DeviceRegister, device_register(p))),
        c.device_update
            .map(|p| (Method::DeviceUpdate, device_update(p))),
        c.device_remove
            .map(|p| (Method::DeviceRemove, device_remove(p))),
        c.device_list.map(|p| (Method::DeviceList, device_list(p))),
        c.device_topic_list
            .map(|p| (Method::DeviceTopicList, device_topic_list(p))),
        c.device_topic_update
            .map(|p| (Method::DeviceTopicUpdate, device_topic_update(p))),
        c.user_topic_list
            .map(|p| (Method::UserTopicList, user_topic_list(p))),
        c.user_topic_update
            .map(|p| (Method::UserTopicUpdate, user_topic_update(p))),
        c.send_push_notification
            .map(|p| (Method::SendPushNotification, send_push_notification(p))),
        c.update_push_status
            .map(|p| (Method::UpdatePushStatus, update_push_status(p))),
        c.cancel_push.map(|p| (Method::CancelPush, cancel_push(p))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let not_in_herald = c.subscribe.is_some()
        || c.rpc.is_some()
        || c.refresh.is_some()
        || c.connections.is_some()
        || c.update_user_status.is_some()
        || c.get_user_status.is_some()
        || c.delete_user_status.is_some()
        || c.block_user.is_some()
        || c.unblock_user.is_some();
    let mut set = set.into_iter();
    let (method, request) = match (set.next(), set.next(), not_in_herald) {
        (Some((method, request)), None, false) => (Some(method), request.map_err(|e| e.error)),
        (None, None, true) => (
            None,
            Err(HeraldError::new(
                ErrorCode::MethodNotFound,
                "this method is not available in Herald",
            )),
        ),
        _ => (
            None,
            Err(HeraldError::bad_request(
                "each batch command sets exactly one request",
            )),
        ),
    };
    BatchCommand { method, request }
}

// ---------------------------------------------------------------------------------------
// Results

/// The wire error: the HTTP API's code; message and detail in one string.
pub fn error(error: &HeraldError) -> pb::Error {
    let message = error.code.message();
    pb::Error {
        code: error.code.as_u32(),
        message: if error.detail.is_empty() {
            message.to_owned()
        } else {
            format!("{message}: {}", error.detail)
        },
    }
}

fn small(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

pub(super) fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn publish_result(r: PublishResult) -> pb::PublishResult {
    pb::PublishResult {
        offset: r.offset,
        epoch: r.epoch,
    }
}

/// Optional JSON (a client's `conn_info`, `chan_info`) as the bytes of a proto field.
pub(super) fn raw_bytes(raw: &Option<Box<RawValue>>) -> Vec<u8> {
    raw.as_ref()
        .map(|r| r.get().as_bytes().to_vec())
        .unwrap_or_default()
}

pub fn client_info(info: &ClientInfo) -> pb::ClientInfo {
    pb::ClientInfo {
        user: info.user.clone(),
        client: info.client.clone(),
        conn_info: raw_bytes(&info.conn_info),
        chan_info: raw_bytes(&info.chan_info),
    }
}

pub fn publication(p: Publication) -> pb::Publication {
    pb::Publication {
        data: p.data.bytes().to_vec(),
        info: p.info.as_deref().map(client_info),
        offset: p.offset,
        tags: p.tags,
    }
}

fn device(d: push::WireDevice) -> pb::Device {
    pb::Device {
        id: d.id,
        platform: d.platform.to_owned(),
        provider: d.provider.to_owned(),
        token: d.token,
        user: d.user,
        created_at: signed(d.created_at),
        updated_at: signed(d.updated_at),
        meta: d.meta.unwrap_or_default(),
        topics: d.topics.unwrap_or_default(),
        timezone: d.timezone,
        locale: d.locale,
    }
}

fn total(count: Option<u64>) -> i64 {
    count.map(signed).unwrap_or_default()
}

/// `method`'s outcome as a proto `Reply`: `error`, or the result field of the method.
pub fn reply(method: Method, outcome: Result<Reply, HeraldError>) -> pb::Reply {
    let mut out = pb::Reply::default();
    let reply = match outcome {
        Ok(reply) => reply,
        Err(e) => {
            out.error = Some(error(&e));
            return out;
        }
    };
    match (method, reply) {
        (_, Reply::Publish(r)) => out.publish = Some(publish_result(r)),
        (_, Reply::Broadcast(r)) => {
            out.broadcast = Some(pb::BroadcastResult {
                responses: r
                    .responses
                    .into_iter()
                    .map(|b| pb::PublishResponse {
                        error: b.error.map(|e| pb::Error {
                            code: e.code,
                            message: if e.detail.is_empty() {
                                e.message.to_owned()
                            } else {
                                format!("{}: {}", e.message, e.detail)
                            },
                        }),
                        result: b.result.map(publish_result),
                    })
                    .collect(),
            })
        }
        (_, Reply::History(r)) => {
            out.history = Some(pb::HistoryResult {
                publications: r.publications.into_iter().map(publication).collect(),
                epoch: r.epoch,
                offset: r.offset,
            })
        }
        (_, Reply::Presence(r)) => {
            out.presence = Some(pb::PresenceResult {
                presence: r
                    .presence
                    .iter()
                    .map(|(id, info)| (id.clone(), client_info(info)))
                    .collect(),
            })
        }
        (_, Reply::PresenceStats(r)) => {
            out.presence_stats = Some(pb::PresenceStatsResult {
                num_clients: small(r.num_clients),
                num_users: small(r.num_users),
            })
        }
        (_, Reply::Channels(r)) => {
            out.channels = Some(pb::ChannelsResult {
                channels: r
                    .channels
                    .into_iter()
                    .map(|(name, c)| {
                        let info = pb::ChannelInfo {
                            num_clients: small(c.num_clients),
                        };
                        (name, info)
                    })
                    .collect(),
            })
        }
        (_, Reply::Info(r)) => {
            out.info = Some(pb::InfoResult {
                nodes: r
                    .nodes
                    .into_iter()
                    .map(|n| pb::NodeResult {
                        uid: n.uid,
                        name: n.name,
                        version: n.version,
                        num_clients: small(n.num_clients),
                        num_users: small(n.num_users),
                        num_channels: small(n.num_channels),
                        uptime: small(n.uptime),
                        metrics: None,
                        process: None,
                        num_subs: small(n.num_subs),
                    })
                    .collect(),
            })
        }
        (Method::Disconnect, Reply::Empty(_)) => out.disconnect = Some(pb::DisconnectResult {}),
        (Method::Unsubscribe, Reply::Empty(_)) => out.unsubscribe = Some(pb::UnsubscribeResult {}),
        (Method::HistoryRemove, Reply::Empty(_)) => {
            out.history_remove = Some(pb::HistoryRemoveResult {})
        }
        (Method::RevokeToken, Reply::Empty(_)) => out.revoke_token = Some(pb::RevokeTokenResult {}),
        (Method::InvalidateUserTokens, Reply::Empty(_)) => {
            out.invalidate_user_tokens = Some(pb::InvalidateUserTokensResult {})
        }
        (method, Reply::Push(r)) => push_reply(&mut out, method, r),
        (method, _) => {
            out.error = Some(error(&HeraldError::internal(format!(
                "{method} has no gRPC result"
            ))))
        }
    }
    out
}

fn push_reply(out: &mut pb::Reply, method: Method, reply: PushReply) {
    match (method, reply) {
        (_, PushReply::DeviceRegister(r)) => {
            out.device_register = Some(pb::DeviceRegisterResult { id: r.id })
        }
        (_, PushReply::DeviceList(l)) => {
            out.device_list = Some(pb::DeviceListResult {
                items: l.items.into_iter().map(device).collect(),
                next_cursor: l.next_cursor,
                total_count: total(l.total_count),
            })
        }
        (_, PushReply::DeviceTopicList(l)) => {
            out.device_topic_list = Some(pb::DeviceTopicListResult {
                items: l
                    .items
                    .into_iter()
                    .map(|t| pb::DeviceTopic {
                        id: t.id,
                        topic: t.topic,
                        device: Some(device(t.device)),
                    })
                    .collect(),
                next_cursor: l.next_cursor,
                total_count: total(l.total_count),
            })
        }
        (_, PushReply::UserTopicList(l)) => {
            out.user_topic_list = Some(pb::UserTopicListResult {
                items: l
                    .items
                    .into_iter()
                    .map(|t| pb::UserTopic {
                        id: t.id,
                        user: t.user,
                        topic: t.topic,
                    })
                    .collect(),
                next_cursor: l.next_cursor,
                total_count: total(l.total_count),
            })
        }
        (_, PushReply::SendPushNotification(r)) => {
            out.send_push_notification = Some(pb::SendPushNotificationResult { uid: r.uid })
        }
        (Method::DeviceUpdate, PushReply::Empty(_)) => {
            out.device_update = Some(pb::DeviceUpdateResult {})
        }
        (Method::DeviceRemove, PushReply::Empty(_)) => {
            out.device_remove = Some(pb::DeviceRemoveResult {})
        }
        (Method::DeviceTopicUpdate, PushReply::Empty(_)) => {
            out.device_topic_update = Some(pb::DeviceTopicUpdateResult {})
        }
        (Method::UserTopicUpdate, PushReply::Empty(_)) => {
            out.user_topic_update = Some(pb::UserTopicUpdateResult {})
        }
        (Method::UpdatePushStatus, PushReply::Empty(_)) => {
            out.update_push_status = Some(pb::UpdatePushStatusResult {})
        }
        (Method::CancelPush, PushReply::Empty(_)) => {
            out.cancel_push = Some(pb::CancelPushResult {})
        }
        (method, _) => {
            out.error = Some(error(&HeraldError::internal(format!(
                "{method} has no gRPC result"
            ))))
        }
    }
}
