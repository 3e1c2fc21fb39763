//! The HTTP application: routes, the shared state handlers use (built by [`crate::build`])
//! and the serve loop with graceful shutdown.
//!
//! Routes: `/health` (process is up), `/ready` (accepting work), `/metrics` (Prometheus),
//! `/api/openapi.json`, and `POST /api/{method}` (see [`crate::api`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_core::Node;
use tokio::net::TcpListener;

use herald_transport::poll::poll_handler;
use herald_transport::realtime::RealtimeState;
use herald_transport::sse::sse_handler;
use herald_transport::stream::stream_handler;
use herald_transport::uniws::uni_websocket_handler;
use herald_transport::ws::websocket_handler;

use crate::auth::ApiKeys;
use crate::config::Config;
use crate::jwt::TokenVerifier;
use crate::metrics::Metrics;
use crate::origin::{OriginPolicy, check_origin};

/// Everything a request handler may use.
#[derive(Debug)]
pub struct AppState {
    pub node: Node,
    /// The other nodes, with `storage.engine = "redis"`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    pub config: Config,
    /// Replaced whole on reload (SIGHUP), so rotation needs no restart.
    pub api_keys: parking_lot::RwLock<ApiKeys>,
    /// `publish`/`broadcast` calls per API key name (`api.publish_rate_per_key`).
    pub publish_rate: herald_core::rate::KeyedLimiter<String>,
    pub metrics: Metrics,
    /// Real-time connections' shared state.
    pub realtime: Arc<RealtimeState>,
    /// False before serving starts and once shutdown begins (set by [`crate::Server::run`]).
    pub ready: AtomicBool,
    /// HTTPS/WSS, when `server.tls_*` are set (reloaded on SIGHUP).
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The token verifier (also the real-time authenticator), for revocations.
    pub tokens: Arc<TokenVerifier>,
    /// `server.trusted_proxies`: whose forwarded header names the client.
    pub proxy_trust: Arc<crate::forwarded::ProxyTrust>,
    /// Push notifications, with `[push] enabled = true`.
    pub push: Option<Arc<crate::push::PushRuntime>>,
    /// `[[sources]]`: brokers and outbox tables consumed into channels.
    pub sources: crate::bridge::Sources,
    /// Webhooks, with `[webhooks] enabled = true`.
    pub webhooks: Option<Arc<crate::webhook::WebhookRuntime>>,
    /// The one outbound queue and the stores beside it, when push or webhooks are on.
    pub outbound: Option<crate::outbound::OutboundStores>,
    /// Delivery of publications to brokers, with enabled `[[sinks]]`.
    pub sinks: Option<Arc<crate::sink::SinkRuntime>>,
    /// The MQTT listener, with `[mqtt] enabled = true`.
    pub mqtt: Option<crate::mqtt::MqttRuntime>,
}

/// The OpenAPI document of the server API (also at `docs/openapi.json`).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

