//! `send_push_notification` as the server API accepts it — Centrifugo PRO's shape, so `cent`
//! and `cent.js` work unchanged — and its validation.
//!
//! Owns: the request types (also stored as the fan-out job's payload, so a queued push
//! survives a restart exactly as it was accepted) and [`SendPush::validate`].
//!
//! May touch: nothing.

use std::collections::BTreeSet;

use herald_core::device::{DeviceFilter, Platform, Provider};
use herald_core::integer;
use serde::{Deserialize, Serialize};

use crate::sender::{ApnsNotification, EmailNotification, FcmNotification, WebpushNotification};

/// Who gets a push: exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRecipient {
    /// Registered devices matching a filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<RecipientFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fcm_tokens: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fcm_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fcm_condition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apns_tokens: Option<Vec<String>>,
    /// Web Push subscriptions (each the `PushSubscription` JSON as a string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webpush_tokens: Option<Vec<String>>,
    /// Email addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emails: Option<Vec<String>>,
    /// Huawei targets are Centrifugo's; Herald has no HMS sender and says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hms_tokens: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hms_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hms_condition: Option<String>,
    /// Whose credentials send to raw tokens (empty: the default app).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app: String,
}

/// `recipient.filter`: registered devices, AND across fields, OR within one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientFilter {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default)]
    pub providers: Vec<Provider>,
    #[serde(default)]
    pub platforms: Vec<Platform>,
}

impl RecipientFilter {
    pub fn to_device_filter(&self) -> DeviceFilter {
        DeviceFilter {
            ids: self.ids.clone(),
            users: self.users.clone(),
            topics: self.topics.clone(),
            providers: self.providers.clone(),
            platforms: self.platforms.clone(),
        }
    }
}

/// The notification, in each provider's own format, for the providers it should reach.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushNotification {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fcm: Option<FcmNotification>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apns: Option<ApnsNotification>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webpush: Option<WebpushNotification>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailNotification>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hms: Option<serde_json::Value>,
    /// Unix seconds after which Herald stops trying (not the providers' own TTL fields).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integer::optional"
    )]
    pub expire_at: Option<u64>,
}

impl PushNotification {
    /// Whether there is something to send through `provider`.
    pub fn has(&self, provider: Provider) -> bool {
        match provider {
            Provider::Fcm => self.fcm.is_some(),
            Provider::Apns => self.apns.is_some(),
            Provider::Webpush => self.webpush.is_some(),
            Provider::Email => self.email.is_some(),
        }
    }

    /// The provider's part as JSON text, for delivery jobs.
    pub fn part(&self, provider: Provider) -> Option<Box<serde_json::value::RawValue>> {
        use serde_json::value::to_raw_value;
        let value = match provider {
            Provider::Fcm => to_raw_value(self.fcm.as_ref()?),
            Provider::Apns => to_raw_value(self.apns.as_ref()?),
            Provider::Webpush => to_raw_value(self.webpush.as_ref()?),
            Provider::Email => to_raw_value(self.email.as_ref()?),
        };
        value.ok()
    }
}

/// One rate policy: at most `rate` pushes per `interval_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatePolicy {
    #[serde(deserialize_with = "integer::required")]
    pub rate: u32,
    #[serde(deserialize_with = "integer::required")]
    pub interval_ms: u64,
}

/// `limit_strategy.rate_limit`: per-key limits; the key names whom the limit counts
/// (`{user}` and `{device}` are replaced; default `{device}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub policies: Vec<RatePolicy>,
    /// Drop a rate-limited push instead of delaying it to the next window.
    #[serde(default)]
    pub drop_if_rate_limited: bool,
}

/// `limit_strategy.time_limit`: deliver only between these local times of the device
/// (`HH:MM:SS`, in the device's time zone; a window may wrap midnight).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeLimit {
    pub send_after_time: String,
    pub send_before_time: String,
    /// A device without a time zone gets it now (otherwise its window is in UTC).
    #[serde(default)]
    pub no_tz_send_now: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitStrategy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit: Option<TimeLimit>,
}

/// `send_push_notification`'s parameters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendPush {
    pub recipient: PushRecipient,
    pub notification: PushNotification,
    /// Idempotency and cancel key; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Centrifugo's analytics id; Herald uses it as the `uid` when no `uid` is given (and
    /// `update_push_status` names a push by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analytics_uid: Option<String>,
    /// Unix seconds: not before then.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integer::optional"
    )]
    pub send_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_strategy: Option<LimitStrategy>,
    /// Accepted for compatibility; Herald always sends reliably (durable queue, retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimize_for_reliability: Option<bool>,
    /// Not supported: rejected when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localizations: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_templating: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_meta: Option<bool>,
}

/// Most device ids or raw tokens a request may name and still be expanded when it is
/// accepted, without a `push.fanout` job (see [`SendPush::expands_when_accepted`]).
pub const EXPAND_WHEN_ACCEPTED: usize = 100;

