//! The emulated Google OAuth 2.0 token endpoint (`POST /token`) for service accounts: a
//! form-encoded JWT-bearer grant whose RS256 assertion is verified against the account's
//! public key and checked the way Google documents it (`iss` a known account, `aud` this
//! endpoint's URL, a `scope` that covers FCM, `iat`/`exp` at most an hour apart and current).
//! Answers `{"access_token", "expires_in", "token_type": "Bearer"}` or Google's
//! `{"error", "error_description"}` bodies.
//!
//! Owns: nothing; it reads the accounts and writes issued tokens into the emulator's state.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use hyper::http::{Method, StatusCode, request::Parts};
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::{FcmMock, Issued};
use crate::http::{self, Response};

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Scopes that allow sending FCM messages.
const SCOPES: &[&str] = &[
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
];
/// Google refuses assertions valid for longer than an hour.
const MAX_LIFETIME_SECS: u64 = 3600;
/// Clock skew tolerated for an `iat` in the future.
const FUTURE_SKEW_SECS: u64 = 300;
const TIMEFRAME: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.";

#[derive(Deserialize)]
struct Claims {
    iss: String,
    #[serde(default)]
    scope: String,
    aud: String,
    iat: u64,
    exp: u64,
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    http::json(
        status,
        &serde_json::json!({ "error": error, "error_description": description }),
    )
}

impl FcmMock {
    pub(super) fn handle_token(&self, head: &Parts, body: &Bytes) -> Response {
        let state = &self.state;
        state.token_requests.fetch_add(1, Ordering::Relaxed);
        if head.method != Method::POST {
            return oauth_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "Only POST is supported",
            );
        }
        let mut grant_type = None;
        let mut assertion = None;
        for (name, value) in form_urlencoded::parse(body) {
            match &*name {
                "grant_type" => grant_type = Some(value.into_owned()),
                "assertion" => assertion = Some(value.into_owned()),
                _ => {}
            }
        }
        let Some(grant_type) = grant_type else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing required parameter: grant_type",
            );
        };
        if grant_type != GRANT_TYPE {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("Invalid grant_type: {grant_type}"),
            );
        }
        let Some(assertion) = assertion else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing required parameter: assertion",
            );
        };
        match self.verify_assertion(&assertion) {
            Ok(issued) => {
                let token = format!("ya29.mock.{}", hex::encode(rand::random::<[u8; 24]>()));
                let expires_in = state.expires_in.load(Ordering::Relaxed);
                let issued = Issued {
                    expires_at_ms: state.clock.now_ms() + expires_in * 1000,
                    ..issued
                };
                let mut tokens = state.access_tokens.write();
                let now = state.clock.now_ms();
                // Keep memory flat however long a run lasts: drop expired tokens as we go.
                if tokens.len() >= 1024 {
                    tokens.retain(|_, t| t.expires_at_ms > now);
                }
                tokens.insert(token.clone(), issued);
                drop(tokens);
                state.tokens_issued.fetch_add(1, Ordering::Relaxed);
                http::json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "access_token": token,
                        "expires_in": expires_in,
                        "token_type": "Bearer",
                    }),
                )
            }
            Err((error, description)) => oauth_error(StatusCode::BAD_REQUEST, error, &description),
        }
    }

    fn verify_assertion(&self, jwt: &str) -> Result<Issued, (&'static str, String)> {
        let invalid = |d: &str| ("invalid_grant", d.to_owned());
        let header =
            jsonwebtoken::decode_header(jwt).map_err(|_| invalid("Invalid JWT: malformed"))?;
        if header.alg != Algorithm::RS256 {
            return Err(invalid("Invalid JWT Signature."));
        }
        // Read `iss` first to find the key; nothing is trusted until the signature checks.
        let unverified = jsonwebtoken::dangerous::insecure_decode::<Claims>(jwt)
            .map_err(|e| invalid(&format!("Invalid JWT: {e}")))?
            .claims;
        let accounts = self.state.accounts.read();
        let account = accounts
            .get(&unverified.iss)
            .ok_or_else(|| invalid("Invalid grant: account not found"))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        let claims = jsonwebtoken::decode::<Claims>(jwt, &account.decoding, &validation)
            .map_err(|_| invalid("Invalid JWT Signature."))?
            .claims;
        if claims.aud != *self.state.token_url.read() {
            return Err(invalid("Invalid JWT: Failed audience check."));
        }
        let now = self.state.clock.now_secs();
        let timely = claims.exp > claims.iat
            && claims.exp - claims.iat <= MAX_LIFETIME_SECS
            && claims.iat <= now + FUTURE_SKEW_SECS
            && claims.exp > now;
        if !timely {
            return Err(invalid(TIMEFRAME));
        }
        let covered = claims
            .scope
            .split_whitespace()
            .any(|scope| SCOPES.contains(&scope));
        if !covered {
            return Err((
                "invalid_scope",
                format!(
                    "Invalid OAuth scope or ID token audience provided: {:?}",
                    claims.scope
                ),
            ));
        }
        Ok(Issued {
            project_id: account.project_id.clone(),
            client_email: claims.iss,
            expires_at_ms: 0,
        })
    }
}
