//! What the one-way transports (SSE, HTTP streaming, long-poll and the uni-directional
//! WebSocket) share: reading the token and channel list from a plain HTTP request, the
//! resume cursor that encodes a position per channel, and a subscription set that is
//! admitted through the one admission path ([`herald_core::admission`]), recovers from a
//! cursor through the one subscribe-with-recovery step ([`crate::subscription`]) and cleans
//! itself up when the response is dropped.
//!
//! The cursor is `offset:epoch` per channel, in the order the channels appear in the URL,
//! joined by `,` (epochs are alphanumeric, so the separators are unambiguous). A client that
//! reconnects with the same URL and the last cursor it saw resumes every channel at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use herald_core::admission::{Refusal, SubscribeAsk, SubscriptionProof};
use herald_core::auth::{self, Credentials, SubscriptionGrant};
use herald_core::hub::SubscriberId;
use herald_core::namespace::NamespaceOptions;
use herald_core::proxy::ProxyContext;
use herald_core::publication::{ClientInfo, StreamPosition};
use herald_core::{ChannelName, ErrorCode, HeraldError, Publication};
use serde::Serialize;

use crate::outbound::{CloseReason, EventEncoder, Frame, Outbound};
use crate::realtime::RealtimeState;
use crate::realtime::expiry;
use crate::subscription::{StartFrom, subscribe_with_recovery};

/// Most channels one one-way connection may follow.
pub const MAX_CHANNELS: usize = 64;

/// A JSON error response for a request refused before streaming starts.
pub fn error_response(status: StatusCode, error: &HeraldError) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        code: u32,
        message: &'a str,
        #[serde(skip_serializing_if = "str::is_empty")]
        detail: &'a str,
    }
    let body = Body {
        code: error.code.as_u32(),
        message: error.code.message(),
        detail: &error.detail,
    };
    let text = serde_json::json!({ "error": body }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// The HTTP answer to a refused one-way request: Herald's own refusals by their code, a
/// backend's refusal (its code and message) or disconnect as 403, a backend that could not be
/// asked as 503 (temporary: try again).
pub fn refusal_response(refusal: &Refusal) -> Response {
    match refusal {
        Refusal::Denied(error) => error_response(status_for(error), error),
        other => {
            let status = if other.temporary() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::FORBIDDEN
            };
            let body = serde_json::json!({ "error": {
                "code": other.code(),
                "message": other.message(),
                "temporary": other.temporary(),
            }});
            (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
    }
}

fn status_for(error: &HeraldError) -> StatusCode {
    match error.code {
        ErrorCode::Unauthorized | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::UnknownChannel => StatusCode::NOT_FOUND,
        ErrorCode::LimitExceeded => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnrecoverablePosition | ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The parsed request of a one-way transport.
#[derive(Debug, Default)]
pub struct OneWayRequest {
    /// The transport's name, as the backend proxy sees it (`sse`, `http_stream`, …).
    pub transport: &'static str,
    /// The request headers the backend proxy is configured to see.
    pub proxy_headers: Vec<(String, String)>,
    pub token: Option<String>,
    pub channels: Vec<String>,
    /// Subscription tokens, each for one of `channels` (its `channel` claim says which).
    pub sub_tokens: Vec<String>,
    /// A resume cursor from `Last-Event-ID` or `?since=`.
    pub cursor: Option<String>,
}

impl OneWayRequest {
    /// [`Self::from_parts`] for a transport named `transport` (as the backend proxy sees
    /// it), keeping the headers `state` passes on to the backend.
    pub fn read(
        transport: &'static str,
        state: &RealtimeState,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Self {
        Self {
            transport,
            proxy_headers: state.proxy_headers(headers),
            ..Self::from_parts(query, headers)
        }
    }

    /// Reads `channel` (repeatable) or `channels=a,b`, `token`, `sub_token` (repeatable) and
    /// `since` from the query, the token also from `Authorization: Bearer` or the
    /// `herald_token` cookie, and the cursor also from `Last-Event-ID`.
    pub fn from_parts(query: Option<&str>, headers: &HeaderMap) -> Self {
        let mut request = Self::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "channel" => request.channels.push(value.into_owned()),
                "channels" => request.channels.extend(
                    value
                        .split(',')
                        .filter(|c| !c.is_empty())
                        .map(str::to_owned),
                ),
                "token" => request.token = Some(value.into_owned()),
                "sub_token" => request.sub_tokens.push(value.into_owned()),
                "since" => request.cursor = Some(value.into_owned()),
                _ => {}
            }
        }
        if let Some(bearer) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
        {
            request.token = Some(bearer.trim().to_owned());
        }
        if request.token.is_none()
            && let Some(cookie) = headers.get(header::COOKIE).and_then(|v| v.to_str().ok())
        {
            request.token = cookie
                .split(';')
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(name, _)| *name == "herald_token")
                .map(|(_, value)| value.to_owned());
        }
        if let Some(last) = headers.get("last-event-id").and_then(|v| v.to_str().ok())
            && !last.is_empty()
        {
            request.cursor = Some(last.to_owned());
        }
        request
    }
}

/// Parses a cursor for `count` channels.
pub fn parse_cursor(text: &str, count: usize) -> Result<Vec<StreamPosition>, HeraldError> {
    let positions: Vec<StreamPosition> = text
        .split(',')
        .map(|part| {
            let (offset, epoch) = part.split_once(':').ok_or(())?;
            let offset = offset.parse::<u64>().map_err(|_| ())?;
            if !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(());
            }
            Ok(StreamPosition::new(offset, epoch))
        })
        .collect::<Result<_, ()>>()
        .map_err(|_| {
            HeraldError::bad_request(format!(
                "malformed resume cursor {text:?}: expected offset:epoch per channel, joined by ','"
            ))
        })?;
    if positions.len() != count {
        return Err(HeraldError::bad_request(format!(
            "the resume cursor has {} positions for {count} channels; reconnect with the same channel list",
            positions.len()
        )));
    }
    Ok(positions)
}

/// Formats positions as a cursor.
pub fn format_cursor(positions: &[(Arc<str>, u64, Arc<str>)]) -> String {
    let mut out = String::with_capacity(positions.len() * 16);
    for (i, (_, offset, epoch)) in positions.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&offset.to_string());
        out.push(':');
        out.push_str(epoch);
    }
    out
}

