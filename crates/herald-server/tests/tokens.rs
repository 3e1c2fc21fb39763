//! Connection tokens signed with every supported public-key algorithm, keys from config and
//! from a JWKS served by a local HTTP server (rotation, bounded refresh), the classic JWT
//! attacks, and a real WebSocket connect with a JWKS-verified token. Keys are generated at run
//! time with the `openssl` command line (the test fails loudly if it is missing).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::TestServer;
use futures::{SinkExt, StreamExt};
use herald_core::ErrorCode;
use herald_core::auth::Authenticator;
use herald_server::config::{Engine, TokenConfig, TokenKey};
use herald_server::jwt::TokenVerifier;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A key pair made by `openssl` in `dir`: the private key for signing, the public PEM path.
struct KeyPair {
    algorithm: Algorithm,
    private_pem: Vec<u8>,
    public_pem_path: PathBuf,
}

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .status()
        .expect("the `openssl` command is needed to generate test keys (Debian: openssl)");
    assert!(status.success(), "openssl {args:?} failed");
}

fn key_pair(dir: &Path, name: &str, algorithm: Algorithm) -> KeyPair {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let private_s = private.to_str().expect("utf-8 path");
    match algorithm {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 => openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            private_s,
        ]),
        Algorithm::ES256 => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            private_s,
        ]),
        Algorithm::ES384 => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            private_s,
        ]),
        Algorithm::EdDSA => openssl(&["genpkey", "-algorithm", "ED25519", "-out", private_s]),
        other => panic!("no key pair for {other:?}"),
    }
    openssl(&[
        "pkey",
        "-in",
        private_s,
        "-pubout",
        "-out",
        public.to_str().expect("utf-8 path"),
    ]);
    KeyPair {
        algorithm,
        private_pem: std::fs::read(&private).expect("private key"),
        public_pem_path: public,
    }
}

impl KeyPair {
    fn encoding(&self) -> EncodingKey {
        match self.algorithm {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&self.private_pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&self.private_pem),
            _ => EncodingKey::from_rsa_pem(&self.private_pem),
        }
        .expect("private key")
    }

    fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding()).expect("sign")
    }

    fn jwk(&self, kid: &str) -> Jwk {
        if self.algorithm == Algorithm::EdDSA {
            // jsonwebtoken cannot export Ed25519 keys: the raw key is the last 32 bytes of
            // the DER SubjectPublicKeyInfo.
            let der = Command::new("openssl")
                .args(["pkey", "-pubin", "-outform", "DER", "-in"])
                .arg(&self.public_pem_path)
                .output()
                .expect("openssl");
            assert!(der.status.success() && der.stdout.len() >= 32);
            use base64::Engine as _;
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(&der.stdout[der.stdout.len() - 32..]);
            return serde_json::from_value(
                json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA"}),
            )
            .expect("jwk");
        }
        let mut jwk = Jwk::from_encoding_key(&self.encoding(), self.algorithm).expect("jwk");
        jwk.common.key_id = Some(kid.into());
        jwk
    }

    fn config_key(&self, kid: &str) -> TokenKey {
        TokenKey {
            kid: kid.into(),
            algorithm: format!("{:?}", self.algorithm),
            public_key_file: self.public_pem_path.clone(),
            ..Default::default()
        }
    }
}

fn claims(user: &str) -> Value {
    let now = herald_core::time::now_ms() / 1000;
    json!({"sub": user, "exp": now + 600})
}

#[tokio::test]
async fn every_algorithm_from_config_keys_pinned_per_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pairs: Vec<KeyPair> = [
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, alg)| key_pair(dir.path(), &format!("k{i}"), alg))
    .collect();
    let config = TokenConfig {
        keys: pairs
            .iter()
            .enumerate()
            .map(|(i, pair)| pair.config_key(&format!("k{i}")))
            .collect(),
        ..TokenConfig::default()
    };
    herald_server::jwt::KeySet::from_config(&config).expect("keys build");
    let verifier = TokenVerifier::from_config(&config).expect("keys build");
    for (i, pair) in pairs.iter().enumerate() {
        let user = format!("user{i}");
        // With the kid, and without one (every key is tried).
        for kid in [Some(format!("k{i}")), None] {
            let token = pair.sign(kid.as_deref(), &claims(&user));
            let credentials = verifier
                .authenticate(&token)
                .await
                .unwrap_or_else(|e| panic!("{:?} kid {kid:?}: {e}", pair.algorithm));
            assert_eq!(credentials.user, user);
        }
        // A kid that names another key: refused.
        let wrong_kid = format!("k{}", (i + 1) % pairs.len());
        let token = pair.sign(Some(&wrong_kid), &claims(&user));
        assert!(
            verifier.authenticate(&token).await.is_err(),
            "{:?}",
            pair.algorithm
        );
    }
}

