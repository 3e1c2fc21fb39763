//! Google OAuth 2.0 access tokens for a service account: an RS256 JWT assertion (claims
//! `iss` = `client_email`, `scope` = FCM's, `aud` = `token_uri`, `iat`, `exp` = `iat` +
//! 3600) signed with the key file's `private_key` and exchanged at `token_uri` for a bearer
//! token (the JWT-bearer grant).
//!
//! The token is cached until shortly before its `expires_in`. Refreshes are single-flight:
//! concurrent sends that find it stale wait for one request to the token endpoint. A 401
//! from FCM drops the token that was refused (unless it was already replaced), so the next
//! attempt fetches a new one.
//!
//! Owns: the key and the cached token. May touch: the network (the token endpoint), the
//! [`Clock`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, unix_secs};
use crate::push_http;
use crate::sender::SendError;

/// The scope FCM's v1 API asks for.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The longest lifetime Google accepts for an assertion.
const ASSERTION_LIFETIME: u64 = 3600;

/// The fields of a service account key file the sender uses.
#[derive(Clone, Deserialize)]
pub(crate) struct ServiceAccountKey {
    pub project_id: String,
    pub client_email: String,
    pub private_key: String,
    #[serde(default)]
    pub private_key_id: Option<String>,
    #[serde(default = "default_token_uri")]
    pub token_uri: String,
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".to_owned()
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize, Default)]
struct TokenError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

struct Cached {
    token: Arc<str>,
    refresh_at: SystemTime,
}

/// One service account's access token.
pub(crate) struct AccessTokens {
    key: EncodingKey,
    key_id: Option<String>,
    client_email: String,
    token_uri: String,
    timeout: Duration,
    cached: RwLock<Option<Cached>>,
    /// Held while fetching: the single flight.
    refresh: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

impl AccessTokens {
    /// Loads the key and signs one assertion, so a bad key fails at start-up.
    pub(crate) fn new(
        account: &ServiceAccountKey,
        timeout: Duration,
        clock: &dyn Clock,
    ) -> Result<Self, String> {
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes())
            .map_err(|e| format!("private_key is not an RSA PEM key: {e}"))?;
        push_http::base_url(&account.token_uri).map_err(|e| format!("token_uri: {e}"))?;
        let tokens = Self {
            key,
            key_id: account.private_key_id.clone().filter(|id| !id.is_empty()),
            client_email: account.client_email.clone(),
            token_uri: account.token_uri.clone(),
            timeout,
            cached: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        };
        tokens.assertion(clock)?;
        Ok(tokens)
    }

    fn assertion(&self, clock: &dyn Clock) -> Result<String, String> {
        let iat = unix_secs(clock.now());
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key_id.clone();
        let claims = Claims {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| format!("signing the OAuth assertion failed: {e}"))
    }

    fn fresh(&self, now: SystemTime) -> Option<Arc<str>> {
        self.cached
            .read()
            .as_ref()
            .filter(|c| now < c.refresh_at)
            .map(|c| c.token.clone())
    }

    /// A valid access token: the cached one, or one fetched now (once, however many callers
    /// are waiting).
    pub(crate) async fn get(
        &self,
        client: &reqwest::Client,
        clock: &dyn Clock,
    ) -> Result<Arc<str>, SendError> {
        if let Some(token) = self.fresh(clock.now()) {
            return Ok(token);
        }
        let _flight = self.refresh.lock().await;
        // Whoever held the lock before us may have fetched it already.
        if let Some(token) = self.fresh(clock.now()) {
            return Ok(token);
        }
        let (token, expires_in) = self.fetch(client, clock).await?;
        // Refresh a little early: a tenth of the lifetime, at most five minutes.
        let margin = (expires_in / 10).min(Duration::from_secs(300));
        *self.cached.write() = Some(Cached {
            token: token.clone(),
            refresh_at: clock.now() + expires_in.saturating_sub(margin),
        });
        Ok(token)
    }

    async fn fetch(
        &self,
        client: &reqwest::Client,
        clock: &dyn Clock,
    ) -> Result<(Arc<str>, Duration), SendError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let assertion = self
            .assertion(clock)
            .map_err(|reason| SendError::NotConfigured { reason })?;
        let response = client
            .post(&self.token_uri)
            .form(&[
                ("grant_type", GRANT_TYPE),
                ("assertion", assertion.as_str()),
            ])
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| push_http::transport_error("fcm oauth", &e))?;
        let status = response.status();
        if status.is_success() {
            let body: TokenResponse = response.json().await.map_err(|e| SendError::Retry {
                reason: format!("fcm oauth: unreadable token response: {e}"),
                after: None,
            })?;
            let expires_in = Duration::from_secs(body.expires_in.unwrap_or(3600));
            return Ok((body.access_token.into(), expires_in));
        }
        let after = push_http::retry_after(response.headers(), clock.now());
        let raw = push_http::error_body(response).await;
        let error: TokenError = serde_json::from_slice(&raw).unwrap_or_default();
        let reason = format!(
            "fcm oauth: token endpoint answered {}: {} {}",
            status.as_u16(),
            error.error,
            error.error_description
        );
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(SendError::Retry { reason, after });
        }
        // invalid_grant, invalid_scope, unknown account: the credentials are wrong, and no
        // retry fixes that; the operator must.
        Err(SendError::NotConfigured { reason })
    }

    /// FCM refused `token` (401): forget it unless it was already replaced.
    pub(crate) fn rejected(&self, token: &str) {
        let mut cached = self.cached.write();
        if cached.as_ref().is_some_and(|c| &*c.token == token) {
            *cached = None;
        }
    }

    /// Requests made to the token endpoint.
    pub(crate) fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }
}
