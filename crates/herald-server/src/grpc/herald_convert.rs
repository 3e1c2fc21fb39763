//! Protobuf ↔ the typed API layer for the `HeraldApi` service (`proto/herald/api.proto`):
//! each request message becomes the typed [`Request`] of its HTTP method (the same
//! parameter structs the JSON decodes into), and each method's [`Reply`] becomes its result
//! message. Durations (`timeout`) are the HTTP API's `"5s"`-style text; one that does not
//! parse, or a negative `limit`, is INVALID_ARGUMENT, as a wrong JSON type is a 400.
//!
//! May touch: nothing; pure conversions.

use herald_core::duration::{HumanDuration, parse_duration};
use herald_core::error::HeraldError;
use tonic::Status;

use super::convert::{invalid, page_limit, signed};
use super::heraldproto as pb;
use crate::api::{CallError, Method, Reply, Request};
use crate::push::api::{self as push, PushReply, PushRequest as P};
use crate::webhook::api::{self as webhook, WebhookReply, WebhookRequest as W};

/// The method's error as the response's `error`: `CentrifugoApi`'s code and message.
pub fn error(error: &HeraldError) -> pb::Error {
    let error = super::convert::error(error);
    pb::Error {
        code: error.code,
        message: error.message,
    }
}

fn timeout(text: String) -> Result<Option<HumanDuration>, CallError> {
    if text.is_empty() {
        return Ok(None);
    }
    parse_duration(&text)
        .map(|d| Some(HumanDuration(d)))
        .map_err(|e| invalid(format!("timeout: {e}")))
}

// ---------------------------------------------------------------------------------------
// Requests

pub fn push_status(p: pb::PushStatusRequest) -> Result<Request, CallError> {
    Ok(Request::Push(
        Method::PushStatus,
        P::PushStatus(push::StatusParams {
            uid: p.uid,
            device_id: p.device_id,
            states: p.states,
            cursor: p.cursor,
            limit: page_limit(p.limit)?,
        }),
    ))
}

pub fn device_removals(p: pb::DeviceRemovalsRequest) -> Result<Request, CallError> {
    Ok(Request::Push(
        Method::DeviceRemovals,
        P::DeviceRemovals(push::PageParams {
            cursor: p.cursor,
            limit: page_limit(p.limit)?,
        }),
    ))
}

pub fn webhook_endpoint_create(p: pb::WebhookEndpointCreateRequest) -> Result<Request, CallError> {
    Ok(Request::Webhook(
        Method::WebhookEndpointCreate,
        W::EndpointCreate(webhook::CreateParams {
            id: p.id,
            url: p.url,
            events: p.events,
            channels: p.channels,
            secrets: p.secrets,
            enabled: p.enabled.unwrap_or(true),
            rate_limit: p.rate_limit,
            ordered: p.ordered,
            timeout: timeout(p.timeout)?,
            description: p.description,
        }),
    ))
}

pub fn webhook_endpoint_update(p: pb::WebhookEndpointUpdateRequest) -> Result<Request, CallError> {
    let timeout = match p.timeout {
        // Set, so not "unchanged": an empty one is refused rather than ignored.
        Some(text) if text.is_empty() => return Err(invalid("timeout: empty")),
        Some(text) => timeout(text)?,
        None => None,
    };
    Ok(Request::Webhook(
        Method::WebhookEndpointUpdate,
        W::EndpointUpdate(webhook::UpdateParams {
            id: p.id,
            url: p.url,
            events: p.events.map(|list| list.values),
            channels: p.channels.map(|list| list.values),
            secrets: p.secrets.map(|list| list.values),
            enabled: p.enabled,
            rate_limit: p.rate_limit,
            ordered: p.ordered,
            timeout,
            description: p.description,
        }),
    ))
}

pub fn webhook_endpoint_delete(p: pb::WebhookEndpointDeleteRequest) -> Result<Request, CallError> {
    Ok(Request::Webhook(
        Method::WebhookEndpointDelete,
        W::EndpointDelete(webhook::IdParams { id: p.id }),
    ))
}

pub fn webhook_endpoint_list(_: pb::WebhookEndpointListRequest) -> Result<Request, CallError> {
    Ok(Request::Webhook(
        Method::WebhookEndpointList,
        W::EndpointList(webhook::Empty {}),
    ))
}

pub fn webhook_deliveries(p: pb::WebhookDeliveriesRequest) -> Result<Request, CallError> {
    Ok(Request::Webhook(
        Method::WebhookDeliveries,
        W::Deliveries(webhook::DeliveriesParams {
            endpoint: p.endpoint,
            event: p.event,
            states: p.states,
            cursor: p.cursor,
            limit: page_limit(p.limit)?,
        }),
    ))
}

pub fn webhook_attempts(p: pb::WebhookAttemptsRequest) -> Result<Request, CallError> {
    Ok(Request::Webhook(
        Method::WebhookAttempts,
        W::Attempts(webhook::AttemptsParams { message: p.message }),
    ))
}

