//! What one Web Push attempt is made of, checked before anything goes on the wire: the
//! browser's `PushSubscription` (the device token), the endpoint URL rules, the request
//! headers a notification may set (`TTL`, `Urgency`, `Topic`), and the payload bytes.
//!
//! Owns: parsing and validation, each failure a human-readable reason the sender returns as
//! `Rejected`.
//!
//! May touch: nothing (pure functions).

use std::net::IpAddr;

use p256::PublicKey;
use serde::Deserialize;
use url::Url;
use web_push_native::Auth;

use super::vapid::decode_base64url;
use crate::egress::non_public_reason;
use crate::sender::WebpushNotification;

/// Default `TTL` when a notification gives none: 28 days, the longest the major push
/// services keep a message.
pub const DEFAULT_TTL: u64 = 2_419_200;
/// A push service must accept a 4096-byte message body (RFC 8030 §7.2, RFC 8291 §4). The
/// aes128gcm header (86 bytes), the padding delimiter (1) and the tag (16) leave this much
/// for the payload in one record.
pub const MAX_PAYLOAD: usize = 4096 - 86 - 1 - 16;
/// Bound on the device token we are willing to parse (a real one is ~200-500 bytes).
const MAX_SUBSCRIPTION_JSON: usize = 8 * 1024;

/// A browser `PushSubscription`, as `JSON.stringify(subscription)` gives it.
#[derive(Clone, Debug)]
pub struct Subscription {
    pub endpoint: Url,
    pub p256dh: PublicKey,
    pub auth: Auth,
}

#[derive(Deserialize)]
struct SubscriptionJson {
    endpoint: String,
    keys: KeysJson,
}

#[derive(Deserialize)]
struct KeysJson {
    p256dh: String,
    auth: String,
}

impl Subscription {
    /// Parses the device token. Unknown fields (`expirationTime`, …) are ignored: browsers
    /// add them and they do not change how the message is sent.
    pub fn parse(token: &str) -> Result<Self, String> {
        if token.len() > MAX_SUBSCRIPTION_JSON {
            return Err(format!(
                "push subscription is {} bytes, more than {MAX_SUBSCRIPTION_JSON}",
                token.len()
            ));
        }
        let json: SubscriptionJson = serde_json::from_str(token).map_err(|e| {
            format!(
                "device token is not a PushSubscription JSON \
                 ({{\"endpoint\": …, \"keys\": {{\"p256dh\": …, \"auth\": …}}}}): {e}"
            )
        })?;
        let endpoint = Url::parse(&json.endpoint).map_err(|e| {
            format!(
                "subscription endpoint {:?} is not a URL: {e}",
                json.endpoint
            )
        })?;
        if endpoint.host().is_none() {
            return Err(format!("subscription endpoint {endpoint} has no host"));
        }
        if !endpoint.username().is_empty() || endpoint.password().is_some() {
            return Err("subscription endpoint must not carry credentials".into());
        }
        let p256dh = decode_base64url(&json.keys.p256dh)
            .map_err(|e| format!("keys.p256dh is not base64url: {e}"))?;
        let p256dh = PublicKey::from_sec1_bytes(&p256dh)
            .map_err(|_| "keys.p256dh is not a P-256 public key".to_owned())?;
        let auth = decode_base64url(&json.keys.auth)
            .map_err(|e| format!("keys.auth is not base64url: {e}"))?;
        let auth_len = auth.len();
        let auth: [u8; 16] = auth
            .try_into()
            .map_err(|_| format!("keys.auth must be 16 bytes (RFC 8291), got {auth_len}"))?;
        let auth = Auth::from(auth);
        Ok(Self {
            endpoint,
            p256dh,
            auth,
        })
    }
}

