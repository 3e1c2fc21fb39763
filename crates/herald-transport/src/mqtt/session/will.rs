//! The will message of an MQTT connection that ended without a clean DISCONNECT: published
//! after the connection is gone (MQTT 5: after its will delay, unless the client is back),
//! through the same admission path as its publishes.
//!
//! May touch: the node and admission through the MQTT state.

use std::sync::Arc;

use herald_core::auth::Credentials;
use herald_core::node::PublishRequest;
use herald_core::proxy::ProxyContext;
use herald_core::publication::ClientInfo;

use super::super::MqttState;
use super::super::codec;
use super::super::delivery::QOS_TAG;
use super::publish::publication_data;

/// Publishes a connection's will message after it is gone, through the same admission path
/// as its publishes.
pub(super) struct WillPublisher {
    pub(super) state: Arc<MqttState>,
    pub(super) credentials: Credentials,
    pub(super) info: Arc<ClientInfo>,
    pub(super) context: ProxyContext,
    pub(super) client_id: String,
}

impl WillPublisher {
    pub(super) async fn publish(self, will: codec::Will) {
        let channel = match self.state.topics.channel(&will.topic) {
            Ok(channel) if !will.topic.starts_with('$') => channel,
            Ok(_) => {
                tracing::warn!(client_id = %self.client_id, topic = %will.topic, "mqtt: will not published: '$' topics are reserved");
                return;
            }
            Err(error) => {
                tracing::warn!(client_id = %self.client_id, %error, "mqtt: will not published");
                return;
            }
        };
        let realtime = &self.state.realtime;
        let admitted = match realtime
            .admission()
            .publish(
                &self.credentials,
                &channel,
                publication_data(will.payload),
                false,
                &self.context,
            )
            .await
        {
            Ok(admitted) => admitted,
            Err(refusal) => {
                tracing::warn!(client_id = %self.client_id, channel = %channel, reason = %refusal.message(), "mqtt: will refused");
                return;
            }
        };
        let mut request = PublishRequest::new(admitted.name.as_str(), admitted.data);
        request.skip_history = admitted.skip_history;
        request.info = Some(self.info);
        if will.qos < 2 {
            request.tags.insert(QOS_TAG.into(), will.qos.to_string());
        }
        match realtime.node.publish(request).await {
            Ok(_) => {
                tracing::debug!(client_id = %self.client_id, channel = %channel, "mqtt: will published")
            }
            Err(error) => {
                tracing::warn!(client_id = %self.client_id, %error, "mqtt: will not published")
            }
        }
    }
}
