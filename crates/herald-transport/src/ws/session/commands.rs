//! The commands of a WebSocket session: connect, subscribe (with recovery and subscription
//! tokens), unsubscribe, publish, history, presence, refresh, sub_refresh and rpc, each
//! answered through the connection's queue.
//!
//! May touch: the node, the authenticator and the backend proxy (through `backend`).

use std::sync::Arc;
use std::time::Instant;

use herald_core::admission::{Admitted, Refusal, SubscribeAsk, SubscriptionProof};
use herald_core::auth::{self, Action, Credentials};
use herald_core::node::PublishRequest as NodePublish;
use herald_core::publication::{ClientInfo, StreamPosition};
use herald_core::store::HistoryQuery;
use herald_core::{ChannelName, ErrorCode, HeraldError};

use super::{FLAG_REJECT_UNRECOVERED, Session, Subscription, UNSUBSCRIBE_EXPIRED};
use crate::outbound::{CloseReason, EventEncoder, Frame};
use crate::registry::{Control, Inbox};
use crate::subscription::{StartFrom, subscribe_with_recovery};
use crate::ws::codec::PushEncoder;
use crate::ws::protocol::{
    self, Command, ResultBody, SubscribeRequest, SubscribeResult, WirePublication,
};

impl Session {
    /// A frame that does not decode (wrong frame type for the encoding, bad JSON or
    /// Protobuf) closes the connection as a bad request, after nothing in it was applied.
    pub(super) async fn handle_commands(
        &mut self,
        commands: Vec<Command>,
    ) -> Result<(), CloseReason> {
        for command in commands {
            self.handle_command(command).await?;
        }
        Ok(())
    }

    pub(super) fn reply_err(&self, id: u32, error: &HeraldError) {
        self.outbound.push(self.encoding.error(id, error));
    }

    pub(super) fn reply(&self, id: u32, body: ResultBody<'_>) {
        self.outbound.push(self.encoding.reply(id, &body));
    }

