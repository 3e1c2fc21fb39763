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
use herald_core::publication::{ClientInfo, PublicationEvent};
use herald_core::store::HistoryQuery;

use super::super::codec::{self, reason};
use super::super::delivery::PatternSink;
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
            let code = match self.subscribe_one(&ask, qos).await {
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
        for exact in granted {
            let retained_offset = exact
                .retained
                .as_ref()
                .and_then(|f| f.position.as_ref())
                .map_or(0, |p| p.offset);
            match exact.last_offset {
                Some(last_offset) => self.outbound.finish_recovery(
                    &exact.channel,
                    exact.retained.into_iter().collect(),
                    last_offset.max(retained_offset),
                    &*self.encoder,
                ),
                None => {
                    if let Some(frame) = exact.retained {
                        self.outbound.push(frame);
                    }
                }
            }
        }
    }

    /// Subscribes one filter; for an exact topic, what follows the SUBACK.
    async fn subscribe_one(
        &mut self,
        ask: &codec::SubscribeAsk,
        qos: u8,
    ) -> Result<Option<GrantedExact>, (u8, String)> {
        let text = ask.filter.as_str();
        if text.starts_with("$share/") {
            return Err((
                reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
                "shared subscriptions are not supported".into(),
            ));
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
        if !already && self.table.read().len() >= self.state.config.max_subscriptions {
            return Err((
                reason::QUOTA_EXCEEDED,
                format!(
                    "at most {} subscriptions per connection",
                    self.state.config.max_subscriptions
                ),
            ));
        }
        match filter {
            Filter::Exact(topic) => {
                // Retain handling (MQTT 5): 0 always, 1 for a new subscription, 2 never.
                let send_retained = match ask.retain_handling {
                    0 => true,
                    1 => !already,
                    _ => false,
                };
                let granted = self
                    .subscribe_exact(&topic, qos, already, send_retained)
                    .await?;
                Ok(Some(granted))
            }
            Filter::Wildcard(_) => {
                self.subscribe_wildcard(filter, qos)?;
                Ok(None)
            }
        }
    }

    async fn subscribe_exact(
        &mut self,
        topic: &str,
        qos: u8,
        already: bool,
        send_retained: bool,
    ) -> Result<GrantedExact, (u8, String)> {
        let channel = self
            .state
            .topics
            .channel(topic)
            .map_err(|e| (reason::TOPIC_FILTER_INVALID, e.0))?;
        let realtime = self.state.realtime.clone();
        let ask = AdmissionAsk {
            credentials: &self.credentials,
            channel: &channel,
            proof: SubscriptionProof::None,
            data: None,
            context: &self.context,
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
            return Ok(GrantedExact {
                channel: admitted.name.as_arc().clone(),
                last_offset: None,
                retained,
            });
        }
        let info = match admitted.chan_info.clone() {
            Some(chan_info) => Arc::new(ClientInfo {
                chan_info: Some(chan_info),
                ..(*self.info).clone()
            }),
            None => self.info.clone(),
        };
        let start = StartFrom {
            since: None,
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
        let retained = match send_retained {
            true => {
                self.retained(&admitted.name, &admitted.options, topic)
                    .await
            }
            false => None,
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
            retained,
        })
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
        if publication.data.is_empty() {
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
        })
    }

    fn subscribe_wildcard(&mut self, filter: Filter, qos: u8) -> Result<(), (u8, String)> {
        let realtime = &self.state.realtime;
        realtime
            .admission()
            .subscribe_pattern(&self.credentials, &self.state.config.namespace)
            .map_err(|refusal| (refusal_reason(&refusal), refusal.message()))?;
        if self.pattern.is_none() {
            let sink = Arc::new(PatternSink {
                table: self.table.clone(),
                outbound: self.outbound.clone(),
                encoder: self.encoder.clone(),
            });
            let id = realtime
                .node
                .subscribe_pattern(sink)
                .map_err(|e| (reason::WILDCARDS_NOT_SUPPORTED, e.to_string()))?;
            self.pattern = Some(id);
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
            let removed = match Filter::parse(&text) {
                Ok(Filter::Exact(topic)) => match self.state.topics.channel(&topic) {
                    Ok(channel) => self.unsubscribe_exact(&channel).await,
                    Err(_) => false,
                },
                Ok(filter @ Filter::Wildcard(_)) => {
                    let mut table = self.table.write();
                    let before = table.wildcards.len();
                    table.wildcards.retain(|(f, _)| *f != filter);
                    before != table.wildcards.len()
                }
                Err(_) => false,
            };
            codes.push(if removed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
        }
        if self.table.read().wildcards.is_empty()
            && let Some(id) = self.pattern.take()
        {
            self.state.realtime.node.unsubscribe_pattern(id);
        }
        codec::unsuback(&mut self.out_buf, self.level, pkid, &codes);
    }

    async fn unsubscribe_exact(&mut self, channel: &str) -> bool {
        let Some(sub) = self.exact.remove(channel) else {
            return false;
        };
        self.table.write().exact.remove(channel);
        self.outbound.forget(channel);
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
