//! Fuzz target `jwt_token`: connection and subscription tokens into the server's
//! `jwt::TokenVerifier` (`authenticate`, `authenticate_subscription`), configured with an
//! HS256 secret only (no key files, no JWKS URL, so no I/O). Never panics; a token not signed
//! with the secret is never accepted; a token that is signed is accepted only with the pinned
//! algorithm, and then carries the `sub` / `channel` its claims name.
//!
//! Input: the first byte picks the mode — 0: the rest is the token text as sent; 1: the rest
//! is a claims payload, signed correctly with the fixed header; 2: the rest is `header` 0xFF
//! `payload`, both signed correctly whatever they say.

#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use herald_core::auth::Authenticator;
use herald_server::config::TokenConfig;
use herald_server::jwt::TokenVerifier;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

const SECRET: &str = "fuzz-secret-0123456789abcdef0123";
const HEADER: &[u8] = br#"{"alg":"HS256","typ":"JWT"}"#;

struct Env {
    runtime: tokio::runtime::Runtime,
    verifier: TokenVerifier,
    key: EncodingKey,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime"),
        verifier: TokenVerifier::from_config(&TokenConfig {
            hmac_secret: SECRET.into(),
            ..TokenConfig::default()
        })
        .expect("an HMAC secret builds"),
        key: EncodingKey::from_secret(SECRET.as_bytes()),
    })
}

#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    channel: Option<String>,
}

#[derive(Deserialize)]
struct HeaderAlg {
    alg: String,
}

fn signed(header: &[u8], payload: &[u8]) -> String {
    let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!("{}.{}", b64.encode(header), b64.encode(payload));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &env().key, Algorithm::HS256)
        .expect("HMAC signing cannot fail");
    format!("{message}.{signature}")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let env = env();
    let verify = |token: &str| {
        env.runtime.block_on(async {
            (
                env.verifier.authenticate(token).await,
                env.verifier.authenticate_subscription(token).await,
            )
        })
    };
    match mode % 3 {
        0 => {
            let Ok(token) = std::str::from_utf8(rest) else {
                return;
            };
            let (connection, subscription) = verify(token);
            // Forging an HMAC is out of a fuzzer's reach: anything accepted would be a bug.
            assert!(connection.is_err(), "accepted an unsigned token {token:?}");
            assert!(
                subscription.is_err(),
                "accepted an unsigned token {token:?}"
            );
        }
        1 => {
            let (connection, subscription) = verify(&signed(HEADER, rest));
            let named = serde_json::from_slice::<Named>(rest).ok();
            if let Ok(credentials) = connection {
                let named = named.as_ref().expect("accepted claims are a JSON object");
                assert_eq!(credentials.user, named.sub);
                assert!(
                    named.channel.is_none(),
                    "a connection token names no channel"
                );
            }
            if let Ok(grant) = subscription {
                let named = named.as_ref().expect("accepted claims are a JSON object");
                assert_eq!(grant.user, named.sub);
                assert!(!grant.channel.is_empty());
                assert_eq!(Some(&grant.channel), named.channel.as_ref());
            }
        }
        _ => {
            let Some(split) = rest.iter().position(|b| *b == 0xFF) else {
                return;
            };
            let (header, payload) = (&rest[..split], &rest[split + 1..]);
            let (connection, subscription) = verify(&signed(header, payload));
            if connection.is_ok() || subscription.is_ok() {
                let alg = serde_json::from_slice::<HeaderAlg>(header).map(|h| h.alg);
                assert_eq!(
                    alg.ok().as_deref(),
                    Some("HS256"),
                    "the algorithm is pinned"
                );
            }
        }
    }
});
