//! The server API as one typed layer: methods named once ([`Method`]), requests and results
//! typed ([`Request`], [`Reply`]), errors as codes with a [`Fault`] saying what kind of
//! failure it is — never an HTTP status — and key scopes and the publish rate decided here
//! ([`admit`]). The adapters are thin: [`http`] (`POST /api/<method>`, Centrifugo's HTTP API
//! shape) and [`crate::grpc`] (Centrifugo's `CentrifugoApi` gRPC service) decode their wire
//! format into a [`Request`], call [`admit`] and [`execute`] (or [`call`], both in one), and
//! encode the [`Reply`] or [`CallError`] back.
//!
//! Method bodies: the core ones in [`methods`], push in [`crate::push::api`], webhooks in
//! [`crate::webhook::api`]; they only call the node facade and the services in the app state.
//!
//! May touch: the app state (node facade, publish rate limiter, API keys) it is given.

pub mod http;
pub mod method;
pub mod methods;
pub mod request;
pub mod types;

use herald_core::error::{ErrorCode, HeraldError};
use serde::Serialize;
use serde::ser::SerializeMap;

pub(crate) use http::read_body;
pub use http::{ApiError, handle, json_response};
pub use method::Method;
pub use request::{BatchCommand, BatchRequest, BatchResult, Reply, Request};

use crate::app::AppState;
use crate::auth::{ApiKeys, KeyMatch};

/// What kind of failure a [`CallError`] is; each adapter maps it to its own status (HTTP
/// status code, gRPC status or the response's `error` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The method ran (or checked its parameters) and failed: the error is the answer.
    Method,
    /// The request could not be decoded (malformed JSON, a wrong type, an unknown field).
    Malformed,
    /// The request or the publication in it is over a size limit.
    TooLarge,
    /// No API key, or not a valid one.
    Unauthenticated,
    /// No such method.
    UnknownMethod,
    /// The key's scope does not allow the method.
    OutOfScope,
    /// Over `api.publish_rate_per_key`.
    RateLimited,
}

/// A failed call: the error (code, detail) and its kind.
#[derive(Debug)]
pub struct CallError {
    pub fault: Fault,
    pub error: HeraldError,
}

impl From<HeraldError> for CallError {
    fn from(error: HeraldError) -> Self {
        Self {
            fault: Fault::Method,
            error,
        }
    }
}

impl CallError {
    pub fn new(fault: Fault, code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            fault,
            error: HeraldError::new(code, detail),
        }
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(Fault::TooLarge, ErrorCode::LimitExceeded, detail)
    }
}

/// Parameters that do not decode.
pub fn malformed(err: &dyn std::fmt::Display) -> CallError {
    CallError::new(
        Fault::Malformed,
        ErrorCode::BadRequest,
        format!("malformed JSON: {err}"),
    )
}

pub fn unknown_method(name: &str) -> CallError {
    CallError::new(
        Fault::UnknownMethod,
        ErrorCode::MethodNotFound,
        format!("no API method {name:?}"),
    )
}

/// The body every error has on the wire: `{code, message, detail}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub code: u32,
    pub message: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl From<&HeraldError> for ErrorBody {
    fn from(error: &HeraldError) -> Self {
        Self {
            code: error.code.as_u32(),
            message: error.code.message(),
            detail: error.detail.clone(),
        }
    }
}

/// Checks the key a request presents; `how` tells a caller without one how to send it.
pub fn authenticate(
    keys: &ApiKeys,
    presented: Option<&str>,
    how: &str,
) -> Result<KeyMatch, CallError> {
    match presented {
        None => Err(CallError::new(
            Fault::Unauthenticated,
            ErrorCode::Unauthorized,
            format!("missing API key: {how}"),
        )),
        Some(key) => keys.verify(key).ok_or_else(|| {
            CallError::new(
                Fault::Unauthenticated,
                ErrorCode::Unauthorized,
                "invalid API key",
            )
        }),
    }
}

/// Whether `key` may call `method` now: its scope first, then (for `publish` and
/// `broadcast`) a token of `api.publish_rate_per_key`. The one place both are decided.
pub fn admit(state: &AppState, key: &KeyMatch, method: Method) -> Result<(), CallError> {
    if !method.allowed_for(key.scope) {
        return Err(CallError::new(
            Fault::OutOfScope,
            ErrorCode::PermissionDenied,
            format!(
                "the API key {:?} has the {} scope, which does not allow {:?}",
                key.name,
                key.scope,
                method.name()
            ),
        ));
    }
    if method.is_rate_limited()
        && !state
            .publish_rate
            .try_take(&*key.name, std::time::Instant::now())
    {
        return Err(CallError::new(
            Fault::RateLimited,
            ErrorCode::TooManyRequests,
            "over api.publish_rate_per_key for this key",
        ));
    }
    Ok(())
}