/// The endpoint rules that need no DNS: https only, and an IP literal must be public, unless
/// private endpoints are allowed (tests, or a push service on the operator's own network).
/// Host names are checked when they are resolved (`egress::PublicOnlyResolver`).
pub fn check_endpoint(endpoint: &Url, allow_private: bool) -> Result<(), String> {
    match endpoint.scheme() {
        "https" => {}
        "http" if allow_private => {}
        other => {
            return Err(format!(
                "push endpoint must use https, not {other}: ({endpoint})"
            ));
        }
    }
    if allow_private {
        return Ok(());
    }
    let ip: Option<IpAddr> = match endpoint.host() {
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
        _ => None,
    };
    if let Some(ip) = ip
        && let Some(reason) = non_public_reason(ip)
    {
        return Err(format!(
            "push endpoint address {ip} is {reason}; only public addresses are allowed"
        ));
    }
    Ok(())
}

/// Web Push urgency (RFC 8030 §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Urgency {
    VeryLow,
    Low,
    Normal,
    High,
}

impl Urgency {
    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::VeryLow => "very-low",
            Urgency::Low => "low",
            Urgency::Normal => "normal",
            Urgency::High => "high",
        }
    }
}

/// The request headers a notification set, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushHeaders {
    pub ttl: u64,
    pub urgency: Option<Urgency>,
    pub topic: Option<String>,
}

impl PushHeaders {
    /// Reads `ttl`, `urgency` and `topic` (names case-insensitive). Any other name is refused
    /// rather than dropped, so a typo does not go unnoticed.
    pub fn from_notification(notification: &WebpushNotification) -> Result<Self, String> {
        let mut headers = PushHeaders {
            ttl: DEFAULT_TTL,
            urgency: None,
            topic: None,
        };
        for (name, value) in &notification.headers {
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "ttl" => {
                    headers.ttl = value.parse().map_err(|_| {
                        format!("ttl {value:?} must be a whole number of seconds >= 0")
                    })?;
                }
                "urgency" => {
                    headers.urgency = Some(match value {
                        "very-low" => Urgency::VeryLow,
                        "low" => Urgency::Low,
                        "normal" => Urgency::Normal,
                        "high" => Urgency::High,
                        _ => {
                            return Err(format!(
                                "urgency {value:?} must be very-low, low, normal or high"
                            ));
                        }
                    });
                }
                "topic" => {
                    // RFC 8030 §5.4: at most 32 characters of the URL- and filename-safe
                    // base64 alphabet.
                    let valid = !value.is_empty()
                        && value.len() <= 32
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !valid {
                        return Err(format!(
                            "topic {value:?} must be 1-32 characters of A-Z a-z 0-9 - _"
                        ));
                    }
                    headers.topic = Some(value.to_owned());
                }
                other => {
                    return Err(format!(
                        "unknown Web Push header {other:?} (expected ttl, urgency, topic)"
                    ));
                }
            }
        }
        Ok(headers)
    }
}

