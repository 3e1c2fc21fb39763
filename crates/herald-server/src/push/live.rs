//! Live first, push when offline: what happens to a publication on a channel whose namespace
//! has `push_offline` (or a publish with a `push` section) once it is published.
//!
//! For each recipient user — the channel's users (`inbox:#alice`), or the section's `users` —
//! Herald looks at the channel's presence (which the node tracks for such namespaces on every
//! node): a user with no live subscription gets the push at once; a user who is subscribed
//! gets nothing, unless the namespace asks for acknowledgements (`push_ack_timeout`), in which
//! case the push is queued to go after the timeout and the client's `herald.ack` cancels it.
//! `always` in the section pushes to everyone, live or not.
//!
//! Push uids are `live:<channel>:<epoch>:<offset>` (and `…:<user>` for the acknowledged
//! kind), so a retried publish (idempotency key) or a repeated ack never sends twice.
//!
//! Owns: [`LiveFirst`] (the node's publication observer), the `push` section of publish, the
//! notification template and the `herald.ack` client method.
//!
//! May touch: the node (presence, history top) and the push service.

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::channel::ChannelName;
use herald_core::device::Provider;
use herald_core::error::HeraldError;
use herald_core::namespace::NamespaceOptions;
use herald_core::node::{Node, PublishObserver, Published};
use herald_core::publication::Payload;
use herald_core::time::now_ms;
use herald_outbound::push::SendPush;
use herald_outbound::push::request::{PushNotification, PushRecipient, RecipientFilter};
use herald_outbound::sender::{
    ApnsNotification, EmailNotification, FcmNotification, WebpushNotification,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::PushRuntime;

/// A publish request's `push` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushSection {
    /// Recipients; default: the users of a user-limited channel.
    #[serde(default)]
    users: Option<Vec<String>>,
    /// The notification; default: the namespace's template.
    #[serde(default)]
    notification: Option<PushNotification>,
    /// Push to every recipient, live or not.
    #[serde(default)]
    always: bool,
}

pub struct LiveFirst {
    pub push: Arc<PushRuntime>,
    pub node: Node,
}

fn parse_section(push: Option<&Value>) -> Result<Option<PushSection>, HeraldError> {
    push.map(|value| {
        PushSection::deserialize(value).map_err(|e| HeraldError::bad_request(format!("push: {e}")))
    })
    .transpose()
}

fn recipients(channel: &ChannelName, section: Option<&PushSection>) -> Option<Vec<String>> {
    if let Some(users) = section.and_then(|s| s.users.clone()) {
        return Some(users);
    }
    channel
        .allowed_users()
        .map(|users| users.map(str::to_string).collect())
}

#[async_trait]
impl PublishObserver for LiveFirst {
    fn wants(
        &self,
        channel: &ChannelName,
        options: &NamespaceOptions,
        push: Option<&Value>,
    ) -> Result<bool, HeraldError> {
        let section = parse_section(push)?;
        if section.is_none() && !options.push_offline {
            return Ok(false);
        }
        let users = recipients(channel, section.as_ref()).unwrap_or_default();
        if users.is_empty() || users.iter().any(String::is_empty) {
            return Err(HeraldError::bad_request(
                "push needs recipients: a user-limited channel (ns:#user) or push.users",
            ));
        }
        if let Some(notification) = section.as_ref().and_then(|s| s.notification.as_ref()) {
            let probe = SendPush {
                recipient: PushRecipient {
                    filter: Some(RecipientFilter::default()),
                    ..PushRecipient::default()
                },
                notification: notification.clone(),
                uid: Some("probe".into()),
                ..SendPush::default()
            };
            probe
                .validate()
                .map_err(|e| HeraldError::bad_request(format!("push: {e}")))?;
            // What `send_push_notification` refuses must not be dropped after the publish.
            if notification
                .expire_at
                .is_some_and(|expire| expire.saturating_mul(1000) <= now_ms())
            {
                return Err(HeraldError::bad_request(
                    "push: notification.expire_at is in the past",
                ));
            }
        }
        Ok(true)
    }

    async fn published(&self, published: Published<'_>) {
        if let Err(error) = self.route(published).await {
            tracing::warn!(%error, "queueing the offline push for a publication failed");
        }
    }
}

impl LiveFirst {
    async fn route(&self, published: Published<'_>) -> Result<(), HeraldError> {
        let section = parse_section(published.push)?;
        let Some(users) = recipients(published.channel, section.as_ref()) else {
            return Ok(());
        };
        let channel = published.channel.as_str();
        let (live, always) = match &section {
            Some(section) if section.always => (Vec::new(), true),
            _ => (self.node.live_users(channel).await?, false),
        };
        let notification = match section.and_then(|s| s.notification) {
            Some(notification) => notification,
            None => template(published.options, channel, &published),
        };
        let base = match published.position {
            Some(position) => format!("live:{channel}:{}:{}", position.epoch, position.offset),
            // Not in history: nothing to acknowledge by, nothing to repeat.
            None => format!("live:{channel}:-:{:032x}", rand::random::<u128>()),
        };
        let (offline, online): (Vec<String>, Vec<String>) =
            users.into_iter().partition(|u| always || !live.contains(u));
        let service = &self.push.service;
        if !offline.is_empty() {
            service
                .send(to_users(offline, notification.clone(), base.clone()))
                .await
                .map_err(super::api::push_error)?;
        }
        let timeout = published.options.push_ack_timeout.as_duration();
        if !timeout.is_zero() && published.position.is_some() {
            let at = now_ms().saturating_add(timeout.as_millis() as u64);
            for user in online {
                let uid = format!("{base}:{user}");
                service
                    .send_after(to_users(vec![user], notification.clone(), uid), Some(at))
                    .await
                    .map_err(super::api::push_error)?;
            }
        }
        Ok(())
    }

