//! The `HeraldApi` service (`proto/herald/api.proto`, package `herald.api`): Herald's own
//! server API methods that Centrifugo's `CentrifugoApi` has no rpc for — `push_status`,
//! `device_removals` and the `webhook_*` methods. The same adapter as [`super::service`]:
//! the metadata's key goes through [`api::authenticate`], the method through [`api::admit`]
//! (scopes) and [`api::available`], the decoded request ([`super::herald_convert`]) through
//! [`api::execute`]; a method's own failure is the response's `error` field, anything else a
//! status ([`super::status`]). Counted in `herald_grpc_requests_total` like the others.
//!
//! May touch: the app state, through the API layer.

use std::sync::Arc;

use herald_core::error::HeraldError;
use tonic::{Request as GrpcRequest, Response, Status};

use super::herald_convert as convert;
use super::heraldproto as pb;
use crate::api::{self, CallError, Fault, Method, Reply, Request};
use crate::app::AppState;

pub struct HeraldApiService {
    state: Arc<AppState>,
}

impl HeraldApiService {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// [`call`], counted in `herald_grpc_requests_total`.
    async fn run<T>(
        &self,
        request: GrpcRequest<T>,
        method: Method,
        decode: fn(T) -> Result<Request, CallError>,
    ) -> Result<Result<Reply, HeraldError>, Status> {
        let started = std::time::Instant::now();
        let result = call(&self.state, request, method, decode).await;
        let outcome = match &result {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "error",
            Err(status) => super::service::code_name(status.code()),
        };
        self.state
            .metrics
            .grpc_request(method, outcome, started.elapsed());
        result
    }
}

/// Authenticates the request's key, admits `method`, decodes and runs it: `Ok(Ok(reply))`,
/// `Ok(Err(error))` for the method's own failure (the response's `error` field), or the
/// status of a failure that is not the method's answer.
pub(super) async fn call<T>(
    state: &AppState,
    request: GrpcRequest<T>,
    method: Method,
    decode: fn(T) -> Result<Request, CallError>,
) -> Result<Result<Reply, HeraldError>, Status> {
    let key = api::authenticate(
        &state.api_keys.read(),
        super::service::presented_key(request.metadata()),
        "send the metadata authorization: apikey <key>",
    )
    .map_err(super::status)?;
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

/// Implements the service: `rpc(request) -> response = method, decode, result`.
macro_rules! herald_service {
    ($($rpc:ident($req:ident) -> $resp:ident = $method:ident, $decode:path, $result:path;)*) => {
        #[tonic::async_trait]
        impl pb::herald_api_server::HeraldApi for HeraldApiService {
            $(
                async fn $rpc(
                    &self,
                    request: GrpcRequest<pb::$req>,
                ) -> Result<Response<pb::$resp>, Status> {
                    let response = match self.run(request, Method::$method, $decode).await? {
                        Ok(reply) => pb::$resp {
                            error: None,
                            result: Some($result(reply)?),
                        },
                        Err(error) => pb::$resp {
                            error: Some(convert::error(&error)),
                            result: None,
                        },
                    };
                    Ok(Response::new(response))
                }
            )*
        }
    };
}

herald_service! {
    push_status(PushStatusRequest) -> PushStatusResponse =
        PushStatus, convert::push_status, convert::push_status_result;
    device_removals(DeviceRemovalsRequest) -> DeviceRemovalsResponse =
        DeviceRemovals, convert::device_removals, convert::device_removals_result;
    webhook_endpoint_create(WebhookEndpointCreateRequest) -> WebhookEndpointCreateResponse =
        WebhookEndpointCreate, convert::webhook_endpoint_create, convert::endpoint_result;
    webhook_endpoint_update(WebhookEndpointUpdateRequest) -> WebhookEndpointUpdateResponse =
        WebhookEndpointUpdate, convert::webhook_endpoint_update, convert::endpoint_result;
    webhook_endpoint_delete(WebhookEndpointDeleteRequest) -> WebhookEndpointDeleteResponse =
        WebhookEndpointDelete, convert::webhook_endpoint_delete, convert::endpoint_delete_result;
    webhook_endpoint_list(WebhookEndpointListRequest) -> WebhookEndpointListResponse =
        WebhookEndpointList, convert::webhook_endpoint_list, convert::endpoint_list_result;
    webhook_deliveries(WebhookDeliveriesRequest) -> WebhookDeliveriesResponse =
        WebhookDeliveries, convert::webhook_deliveries, convert::deliveries_result;
    webhook_attempts(WebhookAttemptsRequest) -> WebhookAttemptsResponse =
        WebhookAttempts, convert::webhook_attempts, convert::attempts_result;
    webhook_replay(WebhookReplayRequest) -> WebhookReplayResponse =
        WebhookReplay, convert::webhook_replay, convert::replay_result;
}
