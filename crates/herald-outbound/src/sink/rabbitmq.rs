//! The RabbitMQ sink (AMQP 0-9-1): each publication is published to one exchange with a
//! routing key made from its channel (a [`Template`]), persistent, with Herald's metadata as
//! message headers and the job id as `message_id`.
//!
//! Acknowledged means: a publisher confirm (`basic.ack`) for the message on a channel in
//! confirm mode — RabbitMQ has handed it to every queue it routes to (and written it, for
//! durable queues). A `basic.nack` or a lost connection is retried. The message is not
//! `mandatory`: an exchange that routes it nowhere drops it, as it would any publisher's
//! (bind a queue, or an alternate exchange, before publishing).
//!
//! Owns: one AMQP connection and channel per sink, opened on first use and again after any
//! failure (jobs wait with backoff meanwhile).
//! May touch: the RabbitMQ server named in the sink's URL.

use std::time::Duration;

use async_trait::async_trait;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::{Sink, SinkError, SinkMessage, Template};

/// Where and how a RabbitMQ sink publishes.
#[derive(Clone, Debug)]
pub struct RabbitmqSinkConfig {
    /// `amqp://user:password@host:port/vhost` (or `amqps://`).
    pub url: String,
    /// The exchange (`""` is the default exchange: the routing key names a queue).
    pub exchange: String,
    pub routing_key: Template,
    /// How long connecting, publishing and waiting for the confirm may take.
    pub timeout: Duration,
}

pub struct RabbitmqSink {
    config: RabbitmqSinkConfig,
    /// The open channel in confirm mode (with its connection, which closes when dropped).
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for RabbitmqSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitmqSink")
            .field("exchange", &self.config.exchange)
            .finish_non_exhaustive()
    }
}

impl RabbitmqSink {
    /// Checks the URL; connects on first publish.
    pub fn new(config: RabbitmqSinkConfig) -> Result<Self, String> {
        config
            .url
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| format!("{:?} is not an AMQP URL: {e}", redact(&config.url)))?;
        if config.exchange.len() > 255 {
            return Err("the exchange name is longer than 255 bytes".into());
        }
        Ok(Self {
            config,
            channel: Mutex::new(None),
        })
    }

    /// The open channel, opening connection and channel when there is none (or it broke).
    async fn channel(&self) -> Result<Channel, SinkError> {
        let mut slot = self.channel.lock().await;
        if let Some((connection, channel)) = slot.as_ref()
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *slot = None;
        let connect = async {
            let connection =
                Connection::connect(&self.config.url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>((connection, channel))
        };
        let (connection, channel) = tokio::time::timeout(self.config.timeout, connect)
            .await
            .map_err(|_| {
                SinkError::Unavailable(format!(
                    "RabbitMQ: connecting took longer than {:?}",
                    self.config.timeout
                ))
            })?
            .map_err(|e| SinkError::Unavailable(format!("RabbitMQ: cannot connect: {e}")))?;
        tracing::info!(exchange = %self.config.exchange, "RabbitMQ sink connected");
        *slot = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Forgets the channel so the next publish opens a new one.
    async fn reset(&self) {
        if let Some((connection, _)) = self.channel.lock().await.take() {
            let _ = connection
                .close(320, "herald sink reconnecting".into())
                .await;
        }
    }
}

fn properties(id: &str, message: &SinkMessage) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (key, value) in message.headers(id) {
        headers.insert(
            ShortString::from(key),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    BasicProperties::default()
        .with_message_id(ShortString::from(id.to_string()))
        .with_content_type(ShortString::from(message.content_type()))
        .with_timestamp(message.time_ms / 1000)
        .with_delivery_mode(2)
        .with_headers(headers)
}

#[async_trait]
impl Sink for RabbitmqSink {
    async fn publish(&self, id: &str, message: &SinkMessage) -> Result<String, SinkError> {
        let routing_key = self.config.routing_key.render(&message.channel);
        if routing_key.len() > 255 {
            return Err(SinkError::Rejected(format!(
                "routing key {routing_key:?} is longer than 255 bytes"
            )));
        }
        if id.len() > 255 {
            return Err(SinkError::Rejected(format!(
                "message id {id:?} is longer than 255 bytes"
            )));
        }
        let channel = self.channel().await?;
        let publish = async {
            channel
                .basic_publish(
                    ShortString::from(self.config.exchange.as_str()),
                    ShortString::from(routing_key.as_str()),
                    BasicPublishOptions::default(),
                    &message.data,
                    properties(id, message),
                )
                .await?
                .await
        };
        let outcome = tokio::time::timeout(self.config.timeout, publish).await;
        match outcome {
            Ok(Ok(Confirmation::Ack(_))) => Ok(format!("confirmed to {routing_key}")),
            Ok(Ok(Confirmation::Nack(_))) => Err(SinkError::Unavailable(
                "RabbitMQ refused the message (basic.nack)".into(),
            )),
            Ok(Ok(Confirmation::NotRequested)) => {
                self.reset().await;
                Err(SinkError::Unavailable(
                    "RabbitMQ channel was not in confirm mode".into(),
                ))
            }
            Ok(Err(error)) => {
                self.reset().await;
                Err(SinkError::Unavailable(format!("RabbitMQ: {error}")))
            }
            Err(_) => {
                self.reset().await;
                Err(SinkError::Unavailable(format!(
                    "RabbitMQ did not confirm within {:?}",
                    self.config.timeout
                )))
            }
        }
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host:5672"), "amqp://host:5672");
    }

    #[test]
    fn a_bad_url_is_refused_without_its_password() {
        let error = RabbitmqSink::new(RabbitmqSinkConfig {
            url: "http://guest:secret@host".into(),
            exchange: "x".into(),
            routing_key: Template::parse("{channel}").expect("parses"),
            timeout: Duration::from_secs(1),
        })
        .expect_err("not amqp");
        assert!(!error.contains("secret"), "{error}");
    }
}
