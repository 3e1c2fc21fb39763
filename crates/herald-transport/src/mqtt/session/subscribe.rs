//! SUBSCRIBE and UNSUBSCRIBE of one MQTT connection: each filter admitted through the one
//! admission path (exact topics) or as a pattern (wildcards), exact topics subscribed
//! through the one subscribe-with-recovery step, the retained publication (the channel's
//! latest) queued after the SUBACK and before the held live ones.
//!
//! May touch: the node and admission through the session's state, the connection's queue.

use std::sync::Arc;

use herald_core::admission::{SubscribeAsk as AdmissionAsk, SubscriptionProof};
use herald_core::channel::ChannelName;
use herald_core::namespace::NamespaceOptions;
use herald_core::publication::{ClientInfo, PublicationEvent, StreamPosition};
use herald_core::store::HistoryQuery;

use super::super::codec::{self, reason};
use super::super::delivery::{PatternSink, expires_at_ms, expiry_left};
use super::super::persist::{Positions, SessionDocument};
use super::super::shared::{Member, SharedFilter};
use super::super::topic::Filter;
use super::{ExactSub, GrantedExact, Session, refusal_reason};
use crate::outbound::{Frame, FramePosition};
use crate::subscription::{StartFrom, end_subscription, subscribe_with_recovery};

impl Session {
    pub(super) async fn subscribe(&mut self, pkid: u16, asks: Vec<codec::SubscribeAsk>) {
        let mut codes = Vec::with_capacity(asks.len());
        let mut granted = Vec::new();
        for ask in asks {
            let qos = ask.qos.min(2);
            let code = match self.subscribe_one(&ask, qos, false).await {
                Ok(exact) => {
                    granted.extend(exact);
                    qos
                }
                Err((code, why)) => {
                    tracing::debug!(filter = %ask.filter, code, why = %why, "mqtt: subscription refused");
                    code
                }
            };
            codes.push(code);
        }
        codec::suback(&mut self.out_buf, self.level, pkid, &codes);
        // The SUBACK is buffered first; the retained publication, then the held live ones
        // follow it.
        self.release(granted);
    }

    /// Queues each granted exact subscription's replies (retained or recovered
    /// publications), then lets its held live publications follow.
    fn release(&self, granted: Vec<GrantedExact>) {
        for exact in granted {
            let replied_offset = exact
                .replies
                .iter()
                .filter_map(|f| f.position.as_ref())
                .map(|p| p.offset)
                .max()
                .unwrap_or(0);
            match exact.last_offset {
                Some(last_offset) => self.outbound.finish_recovery(
                    &exact.channel,
                    exact.replies,
                    last_offset.max(replied_offset),
                    &*self.encoder,
                ),
                None => {
                    for frame in exact.replies {
                        self.outbound.push(frame);
                    }
                }
            }
        }
    }

    /// Restores a saved session: every subscription admitted again (one refused now is
    /// dropped, logged), each exact topic recovered from history from its last acknowledged
    /// offset (what was sent and not acknowledged comes again with DUP). When history no
    /// longer holds what a channel missed, the session starts over instead — subscriptions
    /// dropped, `session present = 0` (the client subscribes again and refetches state) and
    /// a log line — never a silent gap. Returns `session present` and, when starting over,
    /// the reason (an MQTT 5 reason string).
    pub(super) async fn resume(&mut self, saved: SessionDocument) -> (bool, Option<String>) {
        if let Some(persistence) = &mut self.persistence {
            persistence.positions = Positions::restore(&saved.positions);
        }
        let mut granted = Vec::new();
        let mut lost = Vec::new();
        for (filter, qos) in saved.subscriptions {
            let subscription_id = saved.subscription_ids.get(&filter).copied();
            let ask = codec::SubscribeAsk {
                no_local: saved.no_local.contains(&filter),
                filter,
                qos,
                retain_as_published: false,
                retain_handling: 2,
                subscription_id,
            };
            match self.subscribe_one(&ask, qos.min(2), true).await {
                Ok(Some(exact)) => {
                    if exact.recovered == Some(false) {
                        lost.push(exact.channel.to_string());
                    }
                    granted.push(exact);
                }
                Ok(None) => {}
                Err((code, why)) => tracing::warn!(
                    client_id = %self.mqtt_client_id,
                    filter = %ask.filter,
                    code,
                    why = %why,
                    "mqtt: a subscription of the saved session is refused now; dropped"
                ),
            }
        }
        if lost.is_empty() {
            self.release(granted);
            return (true, None);
        }
        tracing::warn!(
            client_id = %self.mqtt_client_id,
            user = %self.credentials().user,
            channels = ?lost,
            "mqtt: history no longer holds what the session missed; the session starts over (session present = 0)"
        );
        drop(granted);
        self.reset().await;
        let reason = format!(
            "history no longer holds what was missed on {}: the session starts over, subscribe again",
            lost.join(", ")
        );
        (false, Some(reason))
    }

