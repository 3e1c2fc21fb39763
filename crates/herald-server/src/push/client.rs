//! A connected app's own push calls, with its connection token as the only credential: over
//! the WebSocket as RPC methods (`herald.device_register`, …) and over HTTP
//! (`POST /client/device_register` with `Authorization: Bearer <token>`), so a mobile app
//! needs no backend glue to receive pushes.
//!
//! Rules: anonymous connections can do none of this; a device registered here belongs to the
//! caller's user; a caller can only update, remove or report on devices of its own user;
//! topics are the server's to give (the server API), so a client cannot set them — a client
//! that could pick its topics could read any topic's pushes.
//!
//! Owns: [`PushClientMethods`] and the HTTP handler.
//!
//! May touch: the push runtime (registry and service).

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use herald_core::client_methods::{Caller, ClientMethods, PREFIX};
use herald_core::device::{DeviceFilter, DeviceUpdate};
use herald_core::error::{ErrorCode, HeraldError};
use herald_core::publication::Payload;
use herald_core::time::now_ms;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::PushRuntime;
use super::api::{PushStatusUpdate, RegisterParams, device_error, push_error};
use crate::api::ApiError;
use crate::app::AppState;

/// The built-in methods, without the `herald.` prefix.
pub const METHODS: &[&str] = &[
    "device_register",
    "device_update",
    "device_remove",
    "update_push_status",
    "ack",
];

