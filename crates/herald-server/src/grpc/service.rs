//! The `CentrifugoApi` service: every rpc authenticates the metadata's key, decodes its
//! message into the typed layer's request ([`super::convert`]), admits and runs it through
//! [`crate::api`], and cuts its response from the proto `Reply`. The rpcs Herald has no
//! method for answer UNIMPLEMENTED. [`call`] is that one path, shared with
//! [`super::herald_api`].
//!
//! May touch: the app state, through the API layer.

use std::sync::Arc;

use herald_core::error::HeraldError;
use tonic::metadata::MetadataMap;
use tonic::{Request as GrpcRequest, Response, Status};

use super::convert;
use super::proto as pb;
use crate::api::{self, CallError, Fault, Method, Reply, Request};
use crate::app::AppState;
use crate::auth::KeyMatch;

pub struct ApiService {
    state: Arc<AppState>,
}

impl ApiService {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// [`call`], its outcome as a proto `Reply`.
    async fn run<T>(
        &self,
        request: GrpcRequest<T>,
        method: Method,
        decode: fn(T) -> Result<Request, CallError>,
    ) -> Result<pb::Reply, Status> {
        let outcome = call(&self.state, request, method, decode).await?;
        Ok(convert::reply(method, outcome))
    }
}

/// The metadata's API key, checked against the configured keys.
fn authenticate(state: &AppState, metadata: &MetadataMap) -> Result<KeyMatch, Status> {
    api::authenticate(
        &state.api_keys.read(),
        presented_key(metadata),
        "send the metadata authorization: apikey <key>",
    )
    .map_err(super::status)
}

/// Authenticates the request's key, admits `method`, decodes and runs it: `Ok(Ok(reply))`,
/// `Ok(Err(error))` for the method's own failure (the response's `error` field), or the
/// status of a failure that is not the method's answer.
/// Counted in `herald_grpc_requests_total`.
pub(super) async fn call<T>(
    state: &AppState,
    request: GrpcRequest<T>,
    method: Method,
    decode: fn(T) -> Result<Request, CallError>,
) -> Result<Result<Reply, HeraldError>, Status> {
    let started = std::time::Instant::now();
    let result = call_uncounted(state, request, method, decode).await;
    let outcome = match &result {
        Ok(Ok(_)) => "ok",
        Ok(Err(_)) => "error",
        Err(status) => code_name(status.code()),
    };
    state
        .metrics
        .grpc_request(method, outcome, started.elapsed());
    result
}

async fn call_uncounted<T>(
    state: &AppState,
    request: GrpcRequest<T>,
    method: Method,
    decode: fn(T) -> Result<Request, CallError>,
) -> Result<Result<Reply, HeraldError>, Status> {
    let key = authenticate(state, request.metadata())?;
    api::admit(state, &key, method).map_err(super::status)?;
    let outcome = match api::available(state, method).and_then(|()| decode(request.into_inner())) {
        Ok(request) => api::execute(state, &key, request).await,
        Err(error) => Err(error),
    };
    match outcome {
        Ok(reply) => Ok(Ok(reply)),
        Err(error) if error.fault == Fault::Method && !error.error.unavailable => {
            Ok(Err(error.error))
        }
        Err(error) => Err(super::status(error)),
    }
}

/// The key in `authorization: apikey <key>` (or `x-api-key: <key>`).
fn presented_key(metadata: &MetadataMap) -> Option<&str> {
    if let Some(key) = metadata.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key.trim());
    }
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(api::http::apikey_scheme)
}

fn batch(request: pb::BatchRequest) -> Result<Request, CallError> {
    Ok(Request::Batch(api::BatchRequest {
        commands: request.commands.into_iter().map(convert::command).collect(),
        parallel: request.parallel,
    }))
}

/// A status code as a metrics label.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        InvalidArgument => "invalid_argument",
        Unauthenticated => "unauthenticated",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Unavailable => "unavailable",
        Internal => "internal",
        _ => "other",
    }
}

fn not_in_herald(name: &str) -> Status {
    Status::unimplemented(format!("{name} is not available in Herald"))
}

/// Implements the service: `rpc => (request, method, decode, result field)` for each method
/// Herald has, and the names of those it has not.
macro_rules! service {
    (
        implemented { $($rpc:ident($req:ident) -> $resp:ident = $method:ident, $decode:path, $field:ident;)* }
        missing { $($missing:ident($mreq:ident) -> $mresp:ident;)* }
    ) => {
        #[tonic::async_trait]
        impl pb::centrifugo_api_server::CentrifugoApi for ApiService {
            async fn batch(
                &self,
                request: GrpcRequest<pb::BatchRequest>,
            ) -> Result<Response<pb::BatchResponse>, Status> {
                let started = std::time::Instant::now();
                let result = self.run_batch(request).await;
                let outcome = result.as_ref().map_or_else(|s| code_name(s.code()), |_| "ok");
                self.state
                    .metrics
                    .grpc_request(Method::Batch, outcome, started.elapsed());
                batch_response(result?)
            }
            $(
                async fn $rpc(
                    &self,
                    request: GrpcRequest<pb::$req>,
                ) -> Result<Response<pb::$resp>, Status> {
                    let reply = self.run(request, Method::$method, $decode).await?;
                    Ok(Response::new(pb::$resp {
                        error: reply.error,
                        result: reply.$field,
                    }))
                }
            )*
            $(
                async fn $missing(
                    &self,
                    _: GrpcRequest<pb::$mreq>,
                ) -> Result<Response<pb::$mresp>, Status> {
                    Err(not_in_herald(stringify!($missing)))
                }
            )*
        }
    };
}

