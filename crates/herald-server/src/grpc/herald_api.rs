//! The `HeraldApi` service (`proto/herald/api.proto`, package `herald.api`): Herald's own
//! server API methods that Centrifugo's `CentrifugoApi` has no rpc for — `push_status`,
//! `device_removals` and the `webhook_*` methods. The same adapter as [`super::service`]:
//! one call path ([`super::service::call`]: the metadata's key, the method's scopes and
//! availability, the decoded request ([`super::herald_convert`]) run by the API layer); a method's own failure is the response's `error` field, anything else a
//! status ([`super::status`]). Counted in `herald_grpc_requests_total` like the others.
//!
//! May touch: the app state, through the API layer.

use std::sync::Arc;

use tonic::{Request as GrpcRequest, Response, Status};

use super::herald_convert as convert;
use super::heraldproto as pb;
use crate::api::Method;
use crate::app::AppState;

pub struct HeraldApiService {
    state: Arc<AppState>,
}

impl HeraldApiService {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
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
                    let response = match super::service::call(&self.state, request, Method::$method, $decode).await? {
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