    /// `herald.ack {channel, offset}`: the caller got the publication live; its pending push
    /// is cancelled.
    pub async fn ack(&self, user: &str, data: Option<&Payload>) -> Result<Payload, HeraldError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Ack {
            channel: String,
            offset: u64,
        }
        let bytes = data.map_or(&b"{}"[..], |d| d.bytes());
        let ack: Ack = serde_json::from_slice(bytes)
            .map_err(|e| HeraldError::bad_request(format!("bad data: {e}")))?;
        let top = self
            .node
            .history(
                &ack.channel,
                herald_core::HistoryQuery {
                    since: None,
                    limit: Some(0),
                    reverse: false,
                },
            )
            .await?;
        let uid = format!(
            "live:{}:{}:{}:{user}",
            ack.channel, top.position.epoch, ack.offset
        );
        let cancelled = self
            .push
            .service
            .cancel(&uid)
            .await
            .map_err(super::api::push_error)?;
        Ok(Payload::Json(
            json!({ "cancelled": cancelled > 0 }).to_string().into(),
        ))
    }
}

fn to_users(users: Vec<String>, notification: PushNotification, uid: String) -> SendPush {
    SendPush {
        recipient: PushRecipient {
            filter: Some(RecipientFilter {
                users,
                ..RecipientFilter::default()
            }),
            ..PushRecipient::default()
        },
        notification,
        uid: Some(uid),
        ..SendPush::default()
    }
}

/// The namespace's template, rendered for every provider.
fn template(
    options: &NamespaceOptions,
    channel: &str,
    published: &Published<'_>,
) -> PushNotification {
    let data: Value = match &published.publication.data {
        Payload::Json(bytes) => serde_json::from_slice(bytes).unwrap_or(Value::Null),
        Payload::Binary(_) => Value::Null,
    };
    let offset = published.position.map_or(0, |p| p.offset);
    let title = render(&options.push_title, channel, offset, &data);
    let body = render(&options.push_body, channel, offset, &data);
    let mut notification = PushNotification::default();
    for provider in Provider::ALL {
        match provider {
            Provider::Fcm => {
                notification.fcm = Some(FcmNotification {
                    message: json!({
                        "notification": {"title": title, "body": body},
                        "data": {"channel": channel, "offset": offset.to_string()},
                    }),
                })
            }
            Provider::Apns => {
                notification.apns = Some(ApnsNotification {
                    headers: Default::default(),
                    payload: json!({
                        "aps": {"alert": {"title": title, "body": body}},
                        "channel": channel,
                        "offset": offset,
                    }),
                })
            }
            Provider::Webpush => {
                notification.webpush = Some(WebpushNotification {
                    headers: Default::default(),
                    payload: json!({
                        "title": title, "body": body, "channel": channel,
                        "offset": offset, "data": data,
                    }),
                })
            }
            Provider::Email => {
                notification.email = Some(EmailNotification {
                    subject: if title.is_empty() {
                        channel.to_string()
                    } else {
                        title.clone()
                    },
                    text: body.clone(),
                    html: None,
                })
            }
        }
    }
    notification
}

/// Replaces `{data.a.b}`, `{channel}` and `{offset}` in `text`.
fn render(text: &str, channel: &str, offset: u64, data: &Value) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = &rest[start + 1..start + end];
        match name {
            "channel" => out.push_str(channel),
            "offset" => out.push_str(&offset.to_string()),
            _ => match name.strip_prefix("data") {
                Some(path) if path.is_empty() || path.starts_with('.') => {
                    let mut value = data;
                    for key in path.split('.').filter(|k| !k.is_empty()) {
                        value = value.get(key).unwrap_or(&Value::Null);
                    }
                    match value {
                        Value::Null => {}
                        Value::String(s) => out.push_str(s),
                        other => out.push_str(&other.to_string()),
                    }
                }
                _ => out.push_str(&rest[start..=start + end]),
            },
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_in_data_paths_channel_and_offset() {
        let data = json!({"title": "Hi", "from": {"name": "Bob"}, "n": 3});
        assert_eq!(
            render(
                "{data.title} from {data.from.name} ({data.n}) on {channel}#{offset}",
                "inbox:#a",
                7,
                &data
            ),
            "Hi from Bob (3) on inbox:#a#7"
        );
        assert_eq!(render("{data.missing}!", "c", 1, &data), "!");
        assert_eq!(render("{unknown} {data", "c", 1, &data), "{unknown} {data");
    }
}