/// The client methods push adds.
pub struct PushClientMethods {
    pub push: Arc<PushRuntime>,
    pub live: Arc<super::live::LiveFirst>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnDeviceUpdate {
    id: String,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    locale: Option<String>,
    #[serde(default)]
    meta: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnDevice {
    id: String,
}

fn decode<T: DeserializeOwned>(data: Option<&Payload>) -> Result<T, HeraldError> {
    let bytes = data.map_or(&b"{}"[..], |d| d.bytes());
    serde_json::from_slice(bytes).map_err(|e| HeraldError::bad_request(format!("bad data: {e}")))
}

fn json(value: serde_json::Value) -> Payload {
    Payload::Json(Bytes::from(value.to_string()))
}

impl PushClientMethods {
    /// Fails unless `id` is a device of `user`.
    async fn owned(&self, user: &str, id: &str) -> Result<(), HeraldError> {
        let filter = DeviceFilter {
            ids: vec![id.to_string()],
            ..DeviceFilter::default()
        };
        let page = self
            .push
            .service
            .devices()
            .list(&filter, false, &Default::default())
            .await
            .map_err(device_error)?;
        match page.items.first() {
            Some(device) if device.user == user => Ok(()),
            Some(_) => Err(HeraldError::new(
                ErrorCode::PermissionDenied,
                "the device belongs to another user",
            )),
            None => Err(HeraldError::bad_request(format!("device {id:?} not found"))),
        }
    }

    async fn run(
        &self,
        user: &str,
        method: &str,
        data: Option<&Payload>,
    ) -> Result<Payload, HeraldError> {
        let devices = self.push.service.devices();
        let now = now_ms();
        match method {
            "device_register" => {
                let params: RegisterParams = decode(data)?;
                if params.topics.is_some() {
                    return Err(HeraldError::new(
                        ErrorCode::PermissionDenied,
                        "clients cannot set topics; the server API does",
                    ));
                }
                if params.user.as_deref().is_some_and(|u| u != user) {
                    return Err(HeraldError::new(
                        ErrorCode::PermissionDenied,
                        "a client registers devices for its own user only",
                    ));
                }
                if let Some(id) = params.id.as_deref().filter(|id| !id.is_empty()) {
                    self.owned(user, id).await?;
                }
                let mut registration = params.registration()?;
                registration.user = user.to_string();
                let device = devices
                    .register(registration, now)
                    .await
                    .map_err(device_error)?;
                Ok(json(serde_json::json!({ "id": device.id })))
            }
            "device_update" => {
                let params: OwnDeviceUpdate = decode(data)?;
                self.owned(user, &params.id).await?;
                let filter = DeviceFilter {
                    ids: vec![params.id],
                    ..DeviceFilter::default()
                };
                let update = DeviceUpdate {
                    timezone: params.timezone,
                    locale: params.locale,
                    meta: params.meta,
                    ..DeviceUpdate::default()
                };
                devices
                    .update(&filter, &update, now)
                    .await
                    .map_err(device_error)?;
                Ok(json(serde_json::json!({})))
            }
            "device_remove" => {
                let params: OwnDevice = decode(data)?;
                self.owned(user, &params.id).await?;
                let filter = DeviceFilter {
                    ids: vec![params.id],
                    ..DeviceFilter::default()
                };
                devices
                    .remove(&filter, "client", now)
                    .await
                    .map_err(device_error)?;
                Ok(json(serde_json::json!({})))
            }
            "update_push_status" => {
                let params: PushStatusUpdate = decode(data)?;
                self.owned(user, &params.device_id).await?;
                self.push
                    .service
                    .report(&params.analytics_uid, &params.device_id, &params.status)
                    .await
                    .map_err(push_error)?;
                Ok(json(serde_json::json!({})))
            }
            "ack" => self.live.ack(user, data).await,
            other => Err(HeraldError::new(
                ErrorCode::MethodNotFound,
                format!("no client method {other:?}"),
            )),
        }
    }
}

#[async_trait]
impl ClientMethods for PushClientMethods {
    fn handles(&self, method: &str) -> bool {
        method
            .strip_prefix(PREFIX)
            .is_some_and(|m| METHODS.contains(&m))
    }

    async fn call(
        &self,
        caller: &Caller,
        method: &str,
        data: Option<&Payload>,
    ) -> Result<Payload, HeraldError> {
        if caller.user.is_empty() {
            return Err(HeraldError::new(
                ErrorCode::PermissionDenied,
                "anonymous connections cannot manage push devices",
            ));
        }
        let method = method.strip_prefix(PREFIX).unwrap_or(method);
        self.run(&caller.user, method, data).await
    }
}

/// `POST /client/{method}`: the same methods over HTTP, authenticated by the connection token
/// (`Authorization: Bearer <token>`). Errors use the server API's JSON error body with an
/// HTTP status that says what went wrong (401 token, 403 permission, 400 input, 404 method).
pub async fn handle(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match handle_inner(&state, &method, &headers, body).await {
        Ok(payload) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            payload.bytes().clone(),
        )
            .into_response(),
        Err(error) => error.into_response(),
    }
}

async fn handle_inner(
    state: &AppState,
    method: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Payload, ApiError> {
    let status_of = |error: HeraldError| {
        let status = match error.code {
            ErrorCode::Unauthorized | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorCode::MethodNotFound => StatusCode::NOT_FOUND,
            ErrorCode::NotAvailable => StatusCode::NOT_FOUND,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            _ if error.unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError { status, error }
    };
    let push = state
        .push
        .clone()
        .ok_or_else(|| status_of(super::api::not_enabled()))?;
    if !METHODS.contains(&method) {
        return Err(status_of(HeraldError::new(
            ErrorCode::MethodNotFound,
            format!("no client method {method:?}"),
        )));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or_else(|| {
            status_of(HeraldError::new(
                ErrorCode::Unauthorized,
                "Authorization: Bearer <connection token> is required",
            ))
        })?;
    use herald_core::auth::Authenticator as _;
    let credentials = state
        .tokens
        .authenticate(token.trim())
        .await
        .map_err(status_of)?;
    let body = crate::api::read_body(body, state.config.server.max_body_size).await?;
    let data = Payload::Json(body);
    let methods = PushClientMethods {
        live: Arc::new(super::live::LiveFirst {
            push: push.clone(),
            node: state.node.clone(),
        }),
        push,
    };
    let caller = Caller {
        user: credentials.user,
        client: String::new(),
    };
    methods
        .call(&caller, &format!("{PREFIX}{method}"), Some(&data))
        .await
        .map_err(status_of)
}

/// `GET /client/vapid_public_key?app=<app>`: the Web Push public key (`applicationServerKey`)
/// browsers subscribe with. Public by nature: no token needed.
pub async fn vapid_public_key(
    State(state): State<Arc<AppState>>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let app = query.get("app").map_or("", String::as_str);
    let key = state
        .push
        .as_ref()
        .and_then(|push| push.vapid_public_key(app).map(str::to_string));
    match key {
        Some(key) => crate::api::json_response(
            StatusCode::OK,
            &serde_json::json!({ "app": app, "public_key": key }),
        ),
        None => ApiError {
            status: StatusCode::NOT_FOUND,
            error: HeraldError::new(
                ErrorCode::NotAvailable,
                format!("no Web Push app {app:?} is configured"),
            ),
        }
        .into_response(),
    }
}