/// One channel of a one-way connection after it was set up.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelStart {
    pub offset: u64,
    pub epoch: String,
    /// True when the publications missed since the cursor follow; false when they cannot be
    /// told (the client must refetch state). Absent when the client sent no cursor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

struct Registered {
    name: ChannelName,
    options: Arc<NamespaceOptions>,
    id: SubscriberId,
    /// The client as this channel's presence shows it (with the subscription token's
    /// `info` as `chan_info`, when it had one).
    info: Arc<ClientInfo>,
}

/// Subscriptions of one one-way connection; unsubscribes everything when dropped.
pub struct OneWaySession {
    pub state: Arc<RealtimeState>,
    pub outbound: Arc<Outbound>,
    pub info: Arc<ClientInfo>,
    /// When the token expires (Unix seconds); the stream ends with 3005 then.
    pub expires_at: Option<u64>,
    registered: Vec<Registered>,
    /// In the registry while the session lives (server API disconnects reach it).
    _registration: Option<Box<crate::realtime::ClientRegistration>>,
}

impl Drop for OneWaySession {
    fn drop(&mut self) {
        let node = self.state.node.clone();
        let registered = std::mem::take(&mut self.registered);
        self.state.connections.fetch_sub(1, Ordering::Relaxed);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for sub in registered {
                    crate::subscription::end_subscription(
                        &node,
                        &sub.name,
                        &sub.options,
                        sub.id,
                        Some(sub.info),
                    )
                    .await;
                }
            });
        }
    }
}

/// Recoveries waiting for the transport to queue its opening frame first: channel, the
/// recovered publications' frames, the last recovered offset, the channel's encoder.
pub type PendingRecovery = (Arc<str>, Vec<Frame>, u64, Arc<dyn EventEncoder>);

/// The outcome of [`OneWaySession::start`]: the session, the starting cursor positions and
/// each channel's start, in URL order. Live events stay held until [`Started::release`].
pub struct Started {
    pub session: OneWaySession,
    pub positions: Vec<(Arc<str>, u64, Arc<str>)>,
    pub starts: Vec<(String, ChannelStart)>,
    pending: Vec<PendingRecovery>,
}

impl Started {
    /// Queues each channel's recovered publications, then its held live events, and lets
    /// live events flow. Call after queueing the transport's opening frame.
    pub fn release(&mut self) {
        for (channel, frames, last, encoder) in self.pending.drain(..) {
            self.session
                .outbound
                .finish_recovery(&channel, frames, last, &*encoder);
        }
    }
}

