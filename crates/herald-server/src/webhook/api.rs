//! The webhook methods of the server API: endpoints (`webhook_endpoint_create`, `_update`,
//! `_delete`, `_list`), what happened to deliveries (`webhook_deliveries`: the queue's
//! statuses; `webhook_attempts`: one message's attempt log) and `webhook_replay` (dead
//! letters sent again with their `webhook-id`).
//!
//! Owns: the typed request and result of each method ([`WebhookRequest`], [`WebhookReply`])
//! and their mapping onto the [`WebhookService`](herald_outbound::webhook::WebhookService).
//! Method names, decoding and scopes are the API layer's ([`crate::api`]).
//!
//! May touch: the webhook runtime in the application state.

use herald_core::device::PageRequest;
use herald_core::duration::HumanDuration;
use herald_core::error::{ErrorCode, HeraldError};
use herald_core::outbound::{JobState, JobStatus, QueueError, StatusFilter};
use herald_core::webhook_store::AttemptRecord;
use herald_outbound::webhook::endpoint::{Endpoint, validate_id};
use herald_outbound::webhook::endpoints::Entry;
use herald_outbound::webhook::event::{KIND, rfc3339};
use herald_outbound::webhook::sign::Secret;
use serde::{Deserialize, Serialize};

use super::WebhookRuntime;
use crate::api::types::integer;
use crate::app::AppState;

pub(crate) fn not_enabled() -> HeraldError {
    HeraldError::new(
        ErrorCode::NotAvailable,
        "webhooks are not enabled ([webhooks] enabled = true)",
    )
}

fn queue_error(error: QueueError) -> HeraldError {
    match error {
        QueueError::Invalid(detail) => HeraldError::bad_request(detail),
        QueueError::Unavailable(detail) => HeraldError::unavailable(detail),
        QueueError::Backend(detail) => HeraldError::internal(detail),
    }
}

fn bad(detail: impl Into<String>) -> HeraldError {
    HeraldError::bad_request(detail)
}

fn yes() -> bool {
    true
}

/// `webhook_endpoint_create`: an endpoint; `secrets` empty → one is generated (and shown in
/// the result, the only time it is shown whole).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, deserialize_with = "integer::required")]
    pub rate_limit: u32,
    #[serde(default)]
    pub ordered: bool,
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    #[serde(default)]
    pub description: String,
}

