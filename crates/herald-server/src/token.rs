//! Minting connection tokens (HS256 JWTs) for `herald token`. Verification arrives with the
//! real-time transports; the claims follow the Centrifugo connection token.

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ConnectionClaims {
    pub sub: String,
    pub iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no token secret: set token.hmac_secret in the config (or run `herald serve` once to generate one)"
    )]
    NoSecret,
    #[error("could not sign token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

pub fn mint(secret: &str, claims: &ConnectionClaims) -> Result<String, TokenError> {
    if secret.is_empty() {
        return Err(TokenError::NoSecret);
    }
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    Ok(jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_verifies_with_the_same_secret_only() {
        let secret = "0123456789abcdef0123456789abcdef";
        let claims = ConnectionClaims {
            sub: "alice".into(),
            iat: 1,
            exp: Some(4_000_000_000),
            channels: vec!["news".into()],
        };
        let token = mint(secret, &claims).expect("mint");
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        let decoded = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .expect("valid");
        assert_eq!(decoded.claims["sub"], "alice");
        assert_eq!(decoded.claims["channels"][0], "news");
        let wrong = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(b"another-secret-another-secret-xx"),
            &validation,
        );
        assert!(wrong.is_err());
        assert!(matches!(mint("", &claims), Err(TokenError::NoSecret)));
    }
}
