//! VAPID (RFC 8292): the application server's P-256 key, the signed JWT that identifies it to
//! a push service, and a per-origin cache of those JWTs.
//!
//! Owns: key parsing and generation ([`VapidKey`], [`generate_vapid_keys`]), the `subject`
//! rule, and [`VapidSigner`] (one per configured app).
//!
//! May touch: the clock. Nothing else.
//!
//! Why not web-push-native's own VAPID helper (`WebPushBuilder::with_vapid`): it sets the JWT's
//! `aud` to `scheme://host` without the port (wrong for an origin on a non-default port), ties
//! the JWT's lifetime to the message `TTL` (a 28-day TTL would make a 28-day JWT, RFC 8292 says
//! at most 24 hours), and signs anew for every message. The JWT is small enough to build here
//! with p256's ECDSA (ES256, RFC 7515/7518).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey as _;
use parking_lot::Mutex;
use rand::RngCore as _;

/// How long a VAPID JWT is valid. RFC 8292 allows at most 24 hours; 12 leaves room for a push
/// service whose clock is ahead of ours.
pub const JWT_VALIDITY: Duration = Duration::from_secs(12 * 3600);
/// A cached JWT is replaced once it has less than this left, so none expires in flight.
pub const RESIGN_MARGIN: Duration = Duration::from_secs(3600);
/// Bound on cached origins per app. Push services are few, but WNS hands out many host names;
/// past the bound expired entries are dropped, then everything.
const CACHE_CAPACITY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VapidKeyError {
    #[error("VAPID private key is not valid base64url: {0}")]
    Base64(String),
    #[error(
        "VAPID private key must be a 32-byte P-256 scalar (base64url, 43 characters), got {0} bytes"
    )]
    Length(usize),
    #[error("VAPID private key is not a valid P-256 private key")]
    Scalar,
    #[error("VAPID private key PEM cannot be read (expected EC PRIVATE KEY or PRIVATE KEY): {0}")]
    Pem(String),
}

/// An application server key pair.
#[derive(Clone)]
pub struct VapidKey {
    signing: SigningKey,
    public_b64: String,
}

impl std::fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private half.
        f.debug_struct("VapidKey")
            .field("public", &self.public_b64)
            .finish_non_exhaustive()
    }
}

impl VapidKey {
    /// Reads a key as web-push libraries print it (base64url of the raw 32-byte scalar, with or
    /// without padding) or as a PEM file from openssl (`EC PRIVATE KEY` or PKCS#8
    /// `PRIVATE KEY`).
    pub fn parse(text: &str) -> Result<Self, VapidKeyError> {
        let text = text.trim();
        if text.starts_with("-----BEGIN") {
            return Self::from_pem(text);
        }
        let bytes = decode_base64url(text).map_err(VapidKeyError::Base64)?;
        if bytes.len() != 32 {
            return Err(VapidKeyError::Length(bytes.len()));
        }
        let signing = SigningKey::from_slice(&bytes).map_err(|_| VapidKeyError::Scalar)?;
        Ok(Self::from_signing(signing))
    }

    fn from_pem(text: &str) -> Result<Self, VapidKeyError> {
        let secret = if text.contains("BEGIN EC PRIVATE KEY") {
            p256::SecretKey::from_sec1_pem(text).map_err(|e| VapidKeyError::Pem(e.to_string()))?
        } else {
            p256::SecretKey::from_pkcs8_pem(text).map_err(|e| VapidKeyError::Pem(e.to_string()))?
        };
        Ok(Self::from_signing(SigningKey::from(secret)))
    }

    fn from_signing(signing: SigningKey) -> Self {
        let point = signing.verifying_key().to_encoded_point(false);
        let public_b64 = URL_SAFE_NO_PAD.encode(point.as_bytes());
        Self {
            signing,
            public_b64,
        }
    }

    /// The public key as browsers take it for `applicationServerKey`: base64url of the
    /// 65-byte uncompressed point.
    pub fn public_key_base64url(&self) -> &str {
        &self.public_b64
    }
}