    /// Ends the hub's pattern subscription and releases the cluster prefixes.
    pub(super) fn leave_patterns(&mut self) {
        if let Some(id) = self.wildcards.take().and_then(|w| w.pattern) {
            self.state.realtime.node.unsubscribe_pattern(id);
        }
    }

    /// Drops every subscription and position (a session that starts over).
    async fn reset(&mut self) {
        self.leave_shared();
        self.leave_patterns();
        let channels: Vec<Arc<str>> = self.exact.keys().cloned().collect();
        for channel in channels {
            self.unsubscribe_exact(&channel).await;
        }
        self.table.write().wildcards.clear();
        if let Some(persistence) = &mut self.persistence {
            persistence.positions = Positions::default();
            persistence.positions.dirty = true;
        }
    }

    /// Subscribes one filter; for an exact topic, what follows the SUBACK.
    /// `resume`: restoring a saved session (recover from its position, no retained).
    async fn subscribe_one(
        &mut self,
        ask: &codec::SubscribeAsk,
        qos: u8,
        resume: bool,
    ) -> Result<Option<GrantedExact>, (u8, String)> {
        let text = ask.filter.as_str();
        if let Some(shared) = SharedFilter::parse(text) {
            let shared = shared.map_err(|why| (reason::TOPIC_FILTER_INVALID, why))?;
            self.subscribe_shared(shared, qos).await?;
            return Ok(None);
        }
        let filter = Filter::parse(text).map_err(|e| (reason::TOPIC_FILTER_INVALID, e.0))?;
        let already = {
            let table = self.table.read();
            match &filter {
                Filter::Exact(topic) => self
                    .state
                    .topics
                    .channel(topic)
                    .ok()
                    .is_some_and(|c| table.exact.contains_key(c.as_str())),
                Filter::Wildcard(_) => table.wildcards.iter().any(|(f, _)| *f == filter),
            }
        };
        self.room_for_subscription(already)?;
        let granted = match filter {
            Filter::Exact(topic) => {
                // Retain handling (MQTT 5): 0 always, 1 for a new subscription, 2 never.
                let send_retained = match ask.retain_handling {
                    0 => true,
                    1 => !already,
                    _ => false,
                };
                let granted = self
                    .subscribe_exact(&topic, qos, already, send_retained, resume)
                    .await?;
                Some(granted)
            }
            Filter::Wildcard(_) => {
                self.subscribe_wildcard(filter, qos).await?;
                None
            }
        };
        let mut table = self.table.write();
        if let Ok(filter) = Filter::parse(text) {
            table.set_subscription_id(&filter, ask.subscription_id);
            table.set_retain_as_published(&filter, ask.retain_as_published);
        }
        table.set_no_local(text, ask.no_local);
        Ok(granted)
    }

