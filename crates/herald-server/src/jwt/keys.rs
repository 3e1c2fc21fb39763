//! Verification keys for tokens: the HMAC secret and `[[token.keys]]` from config, and public
//! keys fetched from a JWKS URL. Every key is pinned to one algorithm; a token is only ever
//! checked with a key's own algorithm, so the token header cannot choose it (no `alg: none`,
//! no RSA public key used as an HMAC secret).
//!
//! The JWKS is fetched lazily, cached for `jwks_cache_ttl`, and fetched again when a token
//! names a `kid` the cache does not have — at most once per `jwks_min_refresh`, so a flood of
//! made-up `kid`s costs one request per interval. May touch: the network (the JWKS URL) and
//! the key files named in config.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;

use crate::config::TokenConfig;

/// Largest JWKS document read (a key set is a few KiB).
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Keys must come over TLS, except from this machine (tests, sidecars).
fn jwks_url_allowed(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

/// A configured key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{0}: unknown algorithm {1:?} (RS256/384/512, PS256/384/512, ES256/384, EdDSA, HS256/384/512)"
    )]
    Algorithm(String, String),
    #[error("{0}: {1}")]
    Material(String, String),
    #[error("token.jwks_url {0:?} must be an https:// URL (http:// only for localhost)")]
    JwksUrl(String),
}

/// One verification key.
pub struct Key {
    pub kid: Option<String>,
    pub algorithm: Algorithm,
    decoding: DecodingKey,
    pub(super) validation: Validation,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Key {
    fn new(
        kid: Option<String>,
        algorithm: Algorithm,
        decoding: DecodingKey,
        config: &TokenConfig,
    ) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.required_spec_claims.clear();
        validation.validate_aud = !config.audience.is_empty();
        if !config.audience.is_empty() {
            validation.set_audience(&[&config.audience]);
            validation.required_spec_claims.insert("aud".into());
        }
        if !config.issuer.is_empty() {
            validation.set_issuer(&[&config.issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        Self {
            kid,
            algorithm,
            decoding,
            validation,
        }
    }

    pub(super) fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }
}

fn is_hmac(algorithm: Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    )
}

fn parse_algorithm(what: &str, name: &str) -> Result<Algorithm, KeyError> {
    Algorithm::from_str(name).map_err(|_| KeyError::Algorithm(what.into(), name.into()))
}

/// A PEM public key for `algorithm`.
fn public_key(what: &str, algorithm: Algorithm, pem: &[u8]) -> Result<DecodingKey, KeyError> {
    let parsed = match algorithm {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => DecodingKey::from_rsa_pem(pem),
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            return Err(KeyError::Material(
                what.into(),
                "HS algorithms take `secret`, not a public key".into(),
            ));
        }
    };
    parsed.map_err(|error| {
        KeyError::Material(
            what.into(),
            format!("not a PEM public key for {algorithm:?}: {error}"),
        )
    })
}

/// The algorithm a JWK is for: its `alg`, or for EC and OKP keys the one its curve allows.
/// RSA keys without `alg` are refused: RS256 and PS256 share a key type, and guessing would
/// let the token choose.
fn jwk_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    if let Some(alg) = jwk.common.key_algorithm {
        return Algorithm::from_str(&alg.to_string()).ok();
    }
    match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// The keys from config plus the JWKS cache.
#[derive(Debug)]
pub struct KeySet {
    static_keys: Vec<Arc<Key>>,
    jwks: Option<Jwks>,
}

#[derive(Debug)]
struct Jwks {
    url: String,
    client: reqwest::Client,
    min_refresh: Duration,
    ttl: Duration,
    config: TokenConfig,
    cache: RwLock<JwksCache>,
    /// One fetch at a time; the others wait for its result.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct JwksCache {
    keys: HashMap<String, Arc<Key>>,
    fetched_at: Option<Instant>,
}