impl OneWaySession {
    /// Authenticates, admits every channel through the one admission path, subscribes and
    /// recovers from the cursor. `encode_recovered` turns a recovered publication into a
    /// frame. Errors are HTTP responses meant to be returned as they are.
    pub async fn start(
        state: Arc<RealtimeState>,
        request: OneWayRequest,
        encoder: impl Fn(&NamespaceOptions) -> Arc<dyn EventEncoder>,
        encode_recovered: impl Fn(&Arc<str>, &Arc<str>, &Publication) -> Frame,
    ) -> Result<Started, Response> {
        Self::try_start(state, request, encoder, encode_recovered)
            .await
            .map_err(|refusal| refusal_response(&refusal))
    }

    /// [`Self::start`] for transports that are already past their HTTP response (a
    /// WebSocket told its channels in its first message): refusals are returned as they are.
    pub async fn try_start(
        state: Arc<RealtimeState>,
        request: OneWayRequest,
        encoder: impl Fn(&NamespaceOptions) -> Arc<dyn EventEncoder>,
        encode_recovered: impl Fn(&Arc<str>, &Arc<str>, &Publication) -> Frame,
    ) -> Result<Started, Refusal> {
        let credentials = match &request.token {
            Some(token) => state.authenticator.authenticate(token).await?,
            None if state.config.allow_anonymous => Credentials::anonymous(),
            None => {
                return Err(HeraldError::new(
                    ErrorCode::Unauthorized,
                    "a token is required: Authorization: Bearer, ?token= or the herald_token cookie",
                )
                .into());
            }
        };
        if request.channels.is_empty() || request.channels.len() > MAX_CHANNELS {
            return Err(HeraldError::bad_request(format!(
                "name 1 to {MAX_CHANNELS} channels with ?channel="
            ))
            .into());
        }
        if request.sub_tokens.len() > request.channels.len() {
            return Err(HeraldError::bad_request("more subscription tokens than channels").into());
        }
        // Subscription tokens are verified first: each names the channel it is for.
        let mut proofs: HashMap<String, SubscriptionGrant> = HashMap::new();
        for token in &request.sub_tokens {
            let grant =
                auth::subscription_grant(&*state.authenticator, token, &credentials.user).await?;
            proofs.insert(grant.channel.clone(), grant);
        }
        let mut names: Vec<ChannelName> = Vec::with_capacity(request.channels.len());
        for channel in &request.channels {
            let (name, _) = state.node.resolve(channel)?;
            if names.contains(&name) {
                return Err(HeraldError::bad_request(format!(
                    "channel {channel:?} is listed twice"
                ))
                .into());
            }
            names.push(name);
        }
        if let Some(channel) = proofs
            .keys()
            .find(|channel| !names.iter().any(|name| name.as_str() == *channel))
        {
            return Err(HeraldError::bad_request(format!(
                "a subscription token is for channel {channel:?}, which is not requested"
            ))
            .into());
        }
        let info = Arc::new(ClientInfo {
            client: uuid::Uuid::new_v4().to_string(),
            user: credentials.user.clone(),
            conn_info: credentials.info.clone(),
            chan_info: None,
        });
        let context = ProxyContext {
            client: info.client.clone(),
            user: credentials.user.clone(),
            transport: request.transport,
            protocol: "json",
            headers: request.proxy_headers,
        };
        let mut admitted = Vec::with_capacity(names.len());
        // The stream ends (3005) when the first of its grants expires: a one-way client
        // cannot send `sub_refresh`, it reconnects with fresh tokens.
        let mut expires_at = credentials.expires_at;
        for name in &names {
            let proof = proofs
                .remove(name.as_str())
                .map_or(SubscriptionProof::None, SubscriptionProof::Verified);
            let ask = SubscribeAsk {
                credentials: &credentials,
                channel: name.as_str(),
                proof,
                data: None,
                context: &context,
            };
            let grant = state.admission().subscribe(ask).await?;
            expires_at = match (expires_at, grant.expires_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            admitted.push(grant);
        }
        let since = match &request.cursor {
            Some(text) => Some(parse_cursor(text, admitted.len())?),
            None => None,
        };
        state.connections.fetch_add(1, Ordering::Relaxed);
        let outbound = state.new_outbound();
        let registration = state.register(
            &info,
            request.transport,
            crate::registry::Control::new(outbound.clone(), None),
        );
        let mut session = OneWaySession {
            state: state.clone(),
            outbound: outbound.clone(),
            info,
            expires_at,
            registered: Vec::new(),
            _registration: registration,
        };
        let mut positions = Vec::with_capacity(admitted.len());
        let mut starts = Vec::with_capacity(admitted.len());
        let mut pending = Vec::with_capacity(admitted.len());
        for (index, admitted) in admitted.into_iter().enumerate() {
            let info = match admitted.chan_info.clone() {
                Some(chan_info) => Arc::new(ClientInfo {
                    chan_info: Some(chan_info),
                    ..(*session.info).clone()
                }),
                None => session.info.clone(),
            };
            let channel = admitted.name.as_arc().clone();
            let encoder = encoder(&admitted.options);
            let start = StartFrom {
                since: since.as_ref().map(|positions| positions[index].clone()),
                max_recovery: state.config.recovery_max_publications,
                max_recovery_bytes: state.config.max_recovery_bytes(),
                reject_unrecovered: false,
            };
            let subscribed = subscribe_with_recovery(
                &state.node,
                &outbound,
                &admitted,
                encoder.clone(),
                &start,
                Some(info.clone()),
            )
            .await?;
            session.registered.push(Registered {
                name: admitted.name.clone(),
                options: admitted.options.clone(),
                id: subscribed.id,
                info,
            });
            let last = subscribed.last_offset();
            // A recovered channel starts at the client's position (the recovered frames move
            // the cursor on); otherwise at the top.
            let (start_position, recovered) = match (subscribed.position, start.since) {
                (None, _) => (StreamPosition::default(), None),
                (Some(_), Some(since)) if subscribed.recovered == Some(true) => (since, Some(true)),
                (Some(top), _) => (top, subscribed.recovered),
            };
            let epoch: Arc<str> = Arc::from(start_position.epoch.as_str());
            let frames = subscribed
                .publications
                .iter()
                .map(|p| encode_recovered(&channel, &epoch, p))
                .collect();
            positions.push((channel.clone(), start_position.offset, epoch));
            starts.push((
                admitted.name.as_str().to_owned(),
                ChannelStart {
                    offset: start_position.offset,
                    epoch: start_position.epoch,
                    recovered,
                },
            ));
            pending.push((channel, frames, last, encoder));
        }
        Ok(Started {
            session,
            positions,
            starts,
            pending,
        })
    }
}

/// How a one-way stream frames what it writes.
pub trait Framing: Send + 'static {
    /// Queued frames as one chunk; `positions` is the connection's cursor, advanced by frames
    /// that carry a position.
    fn render(&self, frames: &[Frame], positions: &mut [(Arc<str>, u64, Arc<str>)]) -> Bytes;
    /// A keep-alive chunk.
    fn ping(&self) -> Bytes;
    /// The last chunk, saying why the server ends the stream.
    fn disconnect(&self, reason: CloseReason) -> Bytes;
}

