//! Standard Webhooks signatures: `whsec_` secrets and the `webhook-signature` header.
//!
//! Owns: [`Secret`] (parsing, never printing) and [`signature_header`]: one `v1,<base64
//! HMAC-SHA256 of "<id>.<timestamp>.<body>">` entry per secret, space-separated, so a
//! receiver that knows any one of them (old or new during a rotation) verifies the delivery.
//!
//! May touch: nothing.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of a secret in its textual form.
pub const SECRET_PREFIX: &str = "whsec_";

/// Shortest key accepted (the spec asks for 24–64 bytes).
pub const MIN_SECRET_BYTES: usize = 24;
pub const MAX_SECRET_BYTES: usize = 64;

/// A signing key, from `whsec_<base64>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    /// Parses `whsec_<base64 of 24–64 bytes>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or_else(|| format!("a secret starts with {SECRET_PREFIX:?}"))?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| "a secret is whsec_ followed by standard base64".to_owned())?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(format!(
                "a secret holds {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes (this one {})",
                key.len()
            ));
        }
        Ok(Self(key))
    }

    /// A new random secret in its textual form (32 bytes).
    pub fn generate() -> String {
        use rand::RngCore;
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
    }

    /// `v1,<signature>` of one delivery.
    fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        // Any key length is valid for HMAC; `new_from_slice` cannot fail for it.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => return String::new(),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` value: one `v1,` entry per secret, space-separated.
pub fn signature_header(secrets: &[Secret], id: &str, timestamp: u64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in the Standard Webhooks specification's reference implementation tests.
    #[test]
    fn signs_like_the_reference_implementation() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let header = signature_header(
            &[secret],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn one_entry_per_secret_and_bad_secrets_are_refused() {
        let a = Secret::parse(&Secret::generate()).expect("generated");
        let b = Secret::parse(&Secret::generate()).expect("generated");
        let header = signature_header(&[a, b], "msg_1", 1, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        assert!(header.split(' ').all(|entry| entry.starts_with("v1,")));
        assert!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Secret::parse("whsec_%%%").is_err());
        assert!(Secret::parse("whsec_c2hvcnQ=").is_err());
        assert_eq!(
            format!("{:?}", Secret::parse(&Secret::generate())),
            "Ok(Secret(…))"
        );
    }
}