    async fn subscribe_exact(
        &mut self,
        topic: &str,
        qos: u8,
        already: bool,
        send_retained: bool,
        resume: bool,
    ) -> Result<GrantedExact, (u8, String)> {
        let channel = self
            .state
            .topics
            .channel(topic)
            .map_err(|e| (reason::TOPIC_FILTER_INVALID, e.0))?;
        let realtime = self.state.realtime.clone();
        let context = self.context();
        let ask = AdmissionAsk {
            credentials: self.credentials(),
            channel: &channel,
            proof: SubscriptionProof::None,
            data: None,
            context: &context,
        };
        let admitted = realtime
            .admission()
            .subscribe(ask)
            .await
            .map_err(|refusal| (refusal_reason(&refusal), refusal.message()))?;
        if already {
            // A repeated subscription replaces the old one's options (its QoS).
            self.table
                .write()
                .exact
                .insert(admitted.name.as_arc().clone(), qos);
            let retained = match send_retained {
                true => {
                    self.retained(&admitted.name, &admitted.options, topic)
                        .await
                }
                false => None,
            };
            self.note_retained(retained.as_ref());
            return Ok(GrantedExact {
                channel: admitted.name.as_arc().clone(),
                last_offset: None,
                replies: retained.into_iter().collect(),
                recovered: None,
            });
        }
        let info = match admitted.chan_info.clone() {
            Some(chan_info) => Arc::new(ClientInfo {
                chan_info: Some(chan_info),
                ..(*self.info).clone()
            }),
            None => self.info.clone(),
        };
        // Resuming: from the last acknowledged offset; what was sent after it is a redelivery.
        let resume_point = match (&self.persistence, resume) {
            (Some(persistence), true) => persistence.positions.resume_point(admitted.name.as_str()),
            _ => None,
        };
        let start = StartFrom {
            since: resume_point
                .as_ref()
                .map(|(epoch, acked, _)| StreamPosition::new(*acked, epoch.to_string())),
            max_recovery: realtime.config.recovery_max_publications,
            max_recovery_bytes: realtime.config.max_recovery_bytes(),
            reject_unrecovered: false,
        };
        let subscribed = subscribe_with_recovery(
            &realtime.node,
            &self.outbound,
            &admitted,
            self.encoder.clone(),
            &start,
            Some(info.clone()),
        )
        .await
        .map_err(|error| (reason::UNSPECIFIED, error.to_string()))?;
        let name = admitted.name.as_arc().clone();
        self.table.write().exact.insert(name.clone(), qos);
        let last_offset = subscribed.last_offset();
        // A new subscription of a persistent session starts where the channel is: what is
        // published after it is missed if the device goes away before the first delivery.
        if resume_point.is_none()
            && let (Some(persistence), Some(position)) =
                (&mut self.persistence, subscribed.position.as_ref())
        {
            let epoch: Arc<str> = Arc::from(position.epoch.as_str());
            persistence.positions.sent(&name, &epoch, last_offset, true);
        }
        let replies = match &resume_point {
            Some((_, _, sent)) => {
                let epoch: Arc<str> = Arc::from(
                    subscribed
                        .position
                        .as_ref()
                        .map_or("", |p| p.epoch.as_str()),
                );
                let now_ms = herald_core::time::now_ms();
                subscribed
                    .publications
                    .into_iter()
                    // Expired while the device was away: not delivered (MQTT-3.3.2-5).
                    .filter(|publication| expiry_left(publication, now_ms) != Some(0))
                    .map(|publication| self.redelivery(&name, &epoch, topic, publication, *sent))
                    .collect()
            }
            None if send_retained && !resume => {
                let retained = self
                    .retained(&admitted.name, &admitted.options, topic)
                    .await;
                self.note_retained(retained.as_ref());
                retained.into_iter().collect()
            }
            None => Vec::new(),
        };
        self.exact.insert(
            name.clone(),
            ExactSub {
                name: admitted.name,
                options: admitted.options,
                id: subscribed.id,
                info,
            },
        );
        Ok(GrantedExact {
            channel: name,
            last_offset: Some(last_offset),
            replies,
            recovered: subscribed.recovered,
        })
    }

    /// A publication recovered for a resumed session; DUP when it was sent before.
    fn redelivery(
        &self,
        channel: &Arc<str>,
        epoch: &Arc<str>,
        topic: &str,
        publication: herald_core::Publication,
        sent: u64,
    ) -> Frame {
        let offset = publication.offset;
        let event = PublicationEvent::new(channel.clone(), epoch.clone(), publication);
        let mut bytes = self.encoder.template(topic, &event, false);
        if offset <= sent {
            let mut marked = bytes::BytesMut::from(&bytes[..]);
            marked[0] |= 0x08;
            bytes = marked.freeze();
        }
        Frame {
            bytes,
            position: Some(FramePosition {
                channel: channel.clone(),
                offset,
                epoch: epoch.clone(),
            }),
            conflate_key: None,
            expires_at_ms: expires_at_ms(&event.publication).unwrap_or(0),
        }
    }