pub fn router(state: Arc<AppState>) -> Router {
    let grpc_enabled = state.config.grpc_api.enabled;
    let grpc_state = state.clone();
    let timeout = state.config.server.request_timeout.as_duration();
    let realtime = Router::new()
        .route("/connection/websocket", get(websocket_handler))
        .route("/connection/sse", get(sse_handler))
        .route("/connection/stream", get(stream_handler))
        .route("/connection/poll", get(poll_handler))
        .route("/connection/uni_websocket", get(uni_websocket_handler))
        .with_state(state.realtime.clone())
        .layer(axum::middleware::from_fn_with_state(
            OriginPolicy::realtime(&state.config.client.allowed_origins),
            check_origin,
        ));
    // MQTT over WebSocket, with `[mqtt] websocket_path` (behind the same origin check).
    let mqtt = state
        .mqtt
        .as_ref()
        .filter(|mqtt| !mqtt.state.config.websocket_path.is_empty())
        .map(|mqtt| {
            Router::new()
                .route(
                    &mqtt.state.config.websocket_path,
                    get(herald_transport::mqtt::websocket::mqtt_websocket_handler),
                )
                .with_state(mqtt.state.clone())
                .layer(axum::middleware::from_fn_with_state(
                    OriginPolicy::realtime(&state.config.client.allowed_origins),
                    check_origin,
                ))
        });
    let api = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/openapi.json", get(openapi))
        .route(
            "/client/vapid_public_key",
            get(crate::push::client::vapid_public_key),
        )
        .route(
            "/client/{method}",
            post(crate::push::client::handle).fallback(method_not_allowed),
        )
        .route(
            "/api/{method}",
            post(crate::api::handle).fallback(method_not_allowed),
        )
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            OriginPolicy::api(&state.config.api.cors_origins),
            check_origin,
        ))
        .with_state(state);
    // Real-time connections live long: the request timeout applies to the API only.
    let router = api.merge(realtime);
    let router = match mqtt {
        Some(mqtt) => router.merge(mqtt),
        None => router,
    };
    // gRPC answers its own errors (as statuses) and is not a browser API: outside the
    // timeout and origin layers.
    let router = if grpc_enabled {
        router.merge(crate::grpc::router(grpc_state))
    } else {
        router
    };
    router.fallback(not_found)
}

async fn health() -> Response {
    crate::api::json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let status = if !state.ready.load(Ordering::Relaxed) {
        "shutting down"
    } else if !state.node.engine_healthy() {
        "engine unreachable"
    } else {
        return crate::api::json_response(StatusCode::OK, &serde_json::json!({"status": "ready"}));
    };
    crate::api::json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({ "status": status }),
    )
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let info = state.node.info();
    #[cfg(feature = "redis")]
    if let Some(cluster) = &state.cluster {
        let (reconnects, healed, unrecoverable) = cluster.engine.pubsub_totals();
        state
            .metrics
            .record_cluster(&crate::metrics::ClusterCounters {
                healthy: state.node.engine_healthy(),
                unreachable_errors: cluster.engine.shards().errors() as u64,
                reconnects,
                healed,
                unrecoverable,
            });
    }
    if let Some(outbound) = &state.outbound {
        match outbound.queue.due(herald_core::time::now_ms()).await {
            Ok(due) => state.metrics.record_outbound_due(&due),
            Err(error) => tracing::warn!(%error, "reading the outbound queue's lag failed"),
        }
    }
    if let Some(push) = &state.push {
        state.metrics.record_push(push.service.stats());
    }
    if let Some(webhooks) = &state.webhooks {
        state.metrics.record_webhooks(webhooks.stats());
    }
    if let Some(sinks) = &state.sinks {
        let backlogs = sinks.backlogs().await;
        state.metrics.record_sinks(sinks, &backlogs);
    }
    state.metrics.record_sources(&state.sources.stats());
    let body = state
        .metrics
        .render(state.node.stats(), &state.realtime, info.num_channels);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn method_not_allowed() -> Response {
    crate::api::ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        herald_core::ErrorCode::BadRequest,
        "the server API accepts POST only",
    )
    .into_response()
}

async fn not_found() -> Response {
    crate::api::ApiError::new(
        StatusCode::NOT_FOUND,
        herald_core::ErrorCode::MethodNotFound,
        "no such route",
    )
    .into_response()
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish.
/// Connection limits (`[server] max_connections…`) apply before any request is read. The
/// server's life around this (readiness, the shutdown delay, draining, flushing) is
/// [`crate::Server::run`].
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = router(state.clone());
    let gate = crate::listener::Gate::new(state.config.server.connection_limits());
    let metrics_state = state.clone();
    crate::listener::serve_connections(
        listener,
        app,
        gate,
        state.proxy_trust.clone(),
        state.tls.clone(),
        Arc::new(move |reason| metrics_state.metrics.connection_refused(reason)),
        shutdown,
    )
    .await;
}