struct OneWayStream<F> {
    session: OneWaySession,
    positions: Vec<(Arc<str>, u64, Arc<str>)>,
    ping: tokio::time::Interval,
    framing: F,
    done: bool,
}

impl<F: Framing> OneWayStream<F> {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let mut frames = Vec::new();
        let outbound = self.session.outbound.clone();
        let pings = !self.session.state.config.ping_interval.is_zero();
        let expires_at = self.session.expires_at;
        tokio::select! {
            result = outbound.drain(&mut frames) => match result {
                Ok(()) => Some(self.framing.render(&frames, &mut self.positions)),
                Err(reason) => {
                    self.done = true;
                    Some(self.framing.disconnect(reason))
                }
            },
            _ = self.ping.tick(), if pings => Some(self.framing.ping()),
            _ = self.session.state.shutdown.wait() => {
                self.done = true;
                Some(self.framing.disconnect(CloseReason::SHUTDOWN))
            }
            _ = expiry(expires_at), if expires_at.is_some() => {
                self.done = true;
                Some(self.framing.disconnect(CloseReason::EXPIRED))
            }
        }
    }
}

/// A streaming `200` response that writes the session's queue through `framing`, with pings,
/// until the client goes away (dropping the session unsubscribes it) or the server closes it.
pub fn streaming_response<F: Framing>(
    state: &RealtimeState,
    started: Started,
    framing: F,
) -> Response {
    let ping_every = if state.config.ping_interval.is_zero() {
        Duration::from_secs(25)
    } else {
        state.config.ping_interval
    };
    let stream = OneWayStream {
        session: started.session,
        positions: started.positions,
        ping: tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every),
        framing,
        done: false,
    };
    let body = Body::from_stream(futures::stream::unfold(stream, |mut stream| async move {
        let chunk = stream.next_chunk().await?;
        Some((Ok::<Bytes, Infallible>(chunk), stream))
    }));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