#[tokio::test]
async fn the_classic_attacks_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rsa = key_pair(dir.path(), "rsa", Algorithm::RS256);
    let config = TokenConfig {
        keys: vec![rsa.config_key("main")],
        ..TokenConfig::default()
    };
    let verifier = TokenVerifier::from_config(&config).expect("keys build");
    let public_pem = std::fs::read(&rsa.public_pem_path).expect("pem");
    // 1. The RSA public key (which is public) used as an HMAC secret, alg switched to HS256.
    for kid in [Some("main"), None] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        let forged = jsonwebtoken::encode(
            &header,
            &claims("mallory"),
            &EncodingKey::from_secret(&public_pem),
        )
        .expect("sign");
        let error = verifier.authenticate(&forged).await.expect_err("confusion");
        assert_eq!(error.code, ErrorCode::Unauthorized);
    }
    // 2. alg none, with and without a signature part.
    let b64 = |v: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    for header in [
        json!({"alg": "none"}),
        json!({"alg": "none", "kid": "main"}),
    ] {
        let unsigned = format!("{}.{}.", b64(&header), b64(&claims("mallory")));
        assert!(verifier.authenticate(&unsigned).await.is_err());
        let with_sig = format!("{}.{}.c2ln", b64(&header), b64(&claims("mallory")));
        assert!(verifier.authenticate(&with_sig).await.is_err());
    }
    // 3. A valid token with its payload swapped.
    let good = rsa.sign(Some("main"), &claims("alice"));
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64(&claims("admin")), parts[2]);
    assert!(verifier.authenticate(&tampered).await.is_err());
    assert_eq!(
        verifier
            .authenticate(&good)
            .await
            .expect("the real one")
            .user,
        "alice"
    );
    // 4. An expired token with a good signature says "expired" (the SDKs refresh on it).
    let now = herald_core::time::now_ms() / 1000;
    let expired = rsa.sign(Some("main"), &json!({"sub": "alice", "exp": now - 5}));
    assert_eq!(
        verifier
            .authenticate(&expired)
            .await
            .expect_err("expired")
            .code,
        ErrorCode::TokenExpired
    );
}

/// A JWKS endpoint whose key set the test swaps, counting fetches.
struct JwksServer {
    url: String,
    keys: Arc<Mutex<JwkSet>>,
    fetches: Arc<AtomicUsize>,
}

async fn jwks_server() -> JwksServer {
    let keys = Arc::new(Mutex::new(JwkSet { keys: Vec::new() }));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (k, f) = (keys.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let (k, f) = (k.clone(), f.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                axum::Json(k.lock().clone())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    JwksServer { url, keys, fetches }
}

#[tokio::test]
async fn jwks_keys_rotate_and_refresh_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = key_pair(dir.path(), "first", Algorithm::RS256);
    let second = key_pair(dir.path(), "second", Algorithm::ES256);
    let jwks = jwks_server().await;
    jwks.keys.lock().keys = vec![first.jwk("2026-a")];
    let verifier = TokenVerifier::from_config(&TokenConfig {
        jwks_url: jwks.url.clone(),
        jwks_min_refresh: herald_core::duration::HumanDuration::from_secs(1),
        ..TokenConfig::default()
    })
    .expect("keys build");
    let token = first.sign(Some("2026-a"), &claims("alice"));
    assert_eq!(
        verifier.authenticate(&token).await.expect("jwks key").user,
        "alice"
    );
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1);
    // Cached: no fetch per token.
    for _ in 0..20 {
        verifier.authenticate(&token).await.expect("cached");
    }
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1);

    // Rotation: a new key appears; a token with its kid triggers one refetch (after the
    // minimum interval) and verifies.
    jwks.keys.lock().keys = vec![first.jwk("2026-a"), second.jwk("2026-b")];
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rotated = second.sign(Some("2026-b"), &claims("bob"));
    assert_eq!(
        verifier.authenticate(&rotated).await.expect("rotated").user,
        "bob"
    );
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);

    // A flood of made-up kids costs at most one fetch per interval.
    for i in 0..200 {
        let bogus = second.sign(Some(&format!("bogus-{i}")), &claims("mallory"));
        assert!(verifier.authenticate(&bogus).await.is_err());
    }
    assert!(
        jwks.fetches.load(Ordering::SeqCst) <= 3,
        "fetches: {}",
        jwks.fetches.load(Ordering::SeqCst)
    );
    // A symmetric key in the JWKS is never used (an attacker who can sign with it gains
    // nothing), nor is an RSA key without `alg`.
    let mut oct = Jwk::from_encoding_key(
        &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        Algorithm::HS256,
    )
    .expect("jwk");
    oct.common.key_id = Some("oct".into());
    jwks.keys.lock().keys.push(oct);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("oct".into());
    let hs = jsonwebtoken::encode(
        &header,
        &claims("mallory"),
        &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
    )
    .expect("sign");
    assert!(verifier.authenticate(&hs).await.is_err());
    // The old key still works after the refreshes.
    assert!(verifier.authenticate(&token).await.is_ok());
}

#[tokio::test]
async fn a_websocket_client_connects_with_a_jwks_verified_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = key_pair(dir.path(), "ws", Algorithm::EdDSA);
    let jwks = jwks_server().await;
    jwks.keys.lock().keys = vec![pair.jwk("edkey")];
    let mut config = common::test_config(Engine::Memory);
    config.token.jwks_url = jwks.url.clone();
    config.token.audience = "herald-tests".into();
    let server = TestServer::start_with(config, None).await;
    let url = format!(
        "{}/connection/websocket",
        server.url.replace("http://", "ws://")
    );
    let connect = |token: String| {
        let url = url.clone();
        async move {
            let (mut socket, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("ws connect");
            socket
                .send(Message::text(
                    json!({"id": 1, "connect": {"token": token}}).to_string(),
                ))
                .await
                .expect("send");
            tokio::time::timeout(Duration::from_secs(5), socket.next())
                .await
                .expect("a reply within 5s")
                .expect("open")
                .expect("ok")
        }
    };
    let mut good = claims("alice");
    good["aud"] = json!("herald-tests");
    let reply = connect(pair.sign(Some("edkey"), &good)).await;
    let reply: Value = serde_json::from_str(reply.to_text().expect("text")).expect("json");
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    // Same key, wrong audience: closed with 3500 invalid token.
    let mut other = claims("alice");
    other["aud"] = json!("someone-else");
    match connect(pair.sign(Some("edkey"), &other)).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 3500),
        other => panic!("expected a close, got {other:?}"),
    }
}
