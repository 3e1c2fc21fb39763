//! Connection token verification: HS256 JWTs signed with `token.hmac_secret`, the algorithm
//! pinned by the key (the token header's `alg` is never trusted). Claims follow the
//! Centrifugo connection token: `sub`, `exp`, `iat`, `info`, `channels`.

use herald_core::auth::{Authenticator, Credentials};
use herald_core::{ErrorCode, HeraldError};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    exp: Option<u64>,
    info: Option<Box<RawValue>>,
    #[serde(default)]
    channels: Vec<String>,
    /// A connection token must not name a channel (that is a subscription token).
    channel: Option<serde::de::IgnoredAny>,
}

/// Verifies HS256 connection tokens.
pub struct HmacAuthenticator {
    key: Option<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for HmacAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacAuthenticator")
            .field("configured", &self.key.is_some())
            .finish()
    }
}

impl HmacAuthenticator {
    /// An empty secret accepts no token at all.
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.required_spec_claims.clear();
        let key = (!secret.is_empty()).then(|| DecodingKey::from_secret(secret.as_bytes()));
        Self { key, validation }
    }
}

impl Authenticator for HmacAuthenticator {
    fn authenticate(&self, token: &str) -> Result<Credentials, HeraldError> {
        let Some(key) = &self.key else {
            return Err(HeraldError::new(
                ErrorCode::Unauthorized,
                "no token secret is configured",
            ));
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(
                |err| match err.kind() {
                    ErrorKind::ExpiredSignature => HeraldError::new(ErrorCode::TokenExpired, ""),
                    _ => HeraldError::new(ErrorCode::Unauthorized, format!("invalid token: {err}")),
                },
            )?;
        let claims = data.claims;
        if claims.channel.is_some() {
            return Err(HeraldError::new(
                ErrorCode::Unauthorized,
                "a connection token must not carry `channel`",
            ));
        }
        Ok(Credentials {
            user: claims.sub,
            expires_at: claims.exp,
            info: claims.info,
            channels: claims.channels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn sign(claims: serde_json::Value, alg: Algorithm, secret: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    }

    #[test]
    fn accepts_valid_and_rejects_forged_expired_and_wrong_alg() {
        let auth = HmacAuthenticator::new(SECRET);
        let now = herald_core::time::now_ms() / 1000;
        let good = sign(
            json!({"sub": "alice", "exp": now + 60, "info": {"n": 1}, "channels": ["a"]}),
            Algorithm::HS256,
            SECRET,
        );
        let creds = auth.authenticate(&good).expect("valid");
        assert_eq!(creds.user, "alice");
        assert_eq!(creds.channels, vec!["a"]);
        assert_eq!(creds.info.expect("info").get(), r#"{"n":1}"#);

        let expired = sign(
            json!({"sub": "alice", "exp": now - 1}),
            Algorithm::HS256,
            SECRET,
        );
        assert_eq!(
            auth.authenticate(&expired).expect_err("expired").code,
            ErrorCode::TokenExpired
        );
        let forged = sign(
            json!({"sub": "alice"}),
            Algorithm::HS256,
            "another-secret-another-secret-xx",
        );
        assert_eq!(
            auth.authenticate(&forged).expect_err("forged").code,
            ErrorCode::Unauthorized
        );
        let other_alg = sign(json!({"sub": "alice"}), Algorithm::HS512, SECRET);
        assert!(
            auth.authenticate(&other_alg).is_err(),
            "the algorithm is pinned to HS256"
        );
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJhbGljZSJ9"
        );
        assert!(auth.authenticate(&none).is_err(), "alg none is refused");
        let sub_token = sign(
            json!({"sub": "alice", "channel": "x"}),
            Algorithm::HS256,
            SECRET,
        );
        assert!(auth.authenticate(&sub_token).is_err());
        assert!(HmacAuthenticator::new("").authenticate(&good).is_err());
    }
}