/// A new VAPID key pair for `herald genconfig`: `(private, public)`, both base64url without
/// padding — the private key as the raw 32-byte scalar (what `vapid_private_key` takes), the
/// public key as the uncompressed point (what the web page passes to
/// `pushManager.subscribe({applicationServerKey})`).
pub fn generate_vapid_keys() -> (String, String) {
    // ThreadRng is a CSPRNG seeded from the OS. A random 32-byte string is a valid scalar
    // unless it is 0 or >= the group order (probability ~2^-32), hence the loop.
    let mut rng = rand::rng();
    loop {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        if let Ok(signing) = SigningKey::from_slice(&bytes) {
            let key = VapidKey::from_signing(signing);
            return (URL_SAFE_NO_PAD.encode(bytes), key.public_b64);
        }
    }
}

/// RFC 8292 asks for a contact: a `mailto:` or an `https:` URI.
pub fn validate_subject(subject: &str) -> Result<(), String> {
    if let Some(address) = subject.strip_prefix("mailto:") {
        if address.contains('@') && !address.contains(char::is_whitespace) {
            return Ok(());
        }
        return Err(format!(
            "subject {subject:?}: mailto: needs an email address"
        ));
    }
    if subject.starts_with("https://") && url::Url::parse(subject).is_ok() {
        return Ok(());
    }
    Err(format!(
        "subject {subject:?} must be a mailto: or https: URI (RFC 8292 asks for a contact)"
    ))
}

/// Lenient base64url: with or without padding, and the standard alphabet too, since
/// subscriptions and keys are copied around by hand and by libraries that differ on both.
pub(crate) fn decode_base64url(text: &str) -> Result<Vec<u8>, String> {
    let normalised: String = text
        .trim()
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            other => other,
        })
        .collect();
    URL_SAFE_NO_PAD
        .decode(normalised.as_bytes())
        .map_err(|e| e.to_string())
}

struct Cached {
    header: String,
    expires: SystemTime,
}

/// Signs and caches `Authorization: vapid t=…, k=…` per push-service origin for one app.
pub struct VapidSigner {
    key: VapidKey,
    subject: String,
    cache: Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for VapidSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VapidSigner")
            .field("key", &self.key)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl VapidSigner {
    pub fn new(key: VapidKey, subject: String) -> Self {
        Self {
            key,
            subject,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn key(&self) -> &VapidKey {
        &self.key
    }

    /// The `Authorization` header value for a push service at `origin` (the endpoint's
    /// `scheme://host[:port]`), valid for at least [`RESIGN_MARGIN`] from `now`.
    pub fn authorization(&self, origin: &str, now: SystemTime) -> String {
        let mut cache = self.cache.lock();
        if let Some(cached) = cache.get(origin)
            && cached.expires > now + RESIGN_MARGIN
        {
            return cached.header.clone();
        }
        let expires = now + JWT_VALIDITY;
        let jwt = sign_jwt(&self.key.signing, origin, &self.subject, expires);
        let header = format!("vapid t={jwt}, k={}", self.key.public_b64);
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, c| c.expires > now + RESIGN_MARGIN);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(
            origin.to_owned(),
            Cached {
                header: header.clone(),
                expires,
            },
        );
        header
    }
}

/// An ES256 JWS compact serialisation of `{aud, exp, sub}`.
fn sign_jwt(key: &SigningKey, aud: &str, sub: &str, expires: SystemTime) -> String {
    let exp = expires
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
    let claims = serde_json::json!({ "aud": aud, "exp": exp, "sub": sub });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{claims}");
    // ES256 in JWS is the raw r||s (64 bytes), which is what Signature::to_bytes gives.
    let signature: Signature = key.sign(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    )
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::VerifyingKey;
    use p256::ecdsa::signature::Verifier as _;

    use super::*;

    fn claims_of(header: &str) -> (serde_json::Value, String, String) {
        let rest = header.strip_prefix("vapid t=").expect("vapid scheme");
        let (jwt, k) = rest.split_once(", k=").expect("t and k");
        let mut parts = jwt.split('.');
        let (h, c, s) = (
            parts.next().expect("header"),
            parts.next().expect("claims"),
            parts.next().expect("signature"),
        );
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).expect("b64")).expect("json");
        // The signature verifies with the public key in `k`.
        let public = URL_SAFE_NO_PAD.decode(k).expect("b64 k");
        let verifying = VerifyingKey::from_sec1_bytes(&public).expect("point");
        let signature =
            Signature::from_slice(&URL_SAFE_NO_PAD.decode(s).expect("b64 sig")).expect("sig");
        verifying
            .verify(format!("{h}.{c}").as_bytes(), &signature)
            .expect("signature verifies");
        (claims, jwt.to_owned(), k.to_owned())
    }

