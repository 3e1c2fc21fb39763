//! EmailSender against a real SMTP server: `python3 -m aiosmtpd` with the `smtp_sink.Sink`
//! handler (tests/tools/smtp_sink.py), which records what it receives and refuses scripted
//! recipients and senders with chosen SMTP replies.

mod support;

use std::path::Path;
use std::time::Duration;

use herald_core::device::Provider;
use herald_core::duration::HumanDuration;
use herald_outbound::email::{EmailConfig, EmailSender, SmtpSecurity};
use herald_outbound::sender::{Destination, EmailNotification, SendError, Sender, Target};
use support::{SmtpSink, SmtpTls, Tripwire};

fn config(port: u16, security: SmtpSecurity) -> EmailConfig {
    EmailConfig {
        host: "127.0.0.1".into(),
        port: Some(port),
        security,
        username: None,
        password: None,
        from: "Herald <noreply@herald.test>".into(),
        request_timeout: HumanDuration::from_secs(10),
        max_connections: 4,
        ca_file: None,
        accept_invalid_certs: false,
    }
}

fn target(address: &str) -> Target {
    Target {
        provider: Provider::Email,
        app: String::new(),
        to: Destination::Token(address.into()),
    }
}

fn email(subject: &str, text: &str, html: Option<&str>) -> EmailNotification {
    EmailNotification {
        subject: subject.into(),
        text: text.into(),
        html: html.map(str::to_owned),
    }
}

