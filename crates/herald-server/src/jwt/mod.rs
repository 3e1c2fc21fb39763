//! Token verification: connection and subscription JWTs checked against the
//! keys of [`keys::KeySet`] — the HMAC secret, `[[token.keys]]`, a JWKS URL — each pinned to
//! its algorithm (the token header's `alg` only has to agree). Optional `aud` / `iss` checks.
//! Claims follow the Centrifugo connection token: `sub`, `exp`, `iat`, `nbf`, `info`,
//! `channels`, `subs` (server-side subscriptions, keyed by channel), `meta`; a subscription
//! token has `sub`, `channel`, `exp`, `info` (the channel-specific `chan_info`).

pub mod keys;
pub mod revocation;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use herald_core::auth::{Authenticator, Credentials, SubscriptionGrant};
use herald_core::{ErrorCode, HeraldError};
use jsonwebtoken::errors::ErrorKind;
use serde::Deserialize;
use serde_json::value::RawValue;

pub use keys::{KeyError, KeySet};

use crate::config::TokenConfig;

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    exp: Option<u64>,
    info: Option<Box<RawValue>>,
    #[serde(default)]
    channels: Vec<String>,
    /// Server-side subscriptions as a map keyed by channel (the values' options are not
    /// used yet).
    #[serde(default)]
    subs: HashMap<String, serde::de::IgnoredAny>,
    /// A connection token must not name a channel (that is a subscription token).
    channel: Option<serde::de::IgnoredAny>,
    /// Token id, for revocation.
    jti: Option<String>,
    /// Issued at (Unix seconds), for "tokens issued before" revocation.
    iat: Option<u64>,
}

/// The claims of a subscription token: it names exactly one channel.
#[derive(Debug, Deserialize)]
struct SubscriptionClaims {
    #[serde(default)]
    sub: String,
    channel: String,
    exp: Option<u64>,
    info: Option<Box<RawValue>>,
    jti: Option<String>,
    iat: Option<u64>,
}

/// Verifies tokens with the configured keys, and refuses revoked ones.
#[derive(Debug)]
pub struct TokenVerifier {
    /// Swapped whole on SIGHUP ([`TokenVerifier::replace_keys`]); a verification in progress
    /// keeps the set it started with.
    keys: parking_lot::RwLock<Arc<KeySet>>,
    pub revocations: revocation::Revocations,
}

fn unauthorized(detail: impl Into<String>) -> HeraldError {
    HeraldError::new(ErrorCode::Unauthorized, detail)
}

impl TokenVerifier {
    pub fn new(keys: KeySet) -> Self {
        Self {
            keys: parking_lot::RwLock::new(Arc::new(keys)),
            revocations: revocation::Revocations::default(),
        }
    }

    /// Verifies every later token with `keys` (a key rotation); tokens already accepted keep
    /// their connections until they expire or are refreshed.
    pub fn replace_keys(&self, keys: KeySet) {
        *self.keys.write() = Arc::new(keys);
    }

    /// The verifier for `config`; keys that do not build are an error (start-up builds
    /// them through [`crate::build`], which stops on it).
    pub fn from_config(config: &TokenConfig) -> Result<Self, KeyError> {
        Ok(Self::new(KeySet::from_config(config)?))
    }