impl KeySet {
    /// Builds the configured keys (reading key files); the JWKS is fetched on first use.
    pub fn from_config(config: &TokenConfig) -> Result<Self, KeyError> {
        let mut static_keys = Vec::new();
        if !config.hmac_secret.is_empty() {
            let algorithm = parse_algorithm("token.hmac_algorithm", &config.hmac_algorithm)?;
            if !is_hmac(algorithm) {
                return Err(KeyError::Algorithm(
                    "token.hmac_algorithm".into(),
                    config.hmac_algorithm.clone(),
                ));
            }
            let decoding = DecodingKey::from_secret(config.hmac_secret.as_bytes());
            static_keys.push(Arc::new(Key::new(None, algorithm, decoding, config)));
        }
        for (index, entry) in config.keys.iter().enumerate() {
            let what = if entry.kid.is_empty() {
                format!("token.keys[{index}]")
            } else {
                format!("token.keys[{index}] (kid {:?})", entry.kid)
            };
            let algorithm = parse_algorithm(&what, &entry.algorithm)?;
            let decoding = if is_hmac(algorithm) {
                if entry.secret.len() < 32 {
                    return Err(KeyError::Material(
                        what,
                        "an HS key needs `secret` of at least 32 characters".into(),
                    ));
                }
                DecodingKey::from_secret(entry.secret.as_bytes())
            } else {
                let pem = if !entry.public_key.is_empty() {
                    entry.public_key.clone().into_bytes()
                } else if entry.public_key_file != Path::new("") {
                    std::fs::read(&entry.public_key_file).map_err(|error| {
                        KeyError::Material(
                            what.clone(),
                            format!("cannot read {}: {error}", entry.public_key_file.display()),
                        )
                    })?
                } else {
                    return Err(KeyError::Material(
                        what,
                        "set `public_key` (PEM) or `public_key_file`".into(),
                    ));
                };
                public_key(&what, algorithm, &pem)?
            };
            let kid = (!entry.kid.is_empty()).then(|| entry.kid.clone());
            static_keys.push(Arc::new(Key::new(kid, algorithm, decoding, config)));
        }
        let jwks = if config.jwks_url.is_empty() {
            None
        } else {
            if !jwks_url_allowed(&config.jwks_url) {
                return Err(KeyError::JwksUrl(config.jwks_url.clone()));
            }
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                // A redirect could lead anywhere, including plain http: follow none.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|error| KeyError::Material("token.jwks_url".into(), error.to_string()))?;
            Some(Jwks {
                url: config.jwks_url.clone(),
                client,
                min_refresh: config.jwks_min_refresh.as_duration(),
                ttl: config.jwks_cache_ttl.as_duration(),
                config: config.clone(),
                cache: RwLock::new(JwksCache::default()),
                fetching: tokio::sync::Mutex::new(()),
            })
        };
        Ok(Self { static_keys, jwks })
    }

    /// Whether any key is configured (no key: every token is refused).
    pub fn is_empty(&self) -> bool {
        self.static_keys.is_empty() && self.jwks.is_none()
    }

    /// The keys that may have signed a token with this `kid`: the one with that `kid` (from
    /// config or the JWKS, fetched again if unknown), or every key when there is no `kid`.
    pub async fn candidates(&self, kid: Option<&str>) -> Vec<Arc<Key>> {
        let Some(kid) = kid else {
            let mut all = self.static_keys.clone();
            if let Some(jwks) = &self.jwks {
                jwks.refresh_if_stale().await;
                all.extend(jwks.cache.read().keys.values().cloned());
            }
            return all;
        };
        if let Some(key) = self
            .static_keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
        {
            return vec![key.clone()];
        }
        let Some(jwks) = &self.jwks else {
            return Vec::new();
        };
        jwks.refresh_if_stale().await;
        if let Some(key) = jwks.cache.read().keys.get(kid) {
            return vec![key.clone()];
        }
        // An unknown kid: the keys may have rotated. Fetch again (rate-limited).
        jwks.refresh(true).await;
        jwks.cache
            .read()
            .keys
            .get(kid)
            .cloned()
            .into_iter()
            .collect()
    }
}

impl Jwks {
    async fn refresh_if_stale(&self) {
        let stale = self
            .cache
            .read()
            .fetched_at
            .is_none_or(|at| at.elapsed() >= self.ttl);
        if stale {
            self.refresh(false).await;
        }
    }

    /// Fetches the JWKS unless the last fetch was less than `min_refresh` ago. A failed
    /// fetch keeps the keys already cached (and counts as a fetch for the rate limit).
    async fn refresh(&self, unknown_kid: bool) {
        let started = Instant::now();
        let _one_at_a_time = self.fetching.lock().await;
        if let Some(at) = self.cache.read().fetched_at {
            // Someone else fetched while we waited, or we fetched very recently.
            if at >= started || at.elapsed() < self.min_refresh {
                return;
            }
        }
        let result = self.fetch().await;
        let mut cache = self.cache.write();
        cache.fetched_at = Some(Instant::now());
        match result {
            Ok(keys) => {
                tracing::debug!(url = %self.url, keys = keys.len(), unknown_kid, "JWKS fetched");
                cache.keys = keys;
            }
            Err(error) => {
                tracing::warn!(url = %self.url, error = %error, "JWKS fetch failed; keeping the cached keys");
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<Key>>, String> {
        let response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let mut response = response;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            // Shared secrets have no place in a published key set.
            if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
                tracing::warn!(kid, "JWKS: ignoring a symmetric (oct) key");
                continue;
            }
            let Some(algorithm) = jwk_algorithm(jwk).filter(|a| !is_hmac(*a)) else {
                tracing::warn!(kid, "JWKS: ignoring a key without a usable `alg`");
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(decoding) => {
                    let key = Key::new(Some(kid.clone()), algorithm, decoding, &self.config);
                    keys.insert(kid, Arc::new(key));
                }
                Err(error) => tracing::warn!(kid, error = %error, "JWKS: ignoring a key"),
            }
        }
        Ok(keys)
    }
}