pub fn webhook_replay(p: pb::WebhookReplayRequest) -> Result<Request, CallError> {
    Ok(Request::Webhook(
        Method::WebhookReplay,
        W::Replay(webhook::ReplayParams {
            endpoint: p.endpoint,
            message: p.message,
        }),
    ))
}

// ---------------------------------------------------------------------------------------
// Results

fn mismatch() -> Status {
    Status::internal("the method answered with another result")
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
        meta: d.meta.unwrap_or_default().into_iter().collect(),
        topics: d.topics.unwrap_or_default(),
        timezone: d.timezone,
        locale: d.locale,
        app: d.app,
    }
}

fn endpoint(e: webhook::WireEndpoint) -> pb::WebhookEndpoint {
    let definition = e.endpoint;
    pb::WebhookEndpoint {
        id: definition.id,
        url: definition.url,
        events: definition.events,
        channels: definition.channels,
        secrets: definition.secrets,
        enabled: definition.enabled,
        rate_limit: definition.rate_limit,
        ordered: definition.ordered,
        timeout: definition
            .timeout
            .map(|t| t.to_string())
            .unwrap_or_default(),
        description: definition.description,
        from_config: e.from_config,
        failing_since: e.failing_since.unwrap_or_default(),
        disabled: e.disabled.map(|d| pb::WebhookDisabled {
            at: d.at,
            reason: d.reason,
        }),
    }
}

pub fn push_status_result(reply: Reply) -> Result<pb::PushStatusResult, Status> {
    let Reply::Push(PushReply::PushStatus(list)) = reply else {
        return Err(mismatch());
    };
    Ok(pb::PushStatusResult {
        items: list
            .items
            .into_iter()
            .map(|s| pb::PushStatus {
                id: s.id,
                uid: s.uid,
                kind: s.kind,
                recipient: s.recipient,
                state: s.state.to_owned(),
                attempts: s.attempts,
                reason: s.reason,
                updated_at: signed(s.updated_at),
            })
            .collect(),
        next_cursor: list.next_cursor,
    })
}

pub fn device_removals_result(reply: Reply) -> Result<pb::DeviceRemovalsResult, Status> {
    let Reply::Push(PushReply::DeviceRemovals(list)) = reply else {
        return Err(mismatch());
    };
    Ok(pb::DeviceRemovalsResult {
        items: list
            .items
            .into_iter()
            .map(|r| pb::DeviceRemoval {
                device: Some(device(r.device)),
                reason: r.reason,
                removed_at: signed(r.removed_at),
            })
            .collect(),
        next_cursor: list.next_cursor,
    })
}

pub fn endpoint_result(reply: Reply) -> Result<pb::WebhookEndpointResult, Status> {
    let Reply::Webhook(WebhookReply::Endpoint(result)) = reply else {
        return Err(mismatch());
    };
    Ok(pb::WebhookEndpointResult {
        endpoint: Some(endpoint(result.endpoint)),
    })
}

pub fn endpoint_delete_result(reply: Reply) -> Result<pb::WebhookEndpointDeleteResult, Status> {
    let Reply::Webhook(WebhookReply::Nothing(_)) = reply else {
        return Err(mismatch());
    };
    Ok(pb::WebhookEndpointDeleteResult {})
}

pub fn endpoint_list_result(reply: Reply) -> Result<pb::WebhookEndpointListResult, Status> {
    let Reply::Webhook(WebhookReply::Endpoints(list)) = reply else {
        return Err(mismatch());
    };
    Ok(pb::WebhookEndpointListResult {
        items: list.items.into_iter().map(endpoint).collect(),
    })
}

pub fn deliveries_result(reply: Reply) -> Result<pb::WebhookDeliveriesResult, Status> {
    let Reply::Webhook(WebhookReply::Deliveries(list)) = reply else {
        return Err(mismatch());
    };
    Ok(pb::WebhookDeliveriesResult {
        items: list
            .items
            .into_iter()
            .map(|d| pb::WebhookDelivery {
                message: d.message,
                job: d.job,
                event: d.event,
                endpoint: d.endpoint,
                state: d.state.to_owned(),
                attempts: d.attempts,
                reason: d.reason,
                updated_at: d.updated_at,
            })
            .collect(),
        next_cursor: list.next_cursor,
    })
}

pub fn attempts_result(reply: Reply) -> Result<pb::WebhookAttemptsResult, Status> {
    let Reply::Webhook(WebhookReply::Attempts(list)) = reply else {
        return Err(mismatch());
    };
    Ok(pb::WebhookAttemptsResult {
        items: list
            .items
            .into_iter()
            .map(|a| pb::WebhookAttempt {
                message: a.message,
                endpoint: a.endpoint,
                attempt: a.attempt,
                at: a.at,
                status: u32::from(a.status),
                duration_ms: a.duration_ms,
                error: a.error,
            })
            .collect(),
    })
}

pub fn replay_result(reply: Reply) -> Result<pb::WebhookReplayResult, Status> {
    let Reply::Webhook(WebhookReply::Replay(result)) = reply else {
        return Err(mismatch());
    };
    Ok(pb::WebhookReplayResult {
        replayed: result.replayed,
    })
}