/// Whether the service behind `method` is on (`[push]`, `[webhooks]`): answered before the
/// parameters are decoded, so a client of a switched-off service learns that first (108).
pub fn available(state: &AppState, method: Method) -> Result<(), CallError> {
    match method.service() {
        method::Service::Push if state.push.is_none() => {
            Err(crate::push::api::not_enabled().into())
        }
        method::Service::Webhooks if state.webhooks.is_none() => {
            Err(crate::webhook::api::not_enabled().into())
        }
        _ => Ok(()),
    }
}

/// [`admit`], then [`execute`].
pub async fn call(state: &AppState, key: &KeyMatch, request: Request) -> Result<Reply, CallError> {
    admit(state, key, request.method())?;
    available(state, request.method())?;
    execute(state, key, request).await
}

/// Most commands accepted in one batch.
pub const MAX_BATCH_COMMANDS: usize = 1000;

/// Runs an admitted request. A batch admits each of its commands on its own with `key`.
pub async fn execute(
    state: &AppState,
    key: &KeyMatch,
    request: Request,
) -> Result<Reply, CallError> {
    match request {
        Request::Batch(batch) => batch_of(state, key, batch).await.map(Reply::Batch),
        other => execute_one(state, other).await,
    }
}

/// Runs one method. Boxed: the methods' futures are deep, and every adapter and `batch`
/// await this one type instead of nesting them all (the compiler's query depth, and stack).
fn execute_one(
    state: &AppState,
    request: Request,
) -> futures::future::BoxFuture<'_, Result<Reply, CallError>> {
    Box::pin(execute_method(state, request))
}

async fn execute_method(state: &AppState, request: Request) -> Result<Reply, CallError> {
    Ok(match request {
        Request::Publish(p) => return methods::publish(state, p).await,
        Request::Broadcast(p) => return methods::broadcast(state, p).await,
        Request::History(p) => methods::history(state, p).await?,
        Request::HistoryRemove(p) => methods::history_remove(state, p).await?,
        Request::Presence(p) => methods::presence(state, p).await?,
        Request::PresenceStats(p) => methods::presence_stats(state, p).await?,
        Request::Channels(p) => methods::channels(state, p).await?,
        Request::Info(_) => methods::info(state).await?,
        Request::Disconnect(p) => methods::disconnect(state, p).await?,
        Request::Unsubscribe(p) => methods::unsubscribe(state, p).await?,
        Request::RevokeToken(p) => methods::revoke_token(state, p).await?,
        Request::InvalidateUserTokens(p) => methods::invalidate_user_tokens(state, p).await?,
        Request::Push(_, p) => Reply::Push(crate::push::api::call(state, p).await?),
        Request::Webhook(_, p) => Reply::Webhook(crate::webhook::api::call(state, p).await?),
        Request::Batch(_) => return Err(unknown_method("batch")),
    })
}

async fn batch_of(
    state: &AppState,
    key: &KeyMatch,
    batch: BatchRequest,
) -> Result<BatchResult, CallError> {
    if batch.commands.len() > MAX_BATCH_COMMANDS {
        return Err(HeraldError::new(
            ErrorCode::LimitExceeded,
            format!("a batch holds at most {MAX_BATCH_COMMANDS} commands"),
        )
        .into());
    }
    let run = |command: BatchCommand| run_command(state, key, command);
    let replies = if batch.parallel {
        futures::future::join_all(batch.commands.into_iter().map(run)).await
    } else {
        let mut replies = Vec::with_capacity(batch.commands.len());
        for command in batch.commands {
            replies.push(run(command).await);
        }
        replies
    };
    Ok(BatchResult { replies })
}

/// One batch command: admitted on its own (scope, publish rate), then run.
async fn run_command(
    state: &AppState,
    key: &KeyMatch,
    command: BatchCommand,
) -> Result<(Method, Reply), HeraldError> {
    if let Some(method) = command.method {
        admit(state, key, method).map_err(|e| e.error)?;
        available(state, method).map_err(|e| e.error)?;
    }
    let request = command.request?;
    let method = request.method();
    match execute_one(state, request).await {
        Ok(reply) => Ok((method, reply)),
        Err(err) => Err(err.error),
    }
}

/// `{"replies": [{"<method>": result} | {"error": {...}}, ...]}`.
impl Serialize for BatchResult {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct One<'a>(&'a Result<(Method, Reply), HeraldError>);
        impl Serialize for One<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(1))?;
                match self.0 {
                    Ok((method, reply)) => map.serialize_entry(method.name(), reply)?,
                    Err(error) => map.serialize_entry("error", &ErrorBody::from(error))?,
                }
                map.end()
            }
        }
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry("replies", &self.replies.iter().map(One).collect::<Vec<_>>())?;
        map.end()
    }
}
