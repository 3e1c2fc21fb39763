//! A client's PUBLISH: its topic (MQTT 5 topic aliases), the rate limit, admission, the
//! publication with its tags (user properties, the publisher's QoS, RETAIN and message
//! expiry), and the acknowledgement once `Node::publish` returned — or the refusal, never
//! silent.
//!
//! May touch: the node and admission through the MQTT state.

use std::time::Instant;

use herald_core::ErrorCode;
use herald_core::node::PublishRequest;
use herald_core::publication::Payload;

use super::super::codec::{self, Ack, Level, reason};
use super::super::delivery::{EXPIRY_TAG, QOS_TAG, RETAIN_TAG};
use super::{Close, Session, refusal_reason};

impl Session {
    /// Ends the connection for a refused publish: MQTT 5 acknowledges QoS 1/2 with the
    /// reason; otherwise (QoS 0, or 3.1.1, which has no negative acknowledgement) the
    /// connection closes with it, so the refusal is never silent.
    fn refuse_publish(&mut self, qos: u8, pkid: u16, code: u8, why: String) -> Result<(), Close> {
        tracing::debug!(code, why = %why, "mqtt: publish refused");
        if self.level == Level::V5 && qos > 0 {
            let kind = if qos == 1 { Ack::PubAck } else { Ack::PubRec };
            codec::ack(&mut self.out_buf, self.level, kind, pkid, code);
            return Ok(());
        }
        Err(Close::new(code, why))
    }

    pub(super) async fn publish(&mut self, publish: codec::Publish) -> Result<(), Close> {
        let codec::Publish {
            qos,
            pkid,
            payload,
            topic,
            topic_alias,
            message_expiry,
            user_properties,
            retain,
            ..
        } = publish;
        let topic = match topic_alias {
            Some(alias) => self.resolve_alias(alias, topic)?,
            None => topic,
        };
        if qos == 2
            && self
                .acks
                .as_ref()
                .is_some_and(|acks| acks.awaiting_rel.contains(&pkid))
        {
            // A resent QoS 2 publish already published: acknowledge again, publish nothing.
            codec::ack(
                &mut self.out_buf,
                self.level,
                Ack::PubRec,
                pkid,
                reason::SUCCESS,
            );
            return Ok(());
        }
        if topic.starts_with('$') {
            return self.refuse_publish(
                qos,
                pkid,
                reason::TOPIC_NAME_INVALID,
                "topics starting with '$' are reserved".into(),
            );
        }
        let channel = match self.state.topics.channel(&topic) {
            Ok(channel) => channel,
            Err(error) => {
                return self.refuse_publish(qos, pkid, reason::TOPIC_NAME_INVALID, error.0);
            }
        };
        if !self.take_publish_token() {
            return self.refuse_publish(
                qos,
                pkid,
                reason::QUOTA_EXCEEDED,
                "publications_per_second_per_user".into(),
            );
        }
        let data = publication_data(payload);
        let subscribed = self.exact.contains_key(channel.as_str());
        let admitted = match self
            .state
            .realtime
            .admission()
            .publish(
                self.credentials(),
                &channel,
                data,
                subscribed,
                &self.context(),
            )
            .await
        {
            Ok(admitted) => admitted,
            Err(refusal) => {
                let code = match refusal_reason(&refusal) {
                    reason::TOPIC_FILTER_INVALID => reason::TOPIC_NAME_INVALID,
                    code => code,
                };
                return self.refuse_publish(qos, pkid, code, refusal.message());
            }
        };
        let mut request = PublishRequest::new(admitted.name.as_str(), admitted.data);
        request.skip_history = admitted.skip_history;
        request.info = Some(
            self.exact
                .get(admitted.name.as_str())
                .map_or_else(|| self.info.clone(), |sub| sub.info.clone()),
        );
        for (key, value) in user_properties {
            if ![QOS_TAG, EXPIRY_TAG, RETAIN_TAG].contains(&key.as_str()) {
                request.tags.insert(key, value);
            }
        }
        if retain {
            request.tags.insert(RETAIN_TAG.into(), "1".into());
        }
        if let Some(seconds) = message_expiry {
            request.tags.insert(EXPIRY_TAG.into(), seconds.to_string());
        }
        if qos < 2 {
            request.tags.insert(QOS_TAG.into(), qos.to_string());
        }
        match self.state.realtime.node.publish(request).await {
            Ok(_) => {
                match qos {
                    1 => codec::ack(
                        &mut self.out_buf,
                        self.level,
                        Ack::PubAck,
                        pkid,
                        reason::SUCCESS,
                    ),
                    2 => {
                        self.acks
                            .get_or_insert_with(Box::default)
                            .awaiting_rel
                            .insert(pkid);
                        codec::ack(
                            &mut self.out_buf,
                            self.level,
                            Ack::PubRec,
                            pkid,
                            reason::SUCCESS,
                        );
                    }
                    _ => {}
                }
                Ok(())
            }
            Err(error) => {
                let code = match error.code {
                    ErrorCode::LimitExceeded => reason::PACKET_TOO_LARGE,
                    ErrorCode::BadRequest | ErrorCode::UnknownChannel => reason::TOPIC_NAME_INVALID,
                    _ => reason::UNSPECIFIED,
                };
                tracing::warn!(error = %error, channel = admitted.name.as_str(), "mqtt: publish failed");
                self.refuse_publish(qos, pkid, code, error.to_string())
            }
        }
    }

    /// The topic of a PUBLISH with MQTT 5 topic alias `alias`: a topic given sets the alias,
    /// an empty one uses it. An alias of 0 or above the CONNACK's Topic Alias Maximum closes
    /// with 0x94, an empty topic with an alias never set with 0x82.
    fn resolve_alias(&mut self, alias: u16, topic: String) -> Result<String, Close> {
        let maximum = self.state.config.topic_alias_maximum;
        if alias == 0 || alias > maximum {
            return Err(Close::new(
                reason::TOPIC_ALIAS_INVALID,
                format!("topic alias {alias} is outside 1..={maximum}"),
            ));
        }
        let aliases = self.topic_aliases.get_or_insert_with(Default::default);
        if topic.is_empty() {
            return aliases.get(&alias).cloned().ok_or_else(|| {
                Close::new(
                    reason::PROTOCOL_ERROR,
                    format!("topic alias {alias} was never set"),
                )
            });
        }
        aliases.insert(alias, topic.clone());
        Ok(topic)
    }

    /// `publications_per_second_per_user`: per user, or per connection when anonymous.
    fn take_publish_token(&self) -> bool {
        let who = if self.credentials().user.is_empty() {
            self.info.client.as_str()
        } else {
            self.credentials().user.as_str()
        };
        self.state
            .realtime
            .publish_rate
            .try_take(who, Instant::now())
    }
}

/// An MQTT payload as publication data: JSON when it parses as JSON, bytes otherwise.
pub(super) fn publication_data(bytes: bytes::Bytes) -> Payload {
    if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
        Payload::Json(bytes)
    } else {
        Payload::Binary(bytes)
    }
}