/// `webhook_endpoint_update`: the fields given replace the endpoint's (`secrets` replaces
/// the whole list: a rotation passes `[new, old]`, later `[new]`). `enabled: true` also
/// clears a disable by Herald.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateParams {
    pub id: String,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub events: Option<Vec<String>>,
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    #[serde(default)]
    pub secrets: Option<Vec<String>>,
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "integer::optional")]
    pub rate_limit: Option<u32>,
    #[serde(default)]
    pub ordered: Option<bool>,
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdParams {
    pub id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// `webhook_deliveries`: by endpoint, event or both, optionally by state.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesParams {
    #[serde(default)]
    pub endpoint: String,
    #[serde(default)]
    pub event: String,
    #[serde(default)]
    pub states: Vec<String>,
    #[serde(default)]
    pub cursor: String,
    #[serde(default, deserialize_with = "integer::required")]
    pub limit: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttemptsParams {
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayParams {
    pub endpoint: String,
    /// One delivery; without it, every dead letter of the endpoint.
    #[serde(default)]
    pub message: Option<String>,
}

/// An endpoint on the wire: secrets hidden unless just created, Herald's state beside it.
#[derive(Debug, Serialize)]
pub struct WireEndpoint {
    #[serde(flatten)]
    pub endpoint: Endpoint,
    pub from_config: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<WireDisabled>,
}

#[derive(Debug, Serialize)]
pub struct WireDisabled {
    pub at: String,
    pub reason: String,
}

impl WireEndpoint {
    fn new(entry: &Entry, show_secrets: bool) -> Self {
        Self {
            endpoint: if show_secrets {
                entry.endpoint.clone()
            } else {
                entry.endpoint.redacted()
            },
            from_config: entry.from_config,
            failing_since: entry.state.failing_since.map(rfc3339),
            disabled: entry.state.disabled.as_ref().map(|d| WireDisabled {
                at: rfc3339(d.at),
                reason: d.reason.clone(),
            }),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EndpointResult {
    pub endpoint: WireEndpoint,
}

#[derive(Debug, Serialize)]
pub struct Items<T> {
    pub items: Vec<T>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub next_cursor: String,
}

#[derive(Debug, Serialize)]
pub struct WireDelivery {
    /// The `webhook-id`.
    pub message: String,
    /// The queue's job (the message id, or a replay of it).
    pub job: String,
    pub event: String,
    pub endpoint: String,
    pub state: &'static str,
    pub attempts: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub updated_at: String,
}

impl From<JobStatus> for WireDelivery {
    fn from(status: JobStatus) -> Self {
        let message = status
            .id
            .split_once(".replay")
            .map_or(status.id.as_str(), |(message, _)| message)
            .to_owned();
        Self {
            message,
            job: status.id,
            event: status.group,
            endpoint: status.recipient,
            state: status.state.as_str(),
            attempts: status.attempts,
            reason: status.reason,
            updated_at: rfc3339(status.updated_at),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct WireAttempt {
    pub message: String,
    pub endpoint: String,
    pub attempt: u32,
    pub at: String,
    pub status: u16,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl From<AttemptRecord> for WireAttempt {
    fn from(a: AttemptRecord) -> Self {
        Self {
            message: a.message,
            endpoint: a.endpoint,
            attempt: a.attempt,
            at: rfc3339(a.at),
            status: a.status,
            duration_ms: a.duration_ms,
            error: a.error,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ReplayResult {
    pub replayed: u64,
}

#[derive(Debug, Serialize)]
pub struct Nothing {}

/// Checks a definition against the server's rules: the endpoint's own, the lease, and the
/// egress rule for IP literals (host names are checked when they are resolved).
fn check(runtime: &WebhookRuntime, endpoint: &Endpoint) -> Result<(), HeraldError> {
    endpoint.validate().map_err(bad)?;
    let max = runtime.config.max_endpoint_timeout();
    if endpoint.timeout.is_some_and(|t| t.as_duration() > max) {
        return Err(bad(format!(
            "timeout must be at most {max:?} (webhooks.lease minus 5s)"
        )));
    }
    if !runtime.config.allow_private_addresses
        && let Ok(url) = reqwest::Url::parse(&endpoint.url)
        && let Some(reason) = herald_outbound::egress::literal_host_reason(&url)
    {
        return Err(bad(format!(
            "url: {reason} addresses are refused (webhooks.allow_private_addresses is off)"
        )));
    }
    Ok(())
}

fn existing(runtime: &WebhookRuntime, id: &str) -> Result<std::sync::Arc<Entry>, HeraldError> {
    runtime
        .service
        .endpoints
        .get(id)
        .ok_or_else(|| bad(format!("webhook endpoint {id:?} not found")))
}

fn from_config_error(id: &str) -> HeraldError {
    bad(format!(
        "webhook endpoint {id:?} is defined in the config file; change it there (the API may \
         only re-enable it with {{\"enabled\": true}})"
    ))
}

/// A webhook method's request, decoded.
#[derive(Debug)]
pub enum WebhookRequest {
    EndpointCreate(CreateParams),
    EndpointUpdate(UpdateParams),
    EndpointDelete(IdParams),
    EndpointList(Empty),
    Deliveries(DeliveriesParams),
    Attempts(AttemptsParams),
    Replay(ReplayParams),
}

/// A webhook method's result (JSON: the object itself).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum WebhookReply {
    Endpoint(EndpointResult),
    Nothing(Nothing),
    Endpoints(Items<WireEndpoint>),
    Deliveries(Items<WireDelivery>),
    Attempts(Items<WireAttempt>),
    Replay(ReplayResult),
}

/// Runs a webhook method.
pub async fn call(state: &AppState, request: WebhookRequest) -> Result<WebhookReply, HeraldError> {
    let runtime = state.webhooks.as_deref().ok_or_else(not_enabled)?;
    let endpoints = &runtime.service.endpoints;
    match request {
        WebhookRequest::EndpointCreate(p) => {
            validate_id(&p.id).map_err(bad)?;
            if endpoints.get(&p.id).is_some() {
                return Err(bad(format!("webhook endpoint {:?} already exists", p.id)));
            }
            let secrets = if p.secrets.is_empty() {
                vec![Secret::generate()]
            } else {
                p.secrets
            };
            let endpoint = Endpoint {
                id: p.id,
                url: p.url,
                events: p.events,
                channels: p.channels,
                secrets,
                enabled: p.enabled,
                rate_limit: p.rate_limit,
                ordered: p.ordered,
                timeout: p.timeout,
                description: p.description,
            };
            check(runtime, &endpoint)?;
            let id = endpoint.id.clone();
            endpoints.put(endpoint, true).await.map_err(queue_error)?;
            let entry = existing(runtime, &id)?;
            Ok(WebhookReply::Endpoint(EndpointResult {
                endpoint: WireEndpoint::new(&entry, true),
            }))
        }
        WebhookRequest::EndpointUpdate(p) => {
            let entry = existing(runtime, &p.id)?;
            let only_enabling = p.enabled == Some(true)
                && p.url.is_none()
                && p.events.is_none()
                && p.channels.is_none()
                && p.secrets.is_none()
                && p.rate_limit.is_none()
                && p.ordered.is_none()
                && p.timeout.is_none()
                && p.description.is_none();
            if entry.from_config && !only_enabling {
                return Err(from_config_error(&p.id));
            }
            let mut endpoint = entry.endpoint.clone();
            let enabling = p.enabled == Some(true);
            if let Some(url) = p.url {
                endpoint.url = url;
            }
            if let Some(events) = p.events {
                endpoint.events = events;
            }
            if let Some(channels) = p.channels {
                endpoint.channels = channels;
            }
            if let Some(secrets) = p.secrets {
                endpoint.secrets = secrets;
            }
            if let Some(enabled) = p.enabled {
                endpoint.enabled = enabled;
            }
            if let Some(rate_limit) = p.rate_limit {
                endpoint.rate_limit = rate_limit;
            }
            if let Some(ordered) = p.ordered {
                endpoint.ordered = ordered;
            }
            if let Some(timeout) = p.timeout {
                endpoint.timeout = Some(timeout);
            }
            if let Some(description) = p.description {
                endpoint.description = description;
            }
            check(runtime, &endpoint)?;
            endpoints
                .put(endpoint, enabling)
                .await
                .map_err(queue_error)?;
            let entry = existing(runtime, &p.id)?;
            Ok(WebhookReply::Endpoint(EndpointResult {
                endpoint: WireEndpoint::new(&entry, false),
            }))
        }
        WebhookRequest::EndpointDelete(p) => {
            let entry = existing(runtime, &p.id)?;
            if entry.from_config {
                return Err(from_config_error(&p.id));
            }
            endpoints.delete(&p.id).await.map_err(queue_error)?;
            Ok(WebhookReply::Nothing(Nothing {}))
        }
        WebhookRequest::EndpointList(Empty {}) => {
            let items = endpoints
                .all()
                .values()
                .map(|entry| WireEndpoint::new(entry, false))
                .collect();
            Ok(WebhookReply::Endpoints(Items {
                items,
                next_cursor: String::new(),
            }))
        }
        WebhookRequest::Deliveries(p) => {
            if p.endpoint.is_empty() && p.event.is_empty() {
                return Err(bad("endpoint or event is required"));
            }
            let states = p
                .states
                .iter()
                .map(|s| s.parse::<JobState>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(queue_error)?;
            let filter = StatusFilter {
                group: p.event,
                recipient: p.endpoint,
                states,
            };
            let page = PageRequest {
                cursor: p.cursor,
                limit: usize::try_from(p.limit).unwrap_or(usize::MAX),
                include_total: false,
            };
            let found = runtime
                .service
                .queue
                .statuses(&filter, &page)
                .await
                .map_err(queue_error)?;
            // Push deliveries share the queue; a device id equal to an endpoint id would
            // otherwise show up here.
            let items = found
                .items
                .into_iter()
                .filter(|s| s.kind == KIND)
                .map(WireDelivery::from)
                .collect();
            Ok(WebhookReply::Deliveries(Items {
                items,
                next_cursor: found.next_cursor,
            }))
        }
        WebhookRequest::Attempts(p) => {
            if p.message.is_empty() {
                return Err(bad("message is required"));
            }
            let attempts = runtime
                .service
                .store
                .attempts(&p.message)
                .await
                .map_err(queue_error)?;
            Ok(WebhookReply::Attempts(Items {
                items: attempts.into_iter().map(WireAttempt::from).collect(),
                next_cursor: String::new(),
            }))
        }
        WebhookRequest::Replay(p) => {
            existing(runtime, &p.endpoint)?;
            if p.message.as_deref() == Some("") {
                return Err(bad(
                    "message must not be empty (omit it to replay them all)",
                ));
            }
            let replayed = runtime
                .service
                .replay(&p.endpoint, p.message.as_deref())
                .await
                .map_err(queue_error)?;
            Ok(WebhookReply::Replay(ReplayResult { replayed }))
        }
    }
}