/// The bytes to encrypt: a JSON string is sent as its text, any other value as its JSON.
pub fn payload_bytes(notification: &WebpushNotification) -> Result<Vec<u8>, String> {
    let bytes = match &notification.payload {
        serde_json::Value::String(text) => text.as_bytes().to_vec(),
        other => serde_json::to_vec(other).map_err(|e| format!("payload: {e}"))?,
    };
    if bytes.len() > MAX_PAYLOAD {
        return Err(format!(
            "payload too large: {} bytes, at most {MAX_PAYLOAD} fit in a 4096-byte push message",
            bytes.len()
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const P256DH: &str =
        "BLn9b-VR0ca83knDNZ32dCHGyjJp-1riX9ZTN40MqV8K_LpQmLqxC_DoHvqvFXO_nGdAB4W9dogZb_sM-uV4JbY";
    const AUTH: &str = "_ordMnz7uTCmrpBTeUV4Bw";

    fn token(endpoint: &str, p256dh: &str, auth: &str) -> String {
        serde_json::json!({"endpoint": endpoint, "expirationTime": null,
            "keys": {"p256dh": p256dh, "auth": auth}})
        .to_string()
    }

    #[test]
    fn a_browser_subscription_parses() {
        let sub = Subscription::parse(&token("https://push.example/abc", P256DH, AUTH))
            .expect("valid subscription");
        assert_eq!(sub.endpoint.as_str(), "https://push.example/abc");
    }

    #[test]
    fn malformed_subscriptions_are_refused_with_a_reason() {
        let cases = [
            ("not json".to_owned(), "not a PushSubscription"),
            (r#"{"endpoint":"https://x/"}"#.to_owned(), "missing field"),
            (token("nope", P256DH, AUTH), "not a URL"),
            (token("https://u:p@x/", P256DH, AUTH), "credentials"),
            (token("https://x/", "!!", AUTH), "p256dh is not base64url"),
            (token("https://x/", "AAAA", AUTH), "not a P-256 public key"),
            (token("https://x/", P256DH, "AAAA"), "16 bytes"),
            ("x".repeat(9000), "more than"),
        ];
        for (token, expected) in cases {
            let err = Subscription::parse(&token).expect_err("should be refused");
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
    }

    #[test]
    fn endpoints_must_be_https_and_public_unless_allowed() {
        let check = |u: &str, allow| check_endpoint(&Url::parse(u).expect("url"), allow);
        assert!(check("https://fcm.googleapis.com/fcm/send/x", false).is_ok());
        assert!(check("https://8.8.8.8/x", false).is_ok());
        for refused in [
            "http://push.example/x",
            "ftp://push.example/x",
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://192.168.0.10:8443/x",
            "https://172.20.0.1/x",
            "https://169.254.169.254/latest",
            "https://100.64.1.1/x",
            "https://[::1]/x",
            "https://[fd00::5]/x",
            "https://[fe80::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://[::ffff:10.0.0.1]/x",
            "https://0.0.0.0/x",
        ] {
            assert!(check(refused, false).is_err(), "{refused} must be refused");
        }
        assert!(check("http://127.0.0.1:8090/x", true).is_ok());
        assert!(check("ftp://127.0.0.1/x", true).is_err());
    }

    fn notification(headers: &[(&str, &str)]) -> WebpushNotification {
        WebpushNotification {
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            payload: serde_json::json!("hi"),
        }
    }

    #[test]
    fn headers_are_validated() {
        let ok = PushHeaders::from_notification(&notification(&[
            ("TTL", "60"),
            ("Urgency", "very-low"),
            ("topic", "news_1-A"),
        ]))
        .expect("valid");
        assert_eq!(
            ok,
            PushHeaders {
                ttl: 60,
                urgency: Some(Urgency::VeryLow),
                topic: Some("news_1-A".into())
            }
        );
        let default = PushHeaders::from_notification(&notification(&[])).expect("empty");
        assert_eq!(default.ttl, DEFAULT_TTL);
        for bad in [
            ("ttl", "-1"),
            ("ttl", "soon"),
            ("urgency", "urgent"),
            ("topic", ""),
            ("topic", "has space"),
            ("topic", "a/b"),
            ("topic", &"x".repeat(33)),
            ("x-custom", "1"),
        ] {
            assert!(
                PushHeaders::from_notification(&notification(&[bad])).is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn payloads_are_text_or_json_and_bounded() {
        let mut n = notification(&[]);
        assert_eq!(payload_bytes(&n).expect("text"), b"hi");
        n.payload = serde_json::json!({"a": 1});
        assert_eq!(payload_bytes(&n).expect("json"), br#"{"a":1}"#);
        n.payload = serde_json::json!("x".repeat(MAX_PAYLOAD));
        assert!(payload_bytes(&n).is_ok());
        n.payload = serde_json::json!("x".repeat(MAX_PAYLOAD + 1));
        assert!(
            payload_bytes(&n)
                .expect_err("too big")
                .contains("too large")
        );
    }
}
