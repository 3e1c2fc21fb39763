//! HTTPS and WSS on the listener with a certificate generated at run time (`openssl`), and a
//! certificate swapped without a restart.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use futures::{SinkExt, StreamExt};
use herald_server::config::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn openssl(args: &[&str], dir: &Path) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the `openssl` command is needed to generate test certificates");
    assert!(status.success(), "openssl {args:?}");
}

/// A test CA (`ca.pem`, `ca.key` in `dir`), made once per test.
fn make_ca(dir: &Path) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=herald-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        dir,
    );
}

/// A server certificate for 127.0.0.1 signed by the test CA (`cert.pem`, `key.pem`).
fn make_certificate(dir: &Path, common_name: &str) {
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={common_name}"),
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
            "-out",
            "cert.pem",
        ],
        dir,
    );
}

fn certificate(dir: &Path, file: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(dir.join(file)).expect("certificate")
}

/// A TLS connection to the server that trusts only `trusted`; returns the stream and the
/// certificate the server presented.
async fn tls_connect(
    addr: &str,
    trusted: CertificateDer<'static>,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    CertificateDer<'static>,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let stream = connector.connect(name, tcp).await.expect("TLS handshake");
    let presented = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .expect("a server certificate");
    (stream, presented)
}

#[tokio::test]
async fn https_and_wss_with_a_certificate_swapped_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_ca(dir.path());
    let ca = certificate(dir.path(), "ca.pem");
    make_certificate(dir.path(), "first");
    let first = certificate(dir.path(), "cert.pem");
    let mut config = common::test_config(Engine::Memory);
    config.server.tls_cert_file = dir.path().join("cert.pem");
    config.server.tls_key_file = dir.path().join("key.pem");
    config.token.hmac_secret = "tls-test-secret-0123456789abcdef0123".into();
    herald_server::build::check(&config).expect("the TLS files load");
    let server = TestServer::start_with(config, None).await;
    let addr = server.url.trim_start_matches("http://").to_owned();
    let https = format!("https://{addr}");

    // HTTPS: the server API over TLS, with a client that trusts only this certificate.
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(dir.path().join("ca.pem")).expect("pem"))
                .expect("certificate"),
        )
        .build()
        .expect("client");
    let reply: Value = client
        .post(format!("{https}/api/publish"))
        .header("x-api-key", "test-api-key-0123456789")
        .json(&json!({"channel": "news", "data": {"n": 1}}))
        .send()
        .await
        .expect("https request")
        .json()
        .await
        .expect("json");
    assert_eq!(reply["result"]["offset"], 1, "{reply}");

    // WSS: the client protocol over TLS.
    let (stream, presented) = tls_connect(&addr, ca.clone()).await;
    assert_eq!(presented, first);
    let (mut socket, _) =
        tokio_tungstenite::client_async(format!("wss://{addr}/connection/websocket"), stream)
            .await
            .expect("wss upgrade");
    let now = herald_core::time::now_ms() / 1000;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "alice", "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"tls-test-secret-0123456789abcdef0123"),
    )
    .expect("sign");
    socket
        .send(Message::text(
            json!({"id": 1, "connect": {"token": token}}).to_string(),
        ))
        .await
        .expect("send");
    let reply = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("reply")
        .expect("open")
        .expect("ok");
    assert!(reply.to_text().expect("text").contains("\"connect\""));

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::get(format!("http://{addr}/health")).await;
    assert!(plain.is_err(), "{plain:?}");

    // A renewed certificate: new connections get it, without a restart.
    make_certificate(dir.path(), "second");
    let second = certificate(dir.path(), "cert.pem");
    assert_ne!(first, second);
    server
        .state
        .tls
        .as_ref()
        .expect("TLS state")
        .reload()
        .expect("reload");
    let (_, presented) = tls_connect(&addr, ca.clone()).await;
    assert_eq!(presented, second);
    // The open WebSocket keeps working on the old certificate.
    socket
        .send(Message::text(
            json!({"id": 2, "subscribe": {"channel": "news"}}).to_string(),
        ))
        .await
        .expect("send");
    let reply = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("reply")
        .expect("open")
        .expect("ok");
    assert!(reply.to_text().expect("text").contains("\"subscribe\""));
}

#[test]
fn half_a_tls_config_or_bad_files_are_refused_at_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::test_config(Engine::Memory);
    config.server.tls_cert_file = dir.path().join("cert.pem");
    let error = config.validate().expect_err("key missing").to_string();
    assert!(error.contains("tls_key_file"), "{error}");
    config.server.tls_key_file = dir.path().join("key.pem");
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").expect("write");
    std::fs::write(dir.path().join("key.pem"), "not a key").expect("write");
    let error = herald_server::build::check(&config)
        .expect_err("bad files")
        .to_string();
    assert!(error.contains("cert.pem"), "{error}");
}
