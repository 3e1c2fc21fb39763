//! What the `push` scenario sends and reads back, for both the Herald path and the bare
//! sender, so the two send the very same notifications: device tokens, the notification
//! carrying a sequence number (APNs payload key `seq`; FCM `data.seq`), the providers'
//! credentials (an ES256 APNs provider token; an FCM OAuth access token from the emulator's
//! token endpoint, for an RS256 assertion), and the emulator's control API (reset, counters,
//! accepted notifications with their `time_ms`).
//!
//! Owns: no state beyond one HTTP client for the control API. May touch: the network (the
//! emulator's control API and OAuth endpoint, nothing else).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::pushprocs::{APNS_TOPIC, ApnsKeyInfo, FcmAccountInfo};

/// Which provider a phase pushes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Apns,
    Fcm,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Apns => "apns",
            Provider::Fcm => "fcm",
        }
    }
}

/// The device token of bench device `i`: 64 hex digits for APNs, an FCM-like registration
/// token (152 characters) for FCM.
pub fn device_token(provider: Provider, i: usize) -> String {
    match provider {
        Provider::Apns => format!("{:016x}{i:048x}", 0x4845_5241_4c44_u64),
        Provider::Fcm => format!("hb{i:010}:APA91b{}", "h".repeat(133)),
    }
}

const TITLE: &str = "Herald bench";
const BODY: &str = "A new message in #general";

/// The provider's part of the notification of sequence number `seq`: the APNs payload, or
/// the FCM message without its target.
pub fn provider_part(provider: Provider, seq: u64) -> Value {
    match provider {
        Provider::Apns => json!({"aps": {"alert": {"title": TITLE, "body": BODY}}, "seq": seq}),
        Provider::Fcm => json!({
            "notification": {"title": TITLE, "body": BODY},
            "data": {"seq": seq.to_string()},
        }),
    }
}

/// `send_push_notification`'s `notification` for sequence number `seq`.
pub fn api_notification(provider: Provider, seq: u64) -> Value {
    match provider {
        Provider::Apns => json!({"apns": {"payload": provider_part(provider, seq)}}),
        Provider::Fcm => json!({"fcm": {"message": provider_part(provider, seq)}}),
    }
}

/// An APNs provider token (ES256 JWT, `kid` = key id, claims `iss` = team id and `iat`), as
/// Herald's sender signs it.
pub fn apns_jwt(key: &ApnsKeyInfo) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Claims<'a> {
        iss: &'a str,
        iat: u64,
    }
    let encoding = EncodingKey::from_ec_pem(key.key_pem.as_bytes()).context("APNs key")?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.key_id.clone());
    let claims = Claims {
        iss: &key.team_id,
        iat: unix_secs(),
    };
    jsonwebtoken::encode(&header, &claims, &encoding).context("signing the APNs provider token")
}

fn unix_secs() -> u64 {
    crate::push::now_ns() / 1_000_000_000
}

/// An FCM access token from the service account's `token_uri` (the JWT-bearer grant).
pub async fn fcm_access_token(
    client: &reqwest::Client,
    account: &FcmAccountInfo,
) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Claims<'a> {
        iss: &'a str,
        scope: &'a str,
        aud: &'a str,
        iat: u64,
        exp: u64,
    }
    let field = |name: &str| -> anyhow::Result<&str> {
        account.credentials_json[name]
            .as_str()
            .with_context(|| format!("the service account has no {name}"))
    };
    let token_uri = field("token_uri")?;
    let encoding =
        EncodingKey::from_rsa_pem(field("private_key")?.as_bytes()).context("FCM private key")?;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(field("private_key_id")?.to_owned());
    let iat = unix_secs();
    let claims = Claims {
        iss: &account.client_email,
        scope: "https://www.googleapis.com/auth/firebase.messaging",
        aud: token_uri,
        iat,
        exp: iat + 3600,
    };
    let assertion =
        jsonwebtoken::encode(&header, &claims, &encoding).context("signing the OAuth assertion")?;
    let form = format!(
        "grant_type={}&assertion={assertion}",
        "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
    );
    let response = client
        .post(token_uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .context("the OAuth token endpoint")?;
    let status = response.status();
    let body: Value = response.json().await.context("the OAuth token answer")?;
    match body["access_token"].as_str() {
        Some(token) if status.is_success() => Ok(token.to_owned()),
        _ => bail!("the OAuth token endpoint answered {status}: {body}"),
    }
}