service! {
    implemented {
    publish(PublishRequest) -> PublishResponse = Publish, convert::publish, publish;
    broadcast(BroadcastRequest) -> BroadcastResponse = Broadcast, convert::broadcast, broadcast;
    unsubscribe(UnsubscribeRequest) -> UnsubscribeResponse =
        Unsubscribe, convert::unsubscribe, unsubscribe;
    disconnect(DisconnectRequest) -> DisconnectResponse =
        Disconnect, convert::disconnect, disconnect;
    presence(PresenceRequest) -> PresenceResponse = Presence, convert::presence, presence;
    presence_stats(PresenceStatsRequest) -> PresenceStatsResponse =
        PresenceStats, convert::presence_stats, presence_stats;
    history(HistoryRequest) -> HistoryResponse = History, convert::history, history;
    history_remove(HistoryRemoveRequest) -> HistoryRemoveResponse =
        HistoryRemove, convert::history_remove, history_remove;
    info(InfoRequest) -> InfoResponse = Info, convert::info, info;
    channels(ChannelsRequest) -> ChannelsResponse = Channels, convert::channels, channels;
    revoke_token(RevokeTokenRequest) -> RevokeTokenResponse =
        RevokeToken, convert::revoke_token, revoke_token;
    invalidate_user_tokens(InvalidateUserTokensRequest) -> InvalidateUserTokensResponse =
        InvalidateUserTokens, convert::invalidate_user_tokens, invalidate_user_tokens;
    device_register(DeviceRegisterRequest) -> DeviceRegisterResponse =
        DeviceRegister, convert::device_register, device_register;
    device_update(DeviceUpdateRequest) -> DeviceUpdateResponse =
        DeviceUpdate, convert::device_update, device_update;
    device_remove(DeviceRemoveRequest) -> DeviceRemoveResponse =
        DeviceRemove, convert::device_remove, device_remove;
    device_list(DeviceListRequest) -> DeviceListResponse =
        DeviceList, convert::device_list, device_list;
    device_topic_list(DeviceTopicListRequest) -> DeviceTopicListResponse =
        DeviceTopicList, convert::device_topic_list, device_topic_list;
    device_topic_update(DeviceTopicUpdateRequest) -> DeviceTopicUpdateResponse =
        DeviceTopicUpdate, convert::device_topic_update, device_topic_update;
    user_topic_list(UserTopicListRequest) -> UserTopicListResponse =
        UserTopicList, convert::user_topic_list, user_topic_list;
    user_topic_update(UserTopicUpdateRequest) -> UserTopicUpdateResponse =
        UserTopicUpdate, convert::user_topic_update, user_topic_update;
    send_push_notification(SendPushNotificationRequest) -> SendPushNotificationResponse =
        SendPushNotification, convert::send_push_notification, send_push_notification;
    update_push_status(UpdatePushStatusRequest) -> UpdatePushStatusResponse =
        UpdatePushStatus, convert::update_push_status, update_push_status;
    cancel_push(CancelPushRequest) -> CancelPushResponse =
        CancelPush, convert::cancel_push, cancel_push;
    }
    missing {
    subscribe(SubscribeRequest) -> SubscribeResponse;
    rpc(RpcRequest) -> RpcResponse;
    refresh(RefreshRequest) -> RefreshResponse;
    connections(ConnectionsRequest) -> ConnectionsResponse;
    update_user_status(UpdateUserStatusRequest) -> UpdateUserStatusResponse;
    get_user_status(GetUserStatusRequest) -> GetUserStatusResponse;
    delete_user_status(DeleteUserStatusRequest) -> DeleteUserStatusResponse;
    block_user(BlockUserRequest) -> BlockUserResponse;
    unblock_user(UnblockUserRequest) -> UnblockUserResponse;
    }
}

impl ApiService {
    /// `Batch`: each command's outcome is its reply; a failure of the batch as a whole (bad
    /// key, too many commands) is a status, as the response has no `error` field.
    async fn run_batch(
        &self,
        request: GrpcRequest<pb::BatchRequest>,
    ) -> Result<api::BatchResult, Status> {
        let key = authenticate(&self.state, request.metadata())?;
        api::admit(&self.state, &key, Method::Batch).map_err(super::status)?;
        let request = batch(request.into_inner()).map_err(super::status)?;
        match api::execute(&self.state, &key, request).await {
            Ok(Reply::Batch(result)) => Ok(result),
            Ok(_) => Err(Status::internal("batch answered with another result")),
            Err(error) => Err(super::status(error)),
        }
    }
}

fn batch_response(result: api::BatchResult) -> Result<Response<pb::BatchResponse>, Status> {
    let replies = result
        .replies
        .into_iter()
        .map(|outcome| match outcome {
            Ok((method, reply)) => convert::reply(method, Ok(reply)),
            Err(error) => pb::Reply {
                error: Some(convert::error(&error)),
                ..pb::Reply::default()
            },
        })
        .collect();
    Ok(Response::new(pb::BatchResponse { replies }))
}