    /// Verifies the signature (with the key the `kid` names, or every key), `exp`, `nbf`,
    /// `aud` and `iss`, and decodes the claims.
    async fn verify<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, HeraldError> {
        let keys = self.keys.read().clone();
        if keys.is_empty() {
            return Err(unauthorized("no token key is configured"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| unauthorized(format!("malformed token: {error}")))?;
        let candidates = keys.candidates(header.kid.as_deref()).await;
        if candidates.is_empty() {
            return Err(unauthorized(format!(
                "no key with kid {:?}",
                header.kid.unwrap_or_default()
            )));
        }
        let mut last_error = None;
        for key in candidates.iter().filter(|k| k.algorithm == header.alg) {
            match jsonwebtoken::decode::<T>(token, key.decoding(), &key.validation) {
                Ok(data) => return Ok(data.claims),
                // The signature was good: the token is this key's, and it has expired.
                Err(error) if matches!(error.kind(), ErrorKind::ExpiredSignature) => {
                    return Err(HeraldError::new(ErrorCode::TokenExpired, ""));
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(match last_error {
            Some(error) => unauthorized(format!("invalid token: {error}")),
            None => unauthorized(format!(
                "no key for algorithm {:?}: the algorithm is set by the key, not the token",
                header.alg
            )),
        })
    }
}

#[async_trait]
impl Authenticator for TokenVerifier {
    async fn authenticate(&self, token: &str) -> Result<Credentials, HeraldError> {
        let claims: Claims = self.verify(token).await?;
        if claims.channel.is_some() {
            return Err(unauthorized("a connection token must not carry `channel`"));
        }
        self.revocations.check(
            claims.jti.as_deref(),
            &claims.sub,
            claims.iat,
            herald_core::time::now_ms() / 1000,
        )?;
        let mut channels = claims.channels;
        let mut from_subs: Vec<String> = claims.subs.into_keys().collect();
        from_subs.sort();
        for channel in from_subs {
            if !channels.contains(&channel) {
                channels.push(channel);
            }
        }
        Ok(Credentials {
            user: claims.sub,
            expires_at: claims.exp,
            info: claims.info,
            channels,
        })
    }

    async fn authenticate_subscription(
        &self,
        token: &str,
    ) -> Result<SubscriptionGrant, HeraldError> {
        let claims: SubscriptionClaims = self.verify(token).await?;
        if claims.channel.is_empty() {
            return Err(unauthorized("a subscription token must name its `channel`"));
        }
        self.revocations.check(
            claims.jti.as_deref(),
            &claims.sub,
            claims.iat,
            herald_core::time::now_ms() / 1000,
        )?;
        Ok(SubscriptionGrant {
            user: claims.sub,
            channel: claims.channel,
            expires_at: claims.exp,
            info: claims.info,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn sign(claims: serde_json::Value, alg: Algorithm, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    }

    fn hmac_verifier(secret: &str) -> TokenVerifier {
        TokenVerifier::from_config(&TokenConfig {
            hmac_secret: secret.into(),
            ..TokenConfig::default()
        })
        .expect("keys build")
    }

    #[tokio::test]
    async fn accepts_valid_and_rejects_forged_expired_and_wrong_alg() {
        let auth = hmac_verifier(SECRET);
        let now = herald_core::time::now_ms() / 1000;
        let good = sign(
            json!({"sub": "alice", "exp": now + 60, "info": {"n": 1}, "channels": ["a"], "subs": {"b": {}}}),
            Algorithm::HS256,
            SECRET,
        );
        let creds = auth.authenticate(&good).await.expect("valid");
        assert_eq!(creds.user, "alice");
        assert_eq!(
            creds.channels,
            vec!["a", "b"],
            "`subs` keys are channels too"
        );
        assert_eq!(creds.info.expect("info").get(), r#"{"n":1}"#);

        let expired = sign(
            json!({"sub": "alice", "exp": now - 1}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(
            auth.authenticate(&expired).await.expect_err("expired").code,
            ErrorCode::TokenExpired
        );
        let not_yet = sign(
            json!({"sub": "alice", "nbf": now + 60}),
            Algorithm::HS256,
            SECRET,
        );
        assert!(
            auth.authenticate(&not_yet).await.is_err(),
            "nbf in the future"
        );
        let forged = sign(
            json!({"sub": "alice"}),
            Algorithm::HS256,
            "another-secret-another-secret-xx",
        );
        assert_eq!(
            auth.authenticate(&forged).await.expect_err("forged").code,
            ErrorCode::Unauthorized
        );
        let other_alg = sign(json!({"sub": "alice"}), Algorithm::HS512, SECRET);
        assert!(
            auth.authenticate(&other_alg).await.is_err(),
            "the algorithm is pinned to HS256"
        );
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJhbGljZSJ9"
        );
        assert!(
            auth.authenticate(&none).await.is_err(),
            "alg none is refused"
        );
        let sub_token = sign(
            json!({"sub": "alice", "channel": "x"}),
            Algorithm::HS256,
            SECRET,
        );
        assert!(auth.authenticate(&sub_token).await.is_err());
        assert!(hmac_verifier("").authenticate(&good).await.is_err());
        for garbage in ["", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9..", "x"] {
            assert_eq!(
                auth.authenticate(garbage).await.expect_err(garbage).code,
                ErrorCode::Unauthorized
            );
        }
    }

    #[tokio::test]
    async fn hs512_when_configured_and_audience_and_issuer_checks() {
        let auth = TokenVerifier::from_config(&TokenConfig {
            hmac_secret: SECRET.into(),
            hmac_algorithm: "HS512".into(),
            audience: "herald".into(),
            issuer: "https://auth.example".into(),
            ..TokenConfig::default()
        })
        .expect("keys build");
        let claims = |aud: &str, iss: &str| json!({"sub": "bob", "aud": aud, "iss": iss});
        let good = sign(
            claims("herald", "https://auth.example"),
            Algorithm::HS512,
            SECRET,
        );
        assert_eq!(auth.authenticate(&good).await.expect("valid").user, "bob");
        let hs256 = sign(
            claims("herald", "https://auth.example"),
            Algorithm::HS256,
            SECRET,
        );
        assert!(auth.authenticate(&hs256).await.is_err(), "pinned to HS512");
        for (aud, iss) in [
            ("other", "https://auth.example"),
            ("herald", "https://evil"),
        ] {
            let token = sign(claims(aud, iss), Algorithm::HS512, SECRET);
            assert!(auth.authenticate(&token).await.is_err(), "{aud} {iss}");
        }
        let missing = sign(json!({"sub": "bob"}), Algorithm::HS512, SECRET);
        assert!(
            auth.authenticate(&missing).await.is_err(),
            "aud and iss are required"
        );
    }

    #[test]
    fn jwks_urls_need_tls_except_on_this_machine() {
        let config = |url: &str| TokenConfig {
            jwks_url: url.into(),
            ..TokenConfig::default()
        };
        for ok in [
            "https://auth.example.com/.well-known/jwks.json",
            "http://127.0.0.1:9000/jwks.json",
            "http://localhost/jwks",
            "http://[::1]:80/k",
        ] {
            assert!(KeySet::from_config(&config(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "http://auth.example.com/jwks.json",
            "http://127.0.0.1.evil.example/jwks",
            "ftp://x/jwks",
            "auth.example.com",
        ] {
            assert!(KeySet::from_config(&config(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_key_config_names_the_key() {
        let config = |key: crate::config::TokenKey| TokenConfig {
            keys: vec![key],
            ..TokenConfig::default()
        };
        let error = KeySet::from_config(&config(crate::config::TokenKey {
            kid: "k1".into(),
            algorithm: "RS999".into(),
            ..Default::default()
        }))
        .expect_err("bad algorithm")
        .to_string();
        assert!(error.contains("k1") && error.contains("RS999"), "{error}");
        let error = KeySet::from_config(&config(crate::config::TokenKey {
            algorithm: "RS256".into(),
            public_key: "not a pem".into(),
            ..Default::default()
        }))
        .expect_err("bad pem")
        .to_string();
        assert!(error.contains("token.keys[0]"), "{error}");
        assert!(
            KeySet::from_config(&config(crate::config::TokenKey {
                algorithm: "HS256".into(),
                secret: "short".into(),
                ..Default::default()
            }))
            .is_err()
        );
        assert!(
            KeySet::from_config(&TokenConfig {
                hmac_secret: SECRET.into(),
                hmac_algorithm: "RS256".into(),
                ..TokenConfig::default()
            })
            .is_err(),
            "the HMAC secret takes HS algorithms only"
        );
    }
}
