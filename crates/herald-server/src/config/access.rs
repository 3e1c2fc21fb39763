//! `[api]`, `[token]` and `[proxy]`: who may call the server API, which tokens a client may
//! connect and subscribe with, and the application backend asked about the rest.
//!
//! Owns those sections' schema and the checks that need nothing built (API key digests).
//! May touch: nothing (plain data and pure checks).

use std::path::PathBuf;

use herald_core::duration::HumanDuration;
use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Keys accepted by the server API (`X-API-Key` or `Authorization: apikey <key>`), with
    /// the `admin` scope.
    pub keys: Vec<String>,
    /// Named keys with a scope, given as the key or as its SHA-256 digest.
    pub named_keys: Vec<NamedApiKey>,
    /// Web origins whose pages may call the server API from a browser (CORS); same patterns
    /// as `client.allowed_origins`. Empty: no cross-origin calls.
    pub cors_origins: Vec<String>,
    /// `publish` and `broadcast` calls per second per API key (429 over it); 0: no limit.
    pub publish_rate_per_key: u32,
}

/// One `[[api.named_keys]]` entry.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamedApiKey {
    /// Shown in logs (never the key).
    pub name: String,
    /// The key itself (at least 16 characters), or
    pub key: String,
    /// its SHA-256 digest in hex, so the config file need not hold the secret.
    pub sha256: String,
    /// `admin` (default), `publish` or `read`.
    pub scope: crate::auth::Scope,
}

impl ApiConfig {
    /// Whether any key is configured (without one, `serve` generates an admin key).
    pub fn has_keys(&self) -> bool {
        !(self.keys.is_empty() && self.named_keys.is_empty())
    }

    /// Every configured key, ready for checking.
    pub fn api_keys(&self) -> Result<crate::auth::ApiKeys, ConfigError> {
        let mut keys = crate::auth::ApiKeys::new(self.keys.iter().map(String::as_str));
        for (index, named) in self.named_keys.iter().enumerate() {
            let what = if named.name.is_empty() {
                format!("api.named_keys[{index}]")
            } else {
                format!("api.named_keys[{index}] ({:?})", named.name)
            };
            let digest = match (named.key.is_empty(), named.sha256.is_empty()) {
                (false, true) if named.key.len() >= 16 => crate::auth::digest(&named.key),
                (false, true) => {
                    return Err(ConfigError::Invalid(format!(
                        "{what}: `key` must be at least 16 characters"
                    )));
                }
                (true, false) => {
                    let bytes = hex::decode(named.sha256.trim()).ok();
                    bytes
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or_else(|| {
                            ConfigError::Invalid(format!(
                                "{what}: `sha256` must be 64 hex characters (sha256sum of the key)"
                            ))
                        })?
                }
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "{what}: set exactly one of `key` and `sha256`"
                    )));
                }
            };
            let name = if named.name.is_empty() {
                format!("api.named_keys[{index}]")
            } else {
                named.name.clone()
            };
            keys.add_digest(digest, named.scope, name);
        }
        Ok(keys)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// HMAC secret that signs and verifies tokens (with `hmac_algorithm`).
    pub hmac_secret: String,
    /// The algorithm `hmac_secret` verifies: HS256 (default), HS384 or HS512.
    pub hmac_algorithm: String,
    /// When set, tokens must carry this `aud`.
    pub audience: String,
    /// When set, tokens must carry this `iss`.
    pub issuer: String,
    /// More verification keys, each pinned to one algorithm.
    pub keys: Vec<TokenKey>,
    /// A JWKS document to fetch public keys from (refreshed on an unknown `kid`).
    pub jwks_url: String,
    /// Least time between two JWKS fetches (bounds what unknown `kid`s can cause).
    pub jwks_min_refresh: HumanDuration,
    /// How long a fetched JWKS is used before it is fetched again.
    pub jwks_cache_ttl: HumanDuration,
}

impl TokenConfig {
    /// Whether any token key is configured (HMAC secret, pinned keys or a JWKS).
    pub fn has_any_key(&self) -> bool {
        !self.hmac_secret.is_empty() || !self.keys.is_empty() || !self.jwks_url.is_empty()
    }
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            hmac_secret: String::new(),
            hmac_algorithm: "HS256".into(),
            audience: String::new(),
            issuer: String::new(),
            keys: Vec::new(),
            jwks_url: String::new(),
            jwks_min_refresh: HumanDuration::from_secs(30),
            jwks_cache_ttl: HumanDuration::from_secs(3600),
        }
    }
}

/// One verification key from config (`[[token.keys]]`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenKey {
    /// Matches the token header's `kid`; a token without `kid` is tried against every key.
    pub kid: String,
    /// RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384 or HS512.
    pub algorithm: String,
    /// The public key in PEM (RSA, EC or Ed25519 algorithms).
    pub public_key: String,
    /// A file holding the PEM public key, instead of `public_key`.
    pub public_key_file: PathBuf,
    /// The shared secret (HS algorithms), at least 32 characters.
    pub secret: String,
}

/// `[proxy]`: HTTP endpoints of the application's backend (Centrifugo's proxy format). An
/// empty endpoint is not called.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Connects without a token are decided by this endpoint.
    pub connect_endpoint: String,
    /// Connections the connect endpoint gave an `expire_at` are refreshed here.
    pub refresh_endpoint: String,
    /// Subscriptions in namespaces with `proxy_subscribe`.
    pub subscribe_endpoint: String,
    /// Client publications in namespaces with `proxy_publish`.
    pub publish_endpoint: String,
    /// Every `rpc` command.
    pub rpc_endpoint: String,
    /// How long one backend call may take.
    pub timeout: HumanDuration,
    /// Headers of the client's connection request passed to the backend (e.g. `Cookie`,
    /// `Authorization`, `X-Request-Id`).
    pub http_headers: Vec<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_endpoint: String::new(),
            refresh_endpoint: String::new(),
            subscribe_endpoint: String::new(),
            publish_endpoint: String::new(),
            rpc_endpoint: String::new(),
            timeout: HumanDuration::from_secs(1),
            http_headers: Vec::new(),
        }
    }
}

impl ProxyConfig {
    /// Every endpoint with its key name.
    pub fn endpoints(&self) -> [(&'static str, &String); 5] {
        [
            ("connect_endpoint", &self.connect_endpoint),
            ("refresh_endpoint", &self.refresh_endpoint),
            ("subscribe_endpoint", &self.subscribe_endpoint),
            ("publish_endpoint", &self.publish_endpoint),
            ("rpc_endpoint", &self.rpc_endpoint),
        ]
    }

    /// Whether any endpoint is set.
    pub fn is_enabled(&self) -> bool {
        self.endpoints().iter().any(|(_, url)| !url.is_empty())
    }
}
