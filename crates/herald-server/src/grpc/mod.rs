//! The server API over gRPC: Centrifugo's `CentrifugoApi` service (`proto/centrifugo/api.proto`,
//! package `centrifugal.centrifugo.api`), a thin adapter over the typed API layer
//! ([`crate::api`]), and beside it Herald's own methods that service has no rpc for,
//! `herald.api.HeraldApi` ([`herald_api`], `proto/herald/api.proto`); the server-streaming
//! subscription `CentrifugoUniStream.Consume` ([`unistream`],
//! `proto/centrifugo/unistream.proto`); the client protocol over a
//! bidirectional stream, `herald.stream.ClientStream.Connect` ([`bidi`],
//! `proto/herald/client_stream.proto`); `grpc.health.v1` health checking and server
//! reflection.
//!
//! Served on the HTTP listener itself (`[grpc_api] enabled = true`): gRPC is HTTP/2 with its
//! own paths (`/centrifugal.centrifugo.api.CentrifugoApi/<Method>`), which the listener
//! already speaks (h2c prior knowledge, and ALPN `h2` with TLS), so it shares the port, the
//! TLS certificate, the connection limits and the graceful shutdown without a second
//! listener to configure and secure. (Centrifugo uses a separate port; clients only need an
//! address.)
//!
//! Requests carry the API key in metadata (`authorization: apikey <KEY>`, or `x-api-key`);
//! scopes and the publish rate are the layer's, as on HTTP. A method that runs and fails
//! answers with the response's `error` field, as Centrifugo does; everything that is not the
//! method's answer is a gRPC status (see [`status`] and docs/grpc.md).
//!
//! May touch: the app state, through the API layer.

pub mod bidi;
pub mod codec;
mod convert;
mod herald_api;
mod herald_convert;
mod service;
pub mod unistream;

use std::sync::Arc;

use herald_core::error::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::api::{CallError, Fault};
use crate::app::AppState;

/// The code generated from `proto/` at build time (see `build.rs`).
pub mod proto {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("centrifugal.centrifugo.api");

    /// Every published `.proto`, encoded, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("herald_descriptor");
}

/// The code generated from `proto/centrifugo/unistream.proto`.
pub mod uniproto {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("centrifugal.centrifugo.unistream");
}

/// The code generated from `proto/herald/api.proto`: Herald's own API methods.
pub mod heraldproto {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("herald.api");
}

/// The code generated from `proto/herald/client_stream.proto` (its messages are
/// [`bidi::raw`]).
pub mod streamproto {
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("herald.stream");
}

/// The gRPC service name clients and health checks use.
pub const API_SERVICE: &str = "centrifugal.centrifugo.api.CentrifugoApi";
/// Herald's own API methods (`push_status`, `device_removals`, `webhook_*`).
pub const HERALD_API_SERVICE: &str = "herald.api.HeraldApi";
/// The server-streaming subscription service.
pub const UNI_STREAM_SERVICE: &str = "centrifugal.centrifugo.unistream.CentrifugoUniStream";
/// The bidirectional client-protocol stream.
pub const CLIENT_STREAM_SERVICE: &str = "herald.stream.ClientStream";

/// `[grpc_api]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcApiConfig {
    /// Serve the gRPC API (and health, reflection) on the HTTP listener.
    pub enabled: bool,
}