/// A decoded part's text, line ends as `\n` (SMTP carries CRLF).
fn part(record: &serde_json::Value, content_type: &str) -> String {
    record["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .find(|p| p["content_type"] == content_type)
        .and_then(|p| p["content"].as_str())
        .map(|text| text.replace("\r\n", "\n"))
        .unwrap_or_else(|| panic!("no {content_type} part in {record}"))
}

/// Self-signed certificate for 127.0.0.1 / localhost, written as PEM files.
fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("self-signed certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    (cert, key)
}

#[tokio::test]
async fn an_email_arrives_with_subject_from_to_text_and_html() {
    let sink = SmtpSink::start(SmtpTls::None).await;
    let sender = EmailSender::new(&config(sink.port, SmtpSecurity::None)).expect("sender");
    let text = "Hello Alice,\nyou have 3 new messages — ünïcödé included.";
    let html = "<p>Hello <b>Alice</b>,</p><p>you have 3 new messages — ünïcödé.</p>";
    let sent = sender
        .send(
            &target("alice@example.org"),
            &email("Your inbox: 3 new ✉", text, Some(html)),
        )
        .await
        .expect("sent");

    let received = sink.received();
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(r["subject"], "Your inbox: 3 new ✉");
    assert_eq!(r["from"], "Herald <noreply@herald.test>");
    assert_eq!(r["to"], "alice@example.org");
    assert_eq!(r["mail_from"], "noreply@herald.test");
    assert_eq!(r["rcpt_tos"], serde_json::json!(["alice@example.org"]));
    assert_eq!(r["content_type"], "multipart/alternative");
    assert_eq!(part(r, "text/plain").trim_end(), text);
    assert_eq!(part(r, "text/html").trim_end(), html);
    assert_eq!(r["message_id"], sent.message_id);
    assert!(
        sent.message_id.ends_with("@herald.test>"),
        "{}",
        sent.message_id
    );
    assert_eq!(r["tls"], false);

    // Text only: a single text/plain part.
    sender
        .send(
            &target("bob@example.org"),
            &email("Plain", "just text", None),
        )
        .await
        .expect("sent");
    let r = &sink.received()[1];
    assert_eq!(r["content_type"], "text/plain");
    assert_eq!(part(r, "text/plain").trim_end(), "just text");
}

#[tokio::test]
async fn client_text_cannot_inject_headers_or_end_the_message_early() {
    let sink = SmtpSink::start(SmtpTls::None).await;
    let sender = EmailSender::new(&config(sink.port, SmtpSecurity::None)).expect("sender");
    let subject = "Hi\r\nBcc: evil@example.org";
    let text = "line one\r\n.\r\nRCPT TO:<evil@example.org>\r\n.\nend";
    sender
        .send(&target("alice@example.org"), &email(subject, text, None))
        .await
        .expect("sent");
    let received = sink.received();
    assert_eq!(received.len(), 1, "{received:?}");
    let r = &received[0];
    assert_eq!(r["rcpt_tos"], serde_json::json!(["alice@example.org"]));
    // Still one Subject header, line break flattened; no Bcc header was made.
    assert_eq!(r["subject"], "Hi  Bcc: evil@example.org");
    assert_eq!(part(r, "text/plain").trim_end(), text.replace("\r\n", "\n"));
}

#[tokio::test]
async fn smtp_replies_are_classified_by_command_and_code() {
    let sink = SmtpSink::start(SmtpTls::None).await;
    let sender = EmailSender::new(&config(sink.port, SmtpSecurity::None)).expect("sender");
    let n = email("s", "t", None);
    for (address, expected) in [
        ("gone@example.org", "unregistered"),    // 550 5.1.1 on RCPT
        ("moved@example.org", "unregistered"),   // 551 5.1.6 on RCPT
        ("badname@example.org", "unregistered"), // 553 5.1.3 on RCPT
        ("busy@example.org", "retry"),           // 451 on RCPT
        ("spam@example.org", "rejected"),        // 550 5.7.1 on RCPT: policy, mailbox may be fine
        ("deny@example.org", "rejected"),        // 554 on RCPT
    ] {
        let err = sender.send(&target(address), &n).await.expect_err(address);
        let kind = match &err {
            SendError::Unregistered { .. } => "unregistered",
            SendError::Retry { .. } => "retry",
            SendError::Rejected { .. } => "rejected",
            SendError::NotConfigured { .. } => "not configured",
        };
        assert_eq!(kind, expected, "{address}: {err:?}");
        assert!(err.to_string().contains("RCPT TO"), "{err}");
    }
    // Content refused after DATA: this message only.
    let err = sender
        .send(&target("ok@example.org"), &email("[reject] me", "t", None))
        .await
        .expect_err("content refused");
    assert!(matches!(err, SendError::Rejected { .. }), "{err:?}");
    assert!(sink.received().is_empty());
    // The connection survived every refusal (RSET) and still delivers.
    sender
        .send(&target("ok@example.org"), &n)
        .await
        .expect("sent after refusals");
    assert_eq!(sink.received().len(), 1);
}

#[tokio::test]
async fn a_refused_sender_is_not_a_dead_recipient() {
    // 550 to MAIL FROM is about *our* address: removing the device would be wrong.
    let sink = SmtpSink::start(SmtpTls::None).await;
    let mut cfg = config(sink.port, SmtpSecurity::None);
    cfg.from = "blocked@herald.test".into();
    let sender = EmailSender::new(&cfg).expect("sender");
    let err = sender
        .send(&target("alice@example.org"), &email("s", "t", None))
        .await
        .expect_err("sender refused");
    assert!(
        matches!(&err, SendError::Rejected { reason } if reason.contains("MAIL FROM")),
        "{err:?}"
    );
}

#[tokio::test]
async fn invalid_addresses_are_rejected_without_connecting() {
    let wire = Tripwire::start().await;
    let sender = EmailSender::new(&config(wire.port, SmtpSecurity::None)).expect("sender");
    for address in [
        "",
        "not an address",
        "a@",
        "@b.org",
        "a@b@c",
        "Alice <a@b.org>",
    ] {
        let err = sender
            .send(&target(address), &email("s", "t", None))
            .await
            .expect_err(address);
        assert!(
            matches!(err, SendError::Rejected { .. }),
            "{address:?}: {err:?}"
        );
    }
    assert!(!wire.tripped().await, "connected for an invalid address");
}

#[tokio::test]
async fn connections_are_reused() {
    let sink = SmtpSink::start(SmtpTls::None).await;
    let sender = EmailSender::new(&config(sink.port, SmtpSecurity::None)).expect("sender");
    for i in 0..5 {
        sender
            .send(
                &target(&format!("u{i}@example.org")),
                &email("s", "t", None),
            )
            .await
            .expect("sent");
    }
    let peers: std::collections::HashSet<String> = sink
        .received()
        .iter()
        .map(|r| r["peer"].to_string())
        .collect();
    assert_eq!(peers.len(), 1, "5 sequential sends used {peers:?}");
}

#[tokio::test]
async fn a_pooled_connection_the_server_dropped_is_replaced() {
    let sink = SmtpSink::start(SmtpTls::None).await;
    let port = sink.port;
    let sender = EmailSender::new(&config(port, SmtpSecurity::None)).expect("sender");
    sender
        .send(&target("first@example.org"), &email("s", "t", None))
        .await
        .expect("first");
    // The server goes away (and with it the pooled connection) and comes back on the port.
    sink.stop().await;
    let sink = SmtpSink::try_start(port, &SmtpTls::None)
        .await
        .expect("restart on the same port");
    sender
        .send(&target("second@example.org"), &email("s", "t", None))
        .await
        .expect("sent on a fresh connection, not failed on the dead one");
    assert_eq!(sink.received().len(), 1);
}

#[tokio::test]
async fn concurrent_sends_all_arrive() {
    let sink = SmtpSink::start(SmtpTls::None).await;
    let sender = EmailSender::new(&config(sink.port, SmtpSecurity::None)).expect("sender");
    let sends = (0..20).map(|i| {
        let sender = &sender;
        async move {
            sender
                .send(
                    &target(&format!("c{i}@example.org")),
                    &email("s", "t", None),
                )
                .await
        }
    });
    for result in futures::future::join_all(sends).await {
        result.expect("sent");
    }
    let received = sink.received();
    assert_eq!(received.len(), 20);
    let peers: std::collections::HashSet<String> =
        received.iter().map(|r| r["peer"].to_string()).collect();
    assert!(peers.len() <= 4, "max_connections 4, used {}", peers.len());
}

#[tokio::test]
async fn starttls_with_a_trusted_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path());
    let sink = SmtpSink::start(SmtpTls::Starttls {
        cert: &cert,
        key: &key,
    })
    .await;

    let mut cfg = config(sink.port, SmtpSecurity::Starttls);
    cfg.ca_file = Some(cert.clone());
    let sender = EmailSender::new(&cfg).expect("sender");
    sender
        .send(
            &target("tls@example.org"),
            &email("over tls", "secret", None),
        )
        .await
        .expect("sent over STARTTLS");
    let received = sink.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0]["tls"], true);

    // The same server with its certificate not trusted: no delivery, and worth a retry (the
    // fix is in configuration, not in the message).
    let untrusted = EmailSender::new(&config(sink.port, SmtpSecurity::Starttls)).expect("sender");
    let err = untrusted
        .send(&target("tls@example.org"), &email("s", "t", None))
        .await
        .expect_err("untrusted certificate");
    assert!(matches!(err, SendError::Retry { .. }), "{err:?}");

    // accept_invalid_certs (testing only) gets through.
    let mut lax = config(sink.port, SmtpSecurity::Starttls);
    lax.accept_invalid_certs = true;
    EmailSender::new(&lax)
        .expect("sender")
        .send(&target("tls@example.org"), &email("s", "t", None))
        .await
        .expect("sent");
    assert_eq!(sink.received().len(), 2);
}