/// Longest `uid`.
pub const MAX_UID: usize = 128;
/// Most raw tokens in one request.
pub const MAX_RAW_TOKENS: usize = 10_000;

impl SendPush {
    /// Checks the request and returns the uid it will be known by.
    pub fn validate(&self) -> Result<String, String> {
        if self.localizations.is_some() || self.use_templating == Some(true) {
            return Err("localizations and use_templating are not supported".into());
        }
        if self.use_meta == Some(true) {
            return Err("use_meta is not supported".into());
        }
        let r = &self.recipient;
        if r.hms_tokens.is_some() || r.hms_topic.is_some() || r.hms_condition.is_some() {
            return Err("HMS (Huawei) recipients are not supported".into());
        }
        if self.notification.hms.is_some() {
            return Err("notification.hms is not supported".into());
        }
        let set = [
            r.filter.is_some(),
            r.fcm_tokens.is_some(),
            r.fcm_topic.is_some(),
            r.fcm_condition.is_some(),
            r.apns_tokens.is_some(),
            r.webpush_tokens.is_some(),
            r.emails.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count();
        if set != 1 {
            return Err(
                "recipient must set exactly one of filter, fcm_tokens, fcm_topic, \
                 fcm_condition, apns_tokens, webpush_tokens, emails"
                    .into(),
            );
        }
        let needs = |provider: Provider| {
            if self.notification.has(provider) {
                Ok(())
            } else {
                Err(format!(
                    "recipient is {provider} but notification.{provider} is missing"
                ))
            }
        };
        for (tokens, provider) in [
            (&r.fcm_tokens, Provider::Fcm),
            (&r.apns_tokens, Provider::Apns),
            (&r.webpush_tokens, Provider::Webpush),
            (&r.emails, Provider::Email),
        ] {
            if let Some(tokens) = tokens {
                needs(provider)?;
                if tokens.is_empty() || tokens.len() > MAX_RAW_TOKENS {
                    return Err(format!(
                        "{provider} recipients: between 1 and {MAX_RAW_TOKENS} tokens"
                    ));
                }
                if tokens.iter().any(|t| t.is_empty()) {
                    return Err(format!("{provider} recipients: an empty token"));
                }
            }
        }
        if r.fcm_topic.is_some() || r.fcm_condition.is_some() {
            needs(Provider::Fcm)?;
        }
        if r.filter.is_some()
            && !Provider::ALL
                .into_iter()
                .any(|provider| self.notification.has(provider))
        {
            return Err("notification has nothing to send (no fcm, apns, webpush or email)".into());
        }
        if let Some(limits) = &self.limit_strategy {
            if let Some(rate) = &limits.rate_limit
                && (rate.policies.is_empty()
                    || rate
                        .policies
                        .iter()
                        .any(|p| p.rate == 0 || p.interval_ms == 0))
            {
                return Err(
                    "limit_strategy.rate_limit needs policies with rate and interval_ms > 0".into(),
                );
            }
            if let Some(time) = &limits.time_limit {
                crate::push::limits::parse_time(&time.send_after_time)?;
                crate::push::limits::parse_time(&time.send_before_time)?;
            }
        }
        let uid = match (&self.uid, &self.analytics_uid) {
            (Some(uid), Some(analytics)) if uid != analytics => {
                return Err("uid and analytics_uid differ; give one (or the same)".into());
            }
            (Some(uid), _) | (None, Some(uid)) => uid.clone(),
            (None, None) => uuid_like(),
        };
        if uid.is_empty() || uid.len() > MAX_UID {
            return Err(format!("uid must be 1 to {MAX_UID} bytes"));
        }
        Ok(uid)
    }

    /// Whether the request is small and explicit enough to become its delivery jobs right
    /// away, in the enqueue that accepts it: up to [`EXPAND_WHEN_ACCEPTED`] device ids (a
    /// filter by ids, optionally narrowed by provider or platform) or raw tokens, an FCM
    /// topic or condition — without `limit_strategy`, whose outcome the `push.fanout` job
    /// records. The common "this user's phone" push then costs one enqueue and no second job.
    /// Scheduled pushes are never expanded early (the caller checks the time).
    pub fn expands_when_accepted(&self) -> bool {
        if self.limit_strategy.is_some() {
            return false;
        }
        let r = &self.recipient;
        if let Some(filter) = &r.filter {
            return !filter.ids.is_empty()
                && filter.ids.len() <= EXPAND_WHEN_ACCEPTED
                && filter.users.is_empty()
                && filter.topics.is_empty();
        }
        let raw: usize = [&r.fcm_tokens, &r.apns_tokens, &r.webpush_tokens, &r.emails]
            .into_iter()
            .flatten()
            .map(Vec::len)
            .sum();
        raw <= EXPAND_WHEN_ACCEPTED
    }

    /// The providers this request can reach.
    pub fn providers(&self) -> BTreeSet<Provider> {
        Provider::ALL
            .into_iter()
            .filter(|p| self.notification.has(*p))
            .collect()
    }
}

/// A random 128-bit id in hex (uids need only be unique).
fn uuid_like() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}