    /// Remembers a retained publication queued for a SUBSCRIBE: it is written with RETAIN.
    fn note_retained(&mut self, frame: Option<&Frame>) {
        if let Some(position) = frame.and_then(|f| f.position.as_ref()) {
            self.retained_replies
                .get_or_insert_with(Default::default)
                .insert((position.channel.clone(), position.offset));
        }
    }

    /// The channel's retained publication: its latest, unless that is empty (an empty
    /// retained publish clears it) or the namespace keeps no history.
    async fn retained(
        &self,
        name: &ChannelName,
        options: &NamespaceOptions,
        topic: &str,
    ) -> Option<Frame> {
        if !options.history_enabled() {
            return None;
        }
        let query = HistoryQuery {
            since: None,
            limit: Some(1),
            reverse: true,
        };
        let page = match self.state.realtime.node.history(name.as_str(), query).await {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(channel = name.as_str(), %error, "mqtt: reading the retained publication failed");
                return None;
            }
        };
        let publication = page.publications.into_iter().next()?;
        if publication.data.is_empty()
            || expiry_left(&publication, herald_core::time::now_ms()) == Some(0)
        {
            return None;
        }
        let epoch: Arc<str> = Arc::from(page.position.epoch.as_str());
        let offset = publication.offset;
        let event = PublicationEvent::new(name.as_arc().clone(), epoch.clone(), publication);
        Some(Frame {
            bytes: self.encoder.template(topic, &event, true),
            position: Some(FramePosition {
                channel: name.as_arc().clone(),
                offset,
                epoch,
            }),
            conflate_key: None,
            expires_at_ms: expires_at_ms(&event.publication).unwrap_or(0),
        })
    }

    /// `max_subscriptions`: a new filter needs room (one already subscribed is replaced).
    fn room_for_subscription(&self, already: bool) -> Result<(), (u8, String)> {
        let max = self.state.config.max_subscriptions;
        if !already && self.table.read().len() >= max {
            return Err((
                reason::QUOTA_EXCEEDED,
                format!("at most {max} subscriptions per connection"),
            ));
        }
        Ok(())
    }

    /// Joins the group of a shared subscription, admitted like a wildcard filter (once per
    /// namespace, by its rules alone).
    async fn subscribe_shared(
        &mut self,
        shared: SharedFilter,
        qos: u8,
    ) -> Result<(), (u8, String)> {
        let already = self.table.read().shared.iter().any(|(s, _)| *s == shared);
        self.room_for_subscription(already)?;
        let realtime = &self.state.realtime;
        realtime
            .admission()
            .subscribe_pattern(self.credentials(), &self.state.config.namespace)
            .map_err(|refusal| (refusal_reason(&refusal), refusal.message()))?;
        self.state
            .shared
            .join(
                &realtime.node,
                &self.state.topics,
                &shared,
                Member {
                    connection: self.connection,
                    outbound: self.outbound.clone(),
                    encoder: self.encoder.clone(),
                },
            )
            .await
            .map_err(|why| (reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED, why))?;
        let mut table = self.table.write();
        match table.shared.iter_mut().find(|(s, _)| *s == shared) {
            Some(entry) => entry.1 = qos,
            None => table.shared.push((shared, qos)),
        }
        Ok(())
    }

    /// Leaves every shared subscription's group (the connection ends).
    pub(super) fn leave_shared(&mut self) {
        let shared = std::mem::take(&mut self.table.write().shared);
        for (shared, _) in shared {
            self.state
                .shared
                .leave(&self.state.realtime.node, &shared, self.connection);
        }
    }

    /// Subscribes a wildcard filter: admitted as a pattern, and (in a cluster) its channels
    /// reach this node from every node before the SUBACK.
    async fn subscribe_wildcard(&mut self, filter: Filter, qos: u8) -> Result<(), (u8, String)> {
        let realtime = self.state.realtime.clone();
        realtime
            .admission()
            .subscribe_pattern(self.credentials(), &self.state.config.namespace)
            .map_err(|refusal| (refusal_reason(&refusal), refusal.message()))?;
        let held = self
            .wildcards
            .as_ref()
            .is_some_and(|w| w.prefix_holds.iter().any(|(f, _)| *f == filter));
        if !held {
            let prefix = self.state.topics.channel_prefix(&filter);
            let hold = realtime
                .node
                .want_prefix(&prefix)
                .await
                .map_err(|e| (reason::UNSPECIFIED, e.to_string()))?;
            self.wildcards
                .get_or_insert_with(Box::default)
                .prefix_holds
                .push((filter.clone(), hold));
        }
        let wildcards = self.wildcards.get_or_insert_with(Box::default);
        if wildcards.pattern.is_none() {
            let sink = Arc::new(PatternSink {
                table: self.table.clone(),
                outbound: self.outbound.clone(),
                encoder: self.encoder.clone(),
            });
            wildcards.pattern = Some(realtime.node.subscribe_pattern(sink));
        }
        let mut table = self.table.write();
        match table.wildcards.iter_mut().find(|(f, _)| *f == filter) {
            Some(entry) => entry.1 = qos,
            None => table.wildcards.push((filter, qos)),
        }
        Ok(())
    }

    pub(super) async fn unsubscribe(&mut self, pkid: u16, filters: Vec<String>) {
        let mut codes = Vec::with_capacity(filters.len());
        for text in filters {
            if let Some(Ok(shared)) = SharedFilter::parse(&text) {
                let mut table = self.table.write();
                let before = table.shared.len();
                table.shared.retain(|(s, _)| *s != shared);
                let removed = before != table.shared.len();
                drop(table);
                if removed {
                    self.state
                        .shared
                        .leave(&self.state.realtime.node, &shared, self.connection);
                }
                codes.push(if removed {
                    reason::SUCCESS
                } else {
                    reason::NO_SUBSCRIPTION_EXISTED
                });
                continue;
            }
            let removed = match Filter::parse(&text) {
                Ok(Filter::Exact(topic)) => match self.state.topics.channel(&topic) {
                    Ok(channel) => self.unsubscribe_exact(&channel).await,
                    Err(_) => false,
                },
                Ok(filter @ Filter::Wildcard(_)) => {
                    let mut table = self.table.write();
                    let before = table.wildcards.len();
                    table.wildcards.retain(|(f, _)| *f != filter);
                    if let Some(wildcards) = &mut self.wildcards {
                        wildcards.prefix_holds.retain(|(f, _)| *f != filter);
                    }
                    before != table.wildcards.len()
                }
                Err(_) => false,
            };
            let mut table = self.table.write();
            table.set_no_local(&text, false);
            if let Ok(filter) = Filter::parse(&text) {
                table.set_subscription_id(&filter, None);
                table.set_retain_as_published(&filter, false);
            }
            drop(table);
            codes.push(if removed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
        }
        if self.table.read().wildcards.is_empty() {
            self.leave_patterns();
        }
        codec::unsuback(&mut self.out_buf, self.level, pkid, &codes);
    }

    /// The server API ended the subscription to `channel` (a channel name as the API got
    /// it). MQTT has no server-side unsubscribe packet: deliveries stop, and a persistent
    /// session forgets the topic. Only exact subscriptions are ended; a wildcard filter that
    /// covers the channel stays.
    pub(super) async fn unsubscribed_by_server(&mut self, channel: &str) {
        let Ok((name, _)) = self.state.realtime.node.resolve(channel) else {
            return;
        };
        if self.unsubscribe_exact(name.as_str()).await {
            tracing::debug!(channel = name.as_str(), client_id = %self.mqtt_client_id, "mqtt: unsubscribed by the server API");
            self.save_session().await;
        }
    }

    async fn unsubscribe_exact(&mut self, channel: &str) -> bool {
        let Some(sub) = self.exact.remove(channel) else {
            return false;
        };
        self.table.write().exact.remove(channel);
        self.outbound.forget(channel);
        if let Some(persistence) = &mut self.persistence {
            persistence.positions.forget(channel);
        }
        end_subscription(
            &self.state.realtime.node,
            &sub.name,
            &sub.options,
            sub.id,
            Some(sub.info),
        )
        .await;
        true
    }
}