#[tokio::test]
async fn implicit_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path());
    let sink = SmtpSink::start(SmtpTls::Implicit {
        cert: &cert,
        key: &key,
    })
    .await;
    let mut cfg = config(sink.port, SmtpSecurity::Tls);
    cfg.ca_file = Some(cert);
    EmailSender::new(&cfg)
        .expect("sender")
        .send(&target("tls@example.org"), &email("s", "t", None))
        .await
        .expect("sent over implicit TLS");
    assert_eq!(sink.received()[0]["tls"], true);
}

#[tokio::test]
async fn starttls_is_never_skipped_when_the_server_lacks_it() {
    let sink = SmtpSink::start(SmtpTls::None).await;
    let sender = EmailSender::new(&config(sink.port, SmtpSecurity::Starttls)).expect("sender");
    let err = sender
        .send(&target("a@example.org"), &email("s", "t", None))
        .await
        .expect_err("no STARTTLS offered");
    assert!(
        matches!(&err, SendError::Retry { reason, .. } if reason.contains("STARTTLS")),
        "{err:?}"
    );
    assert!(sink.received().is_empty());
}

#[tokio::test]
async fn an_unreachable_relay_is_retried() {
    let port = support::free_port();
    let mut cfg = config(port, SmtpSecurity::None);
    cfg.request_timeout = HumanDuration(Duration::from_secs(3));
    let err = EmailSender::new(&cfg)
        .expect("sender")
        .send(&target("a@example.org"), &email("s", "t", None))
        .await
        .expect_err("unreachable");
    assert!(matches!(err, SendError::Retry { .. }), "{err:?}");
}

#[test]
fn bad_configs_fail_loudly() {
    let mut cfg = config(25, SmtpSecurity::None);
    cfg.from = "not a mailbox".into();
    assert!(EmailSender::new(&cfg).is_err());
    let mut cfg = config(25, SmtpSecurity::None);
    cfg.username = Some("u".into());
    cfg.password = Some("p".into());
    assert!(EmailSender::new(&cfg).is_err(), "credentials in clear");
    cfg.security = SmtpSecurity::Starttls;
    assert!(EmailSender::new(&cfg).is_ok());
    cfg.password = None;
    assert!(EmailSender::new(&cfg).is_err(), "username without password");
    let parsed: Result<EmailConfig, _> = serde_json::from_value(serde_json::json!({
        "host": "smtp.example.org", "from": "a@b.org", "security": "ssl"
    }));
    assert!(parsed.is_err(), "unknown security");
    let parsed: EmailConfig = serde_json::from_value(serde_json::json!({
        "host": "smtp.example.org", "from": "a@b.org", "password": "hunter2", "username": "u"
    }))
    .expect("config");
    assert_eq!(parsed.security, SmtpSecurity::Starttls);
    assert!(!format!("{parsed:?}").contains("hunter2"));
}