/// The emulator's counters for one provider.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct MockStats {
    pub requests: u64,
    pub accepted: u64,
    pub connections: u64,
    #[serde(default)]
    pub rejected: BTreeMap<String, u64>,
}

/// One accepted notification: its sequence number (none: not one of ours), when the
/// emulator accepted it (Unix ms) and the device token it went to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub seq: Option<u64>,
    pub time_ms: u64,
    pub token: String,
}

#[derive(Deserialize)]
struct Records<T> {
    records: Vec<T>,
}

#[derive(Deserialize)]
struct ApnsRecord {
    token: String,
    payload: Value,
    time_ms: u64,
}

#[derive(Deserialize)]
struct FcmRecord {
    message: Value,
    time_ms: u64,
}

/// The emulator's control API.
pub struct Control {
    client: reqwest::Client,
    base: String,
}

impl Control {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("control API client")?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Forgets records and counters (and, for FCM, every access token issued so far).
    pub async fn reset(&self) -> anyhow::Result<()> {
        let response = self
            .client
            .post(format!("{}/reset", self.base))
            .send()
            .await
            .context("emulator reset")?;
        if !response.status().is_success() {
            bail!("emulator reset answered {}", response.status());
        }
        Ok(())
    }

    pub async fn stats(&self, provider: Provider) -> anyhow::Result<MockStats> {
        self.client
            .get(format!("{}/{}/stats", self.base, provider.name()))
            .send()
            .await
            .context("emulator stats")?
            .json()
            .await
            .context("emulator stats body")
    }

    /// Every accepted notification the emulator kept, oldest first.
    pub async fn receipts(&self, provider: Provider) -> anyhow::Result<Vec<Receipt>> {
        let body = self
            .client
            .get(format!("{}/{}/records", self.base, provider.name()))
            .send()
            .await
            .context("emulator records")?
            .bytes()
            .await
            .context("emulator records body")?;
        Ok(match provider {
            Provider::Apns => serde_json::from_slice::<Records<ApnsRecord>>(&body)
                .context("APNs records")?
                .records
                .into_iter()
                .map(|r| Receipt {
                    seq: r.payload["seq"].as_u64(),
                    time_ms: r.time_ms,
                    token: r.token,
                })
                .collect(),
            Provider::Fcm => serde_json::from_slice::<Records<FcmRecord>>(&body)
                .context("FCM records")?
                .records
                .into_iter()
                .map(|r| Receipt {
                    seq: r.message["data"]["seq"]
                        .as_str()
                        .and_then(|s| s.parse().ok()),
                    time_ms: r.time_ms,
                    token: r.message["token"].as_str().unwrap_or_default().to_owned(),
                })
                .collect(),
        })
    }
}

/// The headers Herald's APNs sender puts on an alert push (besides `authorization`).
pub fn apns_headers() -> [(&'static str, &'static str); 4] {
    [
        ("apns-push-type", "alert"),
        ("apns-priority", "10"),
        ("apns-topic", APNS_TOPIC),
        ("content-type", "application/json"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_what_the_emulators_accept() {
        let apns = device_token(Provider::Apns, 12_345);
        assert_eq!(apns.len(), 64);
        assert!(apns.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(apns, device_token(Provider::Apns, 12_346));
        let fcm = device_token(Provider::Fcm, 7);
        assert!(
            fcm.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':'))
        );
        assert_eq!(fcm.len(), 152);
    }

    #[test]
    fn notifications_carry_their_sequence_number() {
        let apns = api_notification(Provider::Apns, 42);
        assert_eq!(apns["apns"]["payload"]["seq"], 42);
        let fcm = api_notification(Provider::Fcm, 42);
        assert_eq!(fcm["fcm"]["message"]["data"]["seq"], "42");
    }
}