/// The gRPC routes, to merge into the HTTP router: the API (messages up to
/// `server.max_body_size`, like an HTTP API body), health and reflection.
pub fn router(state: Arc<AppState>) -> axum::Router {
    let limit = state.config.server.max_body_size;
    let realtime = state.realtime.clone();
    let state_for_health = state.clone();
    let herald_api = heraldproto::herald_api_server::HeraldApiServer::new(
        herald_api::HeraldApiService::new(state.clone()),
    )
    .max_decoding_message_size(limit);
    let api =
        proto::centrifugo_api_server::CentrifugoApiServer::new(service::ApiService::new(state))
            .max_decoding_message_size(limit);
    let stream = uniproto::centrifugo_uni_stream_server::CentrifugoUniStreamServer::new(
        unistream::UniStreamService::new(realtime.clone()),
    )
    .max_decoding_message_size(limit);
    // A command is a client message: the WebSocket's limit.
    let client_stream = streamproto::client_stream_server::ClientStreamServer::new(
        bidi::ClientStreamService::new(realtime.clone()),
    )
    .max_decoding_message_size(realtime.config.max_message_size);
    let (health, health_service) = tonic_health::server::health_reporter();
    // Not serving until the server is ready; then in step with `/ready` (see below).
    futures::executor::block_on(set_health(&health, false));
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(track_readiness(Arc::downgrade(&state_for_health), health));
    }
    let mut routes = tonic::service::Routes::new(api)
        .add_service(herald_api)
        .add_service(stream)
        .add_service(client_stream)
        .add_service(health_service);
    // Both reflection versions: grpcurl asks v1 first, older tools only know v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => routes = routes.add_service(v1).add_service(v1alpha),
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(%error, "gRPC reflection is off: the descriptors do not load")
        }
    }
    routes.into_axum_router()
}

/// The services health checks name (`""` is the server as a whole).
const HEALTH_SERVICES: [&str; 5] = [
    API_SERVICE,
    HERALD_API_SERVICE,
    UNI_STREAM_SERVICE,
    CLIENT_STREAM_SERVICE,
    "",
];

/// How often the health statuses are brought in step with readiness.
const READINESS_POLL: std::time::Duration = std::time::Duration::from_millis(200);

async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Keeps `grpc.health.v1` in step with `/ready`: SERVING while the server is ready and its
/// engine reachable; NOT_SERVING from the moment shutdown begins (during
/// `server.shutdown_delay`, so gRPC load balancers drain it too) and while the engine is
/// unreachable. Ends with the server (its state is only held weakly).
async fn track_readiness(
    state: std::sync::Weak<AppState>,
    health: tonic_health::server::HealthReporter,
) {
    let mut last = Some(false);
    loop {
        let Some(state) = state.upgrade() else { return };
        let serving =
            state.ready.load(std::sync::atomic::Ordering::Relaxed) && state.node.engine_healthy();
        drop(state);
        if last != Some(serving) {
            set_health(&health, serving).await;
            last = Some(serving);
        }
        tokio::time::sleep(READINESS_POLL).await;
    }
}

/// How long the call may last, from its `grpc-timeout` (at most 8 digits and a unit: `H`,
/// `M`, `S`, `m`, `u`, `n`); `None` without one or when it is malformed (the gRPC spec says
/// to ignore what cannot be parsed). The streams end with `DEADLINE_EXCEEDED` when it passes;
/// unary calls answer long before any deadline.
pub fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// What a failure that is not the method's own answer looks like to a gRPC client.
pub fn status(error: CallError) -> tonic::Status {
    let detail = error.error.detail;
    match error.fault {
        Fault::Unauthenticated => tonic::Status::unauthenticated(detail),
        Fault::OutOfScope => tonic::Status::permission_denied(detail),
        Fault::RateLimited => tonic::Status::resource_exhausted(detail),
        // What tonic itself answers for a message over the size limit: one code for "too big".
        Fault::TooLarge => tonic::Status::out_of_range(detail),
        Fault::Malformed => tonic::Status::invalid_argument(detail),
        Fault::UnknownMethod => tonic::Status::unimplemented(detail),
        Fault::Method if error.error.unavailable => tonic::Status::unavailable(detail),
        Fault::Method if error.error.code == ErrorCode::LimitExceeded => {
            tonic::Status::resource_exhausted(detail)
        }
        Fault::Method => tonic::Status::invalid_argument(detail),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::metadata::MetadataMap;

    use super::deadline;

    fn timeout(value: &str) -> Option<Duration> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().expect("ascii"));
        deadline(&metadata)
    }

    #[test]
    fn grpc_timeouts_in_every_unit_and_malformed_ones_ignored() {
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("15S"), Some(Duration::from_secs(15)));
        assert_eq!(timeout("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(
            timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(deadline(&MetadataMap::new()), None);
    }
}