    #[test]
    fn generated_keys_round_trip() {
        let (private, public) = generate_vapid_keys();
        assert_eq!(private.len(), 43);
        assert_eq!(public.len(), 87);
        let key = VapidKey::parse(&private).expect("parse");
        assert_eq!(key.public_key_base64url(), public);
        // padded and standard-alphabet forms are accepted too
        let padded = format!("{private}=");
        assert_eq!(
            VapidKey::parse(&padded)
                .expect("padded")
                .public_key_base64url(),
            public
        );
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(matches!(
            VapidKey::parse("abc"),
            Err(VapidKeyError::Length(2))
        ));
        assert!(matches!(
            VapidKey::parse("!!!"),
            Err(VapidKeyError::Base64(_))
        ));
        // all zeroes is not a valid scalar
        let zero = URL_SAFE_NO_PAD.encode([0u8; 32]);
        assert!(matches!(VapidKey::parse(&zero), Err(VapidKeyError::Scalar)));
        assert!(matches!(
            VapidKey::parse("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----"),
            Err(VapidKeyError::Pem(_))
        ));
    }

    #[test]
    fn pem_keys_are_read() {
        use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
        let (private, public) = generate_vapid_keys();
        let bytes = decode_base64url(&private).expect("b64");
        let secret = p256::SecretKey::from_slice(&bytes).expect("secret");
        let sec1 = secret.to_sec1_pem(LineEnding::LF).expect("sec1");
        let pkcs8 = secret.to_pkcs8_pem(LineEnding::LF).expect("pkcs8");
        for pem in [sec1.as_str(), pkcs8.as_str()] {
            let key = VapidKey::parse(pem).expect("pem");
            assert_eq!(key.public_key_base64url(), public);
        }
    }

    #[test]
    fn jwt_has_origin_audience_bounded_expiry_and_subject() {
        let (private, public) = generate_vapid_keys();
        let signer = VapidSigner::new(
            VapidKey::parse(&private).expect("key"),
            "mailto:ops@example.com".into(),
        );
        let now = SystemTime::now();
        let header = signer.authorization("https://push.example:8443", now);
        let (claims, _, k) = claims_of(&header);
        assert_eq!(k, public);
        assert_eq!(claims["aud"], "https://push.example:8443");
        assert_eq!(claims["sub"], "mailto:ops@example.com");
        let exp = claims["exp"].as_u64().expect("exp");
        let now_s = now.duration_since(UNIX_EPOCH).expect("clock").as_secs();
        assert!(
            exp > now_s && exp <= now_s + 24 * 3600,
            "exp {exp} now {now_s}"
        );
    }

    #[test]
    fn jwts_are_cached_per_origin_and_resigned_before_expiry() {
        let (private, _) = generate_vapid_keys();
        let signer = VapidSigner::new(
            VapidKey::parse(&private).expect("key"),
            "https://example.com/contact".into(),
        );
        let t0 = SystemTime::now();
        let a = signer.authorization("https://a.example", t0);
        let b = signer.authorization("https://b.example", t0);
        assert_ne!(a, b);
        // Reused while enough validity is left …
        let later = t0 + JWT_VALIDITY - RESIGN_MARGIN - Duration::from_secs(60);
        assert_eq!(signer.authorization("https://a.example", later), a);
        // … re-signed once less than the margin is left.
        let late = t0 + JWT_VALIDITY - RESIGN_MARGIN + Duration::from_secs(1);
        let renewed = signer.authorization("https://a.example", late);
        assert_ne!(renewed, a);
        let (claims, _, _) = claims_of(&renewed);
        let late_s = late.duration_since(UNIX_EPOCH).expect("clock").as_secs();
        assert!(claims["exp"].as_u64().expect("exp") >= late_s + JWT_VALIDITY.as_secs());
    }

    #[test]
    fn subjects_must_be_mailto_or_https() {
        assert!(validate_subject("mailto:ops@example.com").is_ok());
        assert!(validate_subject("https://example.com/contact").is_ok());
        assert!(validate_subject("").is_err());
        assert!(validate_subject("mailto:").is_err());
        assert!(validate_subject("http://example.com").is_err());
        assert!(validate_subject("ops@example.com").is_err());
    }
}