    /// The reply for `outcome`: its result, or its error.
    fn reply_with<T>(
        &self,
        id: u32,
        outcome: Result<T, HeraldError>,
        body: impl for<'r> FnOnce(&'r T) -> ResultBody<'r>,
    ) {
        match outcome {
            Ok(result) => self.reply(id, body(&result)),
            Err(error) => self.reply_err(id, &error),
        }
    }

    async fn handle_command(&mut self, command: Command) -> Result<(), CloseReason> {
        let id = command.id;
        if let Some(connect) = command.connect {
            return self.connect(id, connect).await;
        }
        if self.credentials.is_none() {
            // Anything but connect before connect is a protocol violation.
            return Err(CloseReason::BAD_REQUEST);
        }
        if id == 0 {
            // An empty command is the client's pong (and the only command without an id).
            self.pong_received = true;
            return Ok(());
        }
        if let Some(rate) = self.command_rate.as_mut()
            && !rate.try_take(Instant::now())
        {
            self.reply_err(
                id,
                &HeraldError::new(ErrorCode::TooManyRequests, "commands_per_second"),
            );
            return Ok(());
        }
        if let Some(request) = command.subscribe {
            if let Err(error) = self.subscribe(id, request).await {
                self.reply_err(id, &error);
            }
        } else if let Some(request) = command.unsubscribe {
            self.unsubscribe(&request.channel).await;
            self.reply(id, ResultBody::Unsubscribe);
        } else if let Some(request) = command.publish {
            self.publish(id, request).await;
        } else if let Some(request) = command.history {
            let outcome = self.history(request).await;
            self.reply_with(id, outcome, |r| ResultBody::History(r));
        } else if let Some(request) = command.presence {
            let outcome = match self.subscribed_for(&request.channel, Action::Presence) {
                Ok(name) => self.state.node.presence(name.as_str()).await,
                Err(error) => Err(error),
            }
            .map(|presence| protocol::PresenceResult { presence });
            self.reply_with(id, outcome, |r| ResultBody::Presence(r));
        } else if let Some(request) = command.presence_stats {
            let outcome = match self.subscribed_for(&request.channel, Action::Presence) {
                Ok(name) => self.state.node.presence_stats(name.as_str()).await,
                Err(error) => Err(error),
            }
            .map(|stats| protocol::PresenceStatsResult {
                num_clients: stats.num_clients,
                num_users: stats.num_users,
            });
            self.reply_with(id, outcome, |r| ResultBody::PresenceStats(r));
        } else if let Some(request) = command.refresh {
            match self.state.authenticator.authenticate(&request.token).await {
                Ok(credentials) if credentials.user == self.user() => {
                    let result = self.refresh_result(&credentials);
                    self.credentials = Some(credentials);
                    self.reply(id, ResultBody::Refresh(&result));
                }
                Ok(_) => return Err(CloseReason::INVALID_TOKEN),
                Err(error) if error.code == ErrorCode::TokenExpired => self.reply_err(id, &error),
                Err(_) => return Err(CloseReason::INVALID_TOKEN),
            }
        } else if let Some(request) = command.rpc {
            let builtin = self
                .state
                .client_methods
                .clone()
                .filter(|methods| methods.handles(&request.method));
            if let Some(methods) = builtin {
                let caller = herald_core::client_methods::Caller {
                    user: self.user().to_string(),
                    client: self.client_id.clone(),
                };
                let outcome = methods
                    .call(&caller, &request.method, request.data.as_ref())
                    .await
                    .map(|data| protocol::RpcResult { data: Some(data) });
                self.reply_with(id, outcome, |r| ResultBody::Rpc(r));
            } else if self.state.proxy.as_ref().is_some_and(|p| p.handles_rpc()) {
                self.rpc_via_backend(id, request).await;
            } else {
                self.reply_err(
                    id,
                    &HeraldError::new(ErrorCode::NotAvailable, "no RPC backend is configured"),
                );
            }
        } else if let Some(request) = command.sub_refresh {
            let outcome = self.sub_refresh(request).await;
            self.reply_with(id, outcome, |r| ResultBody::SubRefresh(r));
        } else if command.send.is_some() || command.ping.is_some() {
            // Async messages have no reply and nowhere to go without an RPC backend.
        } else {
            self.reply_err(
                id,
                &HeraldError::new(ErrorCode::MethodNotFound, "unknown command"),
            );
        }
        Ok(())
    }

    pub(super) fn user(&self) -> &str {
        self.credentials.as_ref().map_or("", |c| c.user.as_str())
    }

    fn refresh_result(&self, credentials: &Credentials) -> protocol::RefreshResult {
        let (expires, ttl) = ttl_of(credentials);
        protocol::RefreshResult {
            client: self.client_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            expires,
            ttl,
        }
    }

    async fn connect(
        &mut self,
        id: u32,
        request: protocol::ConnectRequest,
    ) -> Result<(), CloseReason> {
        if self.credentials.is_some() {
            return Err(CloseReason::BAD_REQUEST);
        }
        let proxy_connect = self
            .state
            .proxy
            .as_ref()
            .is_some_and(|p| p.handles_connect());
        let mut connect_data = None;
        let credentials = if request.token.is_empty() && proxy_connect {
            match self.connect_via_backend(id, &request).await {
                Some((credentials, data)) => {
                    connect_data = data;
                    credentials
                }
                // Refused: the reply (or close) is queued; the client may try again.
                None => return Ok(()),
            }
        } else if request.token.is_empty() {
            if !self.state.config.allow_anonymous {
                self.reply_err(
                    id,
                    &HeraldError::new(ErrorCode::Unauthorized, "a connection token is required"),
                );
                return Err(CloseReason::INVALID_TOKEN);
            }
            Credentials::anonymous()
        } else {
            match self.state.authenticator.authenticate(&request.token).await {
                Ok(credentials) => credentials,
                Err(error) if error.code == ErrorCode::TokenExpired => {
                    // The SDK refreshes its token and reconnects on this error.
                    self.reply_err(id, &error);
                    return Ok(());
                }
                Err(_) => return Err(CloseReason::INVALID_TOKEN),
            }
        };
        let (expires, ttl) = ttl_of(&credentials);
        self.info = Some(Arc::new(ClientInfo {
            client: self.client_id.clone(),
            user: credentials.user.clone(),
            conn_info: credentials.info.clone(),
            chan_info: None,
        }));
        let server_side = credentials.channels.clone();
        // Only named users can be reached by the server API: anonymous connections get no
        // inbox (and no registry entry).
        let inbox = (!credentials.is_anonymous()).then(|| Arc::new(Inbox::default()));
        if let Some(info) = &self.info {
            self.registration = self.state.register(
                info,
                self.transport,
                Control::new(self.outbound.clone(), inbox.clone()),
            );
        }
        self.control = inbox;
        self.credentials = Some(credentials);
        let config = &self.state.config;
        let mut result = protocol::ConnectResult {
            client: self.client_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            expires,
            ttl,
            ping: u32::try_from(config.ping_interval.as_secs()).unwrap_or(u32::MAX),
            pong: !config.ping_interval.is_zero(),
            data: connect_data,
            ..Default::default()
        };
        // Server-side subscriptions from the token, answered inside the connect reply.
        let mut held = Vec::new();
        for channel in server_side {
            let recover = request.subs.get(&channel);
            let sub = SubscribeRequest {
                channel: channel.clone(),
                recover: recover.is_some_and(|r| r.recover),
                offset: recover.map_or(0, |r| r.offset),
                epoch: recover.map(|r| r.epoch.clone()).unwrap_or_default(),
                ..Default::default()
            };
            let context = self.proxy_context();
            let ask = SubscribeAsk {
                credentials: self.credentials(),
                channel: &channel,
                proof: SubscriptionProof::None,
                data: None,
                context: &context,
            };
            let prepared = match self.state.admission().subscribe(ask).await {
                Ok(admitted) => self
                    .prepare_subscription(&sub, admitted)
                    .await
                    .map_err(Refusal::Denied),
                Err(refusal) => Err(refusal),
            };
            match prepared {
                Ok((name, sub_result, last)) => {
                    result.subs.insert(channel, sub_result);
                    held.push((name, last));
                }
                Err(refusal) => {
                    tracing::debug!(channel, ?refusal, "server-side subscription refused");
                }
            }
        }
        // The connect reply carries every server-side subscription's recovered publications;
        // each channel's held live events follow it.
        let mut reply = Some(self.encoding.reply(id, &ResultBody::Connect(&result)));
        for (name, last) in held {
            let encoder = self.encoder_for(&name);
            let replies = reply.take().map(Frame::from).into_iter().collect();
            self.outbound
                .finish_recovery(name.as_arc(), replies, last, &*encoder);
        }
        if let Some(reply) = reply {
            self.outbound.push(reply);
        }
        Ok(())
    }

    pub(super) fn encoder_for(&self, name: &ChannelName) -> Arc<dyn EventEncoder> {
        let join_leave = self
            .subscriptions
            .get(name.as_str())
            .is_some_and(|s| s.options.join_leave);
        PushEncoder::shared(self.encoding, join_leave)
    }

    /// Decides a subscription through the one admission path. `None`: refused, and the
    /// refusal is queued as the reply to `id` (or closes the connection).
    pub(super) async fn admit(
        &self,
        id: u32,
        channel: &str,
        proof: SubscriptionProof<'_>,
        data: Option<&herald_core::Payload>,
    ) -> Option<Admitted> {
        let context = self.proxy_context();
        let ask = SubscribeAsk {
            credentials: self.credentials(),
            channel,
            proof,
            data,
            context: &context,
        };
        match self.state.admission().subscribe(ask).await {
            Ok(admitted) => Some(admitted),
            Err(refusal) => {
                self.refuse(id, refusal);
                None
            }
        }
    }

    /// Registers and recovers an admitted subscription; the caller queues the reply with
    /// [`Outbound::finish_recovery`] so that held live events follow it.
    pub(super) async fn prepare_subscription(
        &mut self,
        request: &SubscribeRequest,
        admitted: Admitted,
    ) -> Result<(ChannelName, SubscribeResult, u64), HeraldError> {
        let name = admitted.name.clone();
        self.check_room_for(&name)?;
        let info = match (&self.info, admitted.chan_info.clone()) {
            (Some(info), Some(chan_info)) => Some(Arc::new(ClientInfo {
                chan_info: Some(chan_info),
                ..(**info).clone()
            })),
            (info, _) => info.clone(),
        };
        let start = StartFrom {
            since: request
                .recover
                .then(|| StreamPosition::new(request.offset, request.epoch.clone())),
            max_recovery: self.state.config.recovery_max_publications,
            max_recovery_bytes: self.state.config.max_recovery_bytes(),
            reject_unrecovered: request.flag & FLAG_REJECT_UNRECOVERED != 0,
        };
        let encoder = PushEncoder::shared(self.encoding, admitted.options.join_leave);
        let subscribed = subscribe_with_recovery(
            &self.state.node,
            &self.outbound,
            &admitted,
            encoder,
            &start,
            info.clone(),
        )
        .await?;
        let last = subscribed.last_offset();
        let mut result = SubscribeResult::default();
        if let Some(at) = admitted.expires_at {
            result.expires = true;
            result.ttl = ttl_until(at);
        }
        if let Some(position) = subscribed.position {
            result.recoverable = true;
            result.positioned = true;
            result.was_recovering = request.recover;
            result.recovered = subscribed.recovered == Some(true);
            result.epoch = position.epoch;
            result.offset = position.offset;
            result.publications = subscribed
                .publications
                .iter()
                .map(WirePublication::from)
                .collect();
        }
        self.subscriptions.insert(
            name.as_arc().clone(),
            Subscription {
                name: name.clone(),
                options: admitted.options,
                id: subscribed.id,
                info,
                expires_at: admitted.expires_at,
            },
        );
        Ok((name, result, last))
    }

    /// Already subscribed (105) or at `max_subscriptions` (106).
    fn check_room_for(&self, name: &ChannelName) -> Result<(), HeraldError> {
        if self.subscriptions.contains_key(name.as_str()) {
            return Err(HeraldError::new(ErrorCode::AlreadySubscribed, ""));
        }
        if self.subscriptions.len() >= self.state.config.max_subscriptions {
            return Err(HeraldError::new(
                ErrorCode::LimitExceeded,
                "too many subscriptions on this connection",
            ));
        }
        Ok(())
    }

    async fn subscribe(&mut self, id: u32, request: SubscribeRequest) -> Result<(), HeraldError> {
        // Checked before admission: no backend call for a subscription that cannot be made.
        if let Ok((name, _)) = self.state.node.resolve(&request.channel) {
            self.check_room_for(&name)?;
        }
        let proof = if request.token.is_empty() {
            SubscriptionProof::None
        } else {
            SubscriptionProof::Token(&request.token)
        };
        let Some(admitted) = self
            .admit(id, &request.channel, proof, request.data.as_ref())
            .await
        else {
            return Ok(());
        };
        let (name, result, last) = self.prepare_subscription(&request, admitted).await?;
        let encoder = self.encoder_for(&name);
        self.outbound.finish_recovery(
            name.as_arc(),
            vec![
                self.encoding
                    .reply(id, &ResultBody::Subscribe(&result))
                    .into(),
            ],
            last,
            &*encoder,
        );
        Ok(())
    }

    pub(super) async fn unsubscribe(&mut self, channel: &str) {
        if let Some(sub) = self.subscriptions.remove(channel) {
            self.outbound.forget(channel);
            crate::subscription::end_subscription(
                &self.state.node,
                &sub.name,
                &sub.options,
                sub.id,
                sub.info,
            )
            .await;
        }
    }

    /// A new subscription token for a subscribed channel extends the subscription.
    async fn sub_refresh(
        &mut self,
        request: protocol::SubRefreshRequest,
    ) -> Result<protocol::SubRefreshResult, HeraldError> {
        let (name, _) = self.state.node.resolve(&request.channel)?;
        if !self.subscriptions.contains_key(name.as_str()) {
            return Err(HeraldError::new(
                ErrorCode::PermissionDenied,
                "not subscribed to this channel",
            ));
        }
        // The fresh token is decided like a new subscription's, by the one admission path.
        let context = self.proxy_context();
        let ask = SubscribeAsk {
            credentials: self.credentials(),
            channel: name.as_str(),
            proof: SubscriptionProof::Token(&request.token),
            data: None,
            context: &context,
        };
        let grant = match self.state.admission().subscribe(ask).await {
            Ok(admitted) => admitted,
            // A subscription token is verified by Herald alone: only its own refusals occur.
            Err(Refusal::Denied(error)) => return Err(error),
            Err(refusal) => {
                return Err(HeraldError::new(
                    ErrorCode::PermissionDenied,
                    refusal.message(),
                ));
            }
        };
        if let Some(sub) = self.subscriptions.get_mut(name.as_str()) {
            sub.expires_at = grant.expires_at;
        }
        Ok(match grant.expires_at {
            Some(at) => protocol::SubRefreshResult {
                expires: true,
                ttl: ttl_until(at),
            },
            None => protocol::SubRefreshResult::default(),
        })
    }

    /// Unsubscribes (and tells the client, with 2501) every subscription whose token expired
    /// more than the grace period ago without a `sub_refresh`.
    pub(super) async fn unsubscribe_expired(&mut self) {
        let now = herald_core::time::now_ms() / 1000;
        let grace = self.state.config.expired_close_delay.as_secs();
        let expired: Vec<Arc<str>> = self
            .subscriptions
            .iter()
            .filter(|(_, s)| {
                s.expires_at
                    .is_some_and(|at| at.saturating_add(grace) <= now)
            })
            .map(|(channel, _)| channel.clone())
            .collect();
        for channel in expired {
            self.unsubscribe(&channel).await;
            let (code, reason) = UNSUBSCRIBE_EXPIRED;
            self.outbound
                .push(self.encoding.unsubscribe_push(&channel, code, reason));
        }
    }

    fn subscribed_for(&self, channel: &str, action: Action) -> Result<ChannelName, HeraldError> {
        let (name, options) = self.state.node.resolve(channel)?;
        let subscribed = self.subscriptions.contains_key(name.as_str());
        auth::check(self.credentials(), &name, &options, action, subscribed)?;
        Ok(name)
    }

    /// A client publication, decided through the one admission path (the backend may
    /// rewrite it where the namespace has `proxy_publish`); the reply is queued.
    async fn publish(&mut self, id: u32, request: protocol::PublishRequest) {
        if let Err(error) = self.take_publish_token() {
            return self.reply_err(id, &error);
        }
        let subscribed = self
            .state
            .node
            .resolve(&request.channel)
            .is_ok_and(|(name, _)| self.subscriptions.contains_key(name.as_str()));
        let context = self.proxy_context();
        let decision = self
            .state
            .admission()
            .publish(
                self.credentials(),
                &request.channel,
                request.data,
                subscribed,
                &context,
            )
            .await;
        match decision {
            Ok(admitted) => {
                let outcome = self
                    .publish_as_client(&admitted.name, admitted.data, admitted.skip_history)
                    .await;
                self.reply_with(id, outcome, |()| ResultBody::Publish);
            }
            Err(refusal) => self.refuse(id, refusal),
        }
    }

    /// `publications_per_second_per_user`: per user, or per connection when anonymous.
    pub(super) fn take_publish_token(&self) -> Result<(), HeraldError> {
        let who = if self.user().is_empty() {
            self.client_id.as_str()
        } else {
            self.user()
        };
        if self.state.publish_rate.try_take(who, Instant::now()) {
            Ok(())
        } else {
            Err(HeraldError::new(
                ErrorCode::TooManyRequests,
                "publications_per_second_per_user",
            ))
        }
    }

    /// Publishes as this client, with its info on the channel (`chan_info` included when a
    /// subscription token or the backend gave one).
    pub(super) async fn publish_as_client(
        &self,
        name: &ChannelName,
        data: herald_core::Payload,
        skip_history: bool,
    ) -> Result<(), HeraldError> {
        let mut publish = NodePublish::new(name.as_str(), data);
        publish.skip_history = skip_history;
        publish.info = match self.subscriptions.get(name.as_str()) {
            Some(sub) => sub.info.clone(),
            None => self.info.clone(),
        };
        self.state.node.publish(publish).await.map(|_| ())
    }

    /// The connection's credentials (anonymous before `connect`, when no command but
    /// `connect` is accepted anyway).
    pub(super) fn credentials(&self) -> &Credentials {
        static ANONYMOUS: std::sync::LazyLock<Credentials> =
            std::sync::LazyLock::new(Credentials::anonymous);
        self.credentials.as_ref().unwrap_or(&ANONYMOUS)
    }

    async fn history(
        &mut self,
        request: protocol::HistoryRequest,
    ) -> Result<protocol::HistoryResult, HeraldError> {
        let name = self.subscribed_for(&request.channel, Action::History)?;
        let limit = match usize::try_from(request.limit) {
            Ok(n) => Some(n.min(self.state.config.recovery_max_publications)),
            Err(_) => Some(self.state.config.recovery_max_publications),
        };
        let query = HistoryQuery {
            since: request.since,
            limit,
            reverse: request.reverse,
        };
        let page = self.state.node.history(name.as_str(), query).await?;
        Ok(protocol::HistoryResult {
            publications: page
                .publications
                .iter()
                .map(WirePublication::from)
                .collect(),
            epoch: page.position.epoch,
            offset: page.position.offset,
        })
    }

    pub(super) async fn cleanup(&mut self) {
        let channels: Vec<Arc<str>> = self.subscriptions.keys().cloned().collect();
        for channel in channels {
            self.unsubscribe(&channel).await;
        }
    }
}

fn ttl_of(credentials: &Credentials) -> (bool, u32) {
    match credentials.expires_at {
        Some(at) => (true, ttl_until(at)),
        None => (false, 0),
    }
}

/// Seconds from now until `at` (Unix seconds), for `ttl` fields.
fn ttl_until(at: u64) -> u32 {
    let now = herald_core::time::now_ms() / 1000;
    u32::try_from(at.saturating_sub(now)).unwrap_or(u32::MAX)
}
