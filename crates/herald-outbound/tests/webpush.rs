//! WebpushSender against the real `web-push-testing` push service (npm), which checks the
//! VAPID signature against the subscription's application server key and decrypts the
//! RFC 8291 payload; plus a scripted endpoint for the headers and statuses it does not cover.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_core::device::Provider;
use herald_core::duration::HumanDuration;
use herald_outbound::sender::{Destination, SendError, Sender, Target, WebpushNotification};
use herald_outbound::webpush::{
    WebpushAppConfig, WebpushConfig, WebpushSender, generate_vapid_keys,
};
use support::{ScriptedEndpoint, Tripwire, WebPushTesting};

struct Keys {
    private: String,
    public: String,
}

fn keys() -> Keys {
    let (private, public) = generate_vapid_keys();
    Keys { private, public }
}

fn app(name: &str, keys: &Keys) -> WebpushAppConfig {
    WebpushAppConfig {
        app: name.into(),
        vapid_private_key: Some(keys.private.clone()),
        vapid_key_file: None,
        subject: "mailto:ops@herald.test".into(),
        request_timeout: HumanDuration::from_secs(10),
    }
}

fn sender(apps: Vec<WebpushAppConfig>, allow_private_endpoints: bool) -> WebpushSender {
    WebpushSender::new(&WebpushConfig {
        apps,
        allow_private_endpoints,
    })
    .expect("sender")
}

fn target(app: &str, token: &str) -> Target {
    Target {
        provider: Provider::Webpush,
        app: app.into(),
        to: Destination::Token(token.into()),
    }
}

fn note(payload: serde_json::Value, headers: &[(&str, &str)]) -> WebpushNotification {
    WebpushNotification {
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        payload,
    }
}

#[tokio::test]
async fn payloads_arrive_decrypted_and_exact() {
    let service = WebPushTesting::start().await;
    let k = keys();
    let sender = sender(vec![app("", &k)], true);
    let sub = service.subscribe(&k.public).await;

    let text = "héllo, wörld ✓ — a text payload";
    let json = serde_json::json!({"title": "Hi", "body": "there", "n": [1, 2, 3]});
    let long = "x".repeat(herald_outbound::webpush::MAX_PAYLOAD);
    for payload in [
        serde_json::json!(text),
        json.clone(),
        serde_json::json!(long),
    ] {
        sender
            .send(&target("", &sub.token), &note(payload, &[]))
            .await
            .expect("sent");
    }
    let messages = service.messages(&sub).await;
    assert_eq!(messages, vec![text.to_owned(), json.to_string(), long]);
    service.stop().await;
}

#[tokio::test]
async fn ttl_urgency_and_topic_are_accepted_by_the_push_service() {
    // web-push-testing refuses a message whose TTL is missing or not a number (400), and
    // ignores Urgency and Topic; the scripted endpoint below checks those reach the wire.
    let service = WebPushTesting::start().await;
    let k = keys();
    let sender = sender(vec![app("", &k)], true);
    let sub = service.subscribe(&k.public).await;
    let headers = [("TTL", "60"), ("urgency", "high"), ("Topic", "inbox-1")];
    sender
        .send(
            &target("", &sub.token),
            &note("with headers".into(), &headers),
        )
        .await
        .expect("sent");
    assert_eq!(service.messages(&sub).await, vec!["with headers"]);
    service.stop().await;
}

/// A subscription whose keys we hold, pointing at `endpoint`, so the body can be decrypted.
fn own_subscription(endpoint: &str) -> (String, p256::SecretKey, [u8; 16]) {
    let (ua_private, _) = generate_vapid_keys();
    let secret = p256::SecretKey::from_slice(&URL_SAFE_NO_PAD.decode(ua_private).expect("b64"))
        .expect("key");
    let public =
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false);
    let auth = [7u8; 16];
    let token = serde_json::json!({
        "endpoint": endpoint,
        "keys": {"p256dh": URL_SAFE_NO_PAD.encode(public.as_bytes()),
                 "auth": URL_SAFE_NO_PAD.encode(auth)},
    });
    (token.to_string(), secret, auth)
}

#[tokio::test]
async fn the_request_carries_the_rfc_headers_and_a_decryptable_body() {
    let endpoint = ScriptedEndpoint::start(201, &[("Location", "/m/42")], "").await;
    let k = keys();
    let sender = sender(vec![app("", &k)], true);
    let (token, secret, auth) = own_subscription(&endpoint.url("/push/abc"));

    let sent = sender
        .send(
            &target("", &token),
            &note(
                serde_json::json!({"hello": "world"}),
                &[("ttl", "90"), ("Urgency", "very-low"), ("topic", "news_1")],
            ),
        )
        .await
        .expect("sent");
    assert_eq!(sent.message_id, "/m/42");

    let requests = endpoint.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/push/abc"));
    assert_eq!(r.header("ttl"), Some("90"));
    assert_eq!(r.header("urgency"), Some("very-low"));
    assert_eq!(r.header("topic"), Some("news_1"));
    assert_eq!(r.header("content-encoding"), Some("aes128gcm"));
    let authorization = r.header("authorization").expect("authorization");
    let jwt = authorization
        .strip_prefix("vapid t=")
        .and_then(|rest| rest.split_once(", k="))
        .map(|(jwt, k)| {
            assert_eq!(k, k.trim());
            jwt
        })
        .expect("vapid t=…, k=…");
    assert!(authorization.ends_with(&format!("k={}", k.public)));
    let claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).expect("claims"))
            .expect("b64"),
    )
    .expect("json");
    // aud is the origin, port included.
    assert_eq!(claims["aud"], format!("http://{}", endpoint.addr));

    let plain = web_push_native::decrypt(r.body.clone(), &secret, &auth.into()).expect("decrypt");
    assert_eq!(plain, br#"{"hello":"world"}"#);

    // Defaults: TTL 28 days, no Urgency or Topic.
    sender
        .send(&target("", &token), &note("plain".into(), &[]))
        .await
        .expect("sent");
    let r = &endpoint.requests()[1];
    assert_eq!(r.header("ttl"), Some("2419200"));
    assert_eq!(r.header("urgency"), None);
    assert_eq!(r.header("topic"), None);
}

#[tokio::test]
async fn an_expired_subscription_is_unregistered() {
    let service = WebPushTesting::start().await;
    let k = keys();
    let sender = sender(vec![app("", &k)], true);
    let sub = service.subscribe(&k.public).await;
    sender
        .send(&target("", &sub.token), &note("before".into(), &[]))
        .await
        .expect("sent");
    service.expire(&sub).await;
    let err = sender
        .send(&target("", &sub.token), &note("after".into(), &[]))
        .await
        .expect_err("expired");
    assert!(
        matches!(err, SendError::Unregistered { .. }),
        "expected Unregistered, got {err:?}"
    );
    service.stop().await;
}

#[tokio::test]
async fn a_wrong_vapid_key_is_rejected() {
    let service = WebPushTesting::start().await;
    let subscribed_with = keys();
    let configured = keys();
    let sender = sender(vec![app("", &configured)], true);
    let sub = service.subscribe(&subscribed_with.public).await;
    let err = sender
        .send(&target("", &sub.token), &note("x".into(), &[]))
        .await
        .expect_err("wrong key");
    match err {
        SendError::Rejected { reason } => assert!(reason.contains("400"), "{reason}"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(service.messages(&sub).await.is_empty());
    service.stop().await;
}

#[tokio::test]
async fn two_apps_sign_with_their_own_keys() {
    let service = WebPushTesting::start().await;
    let (ka, kb) = (keys(), keys());
    let sender = sender(vec![app("alpha", &ka), app("beta", &kb)], true);
    assert_eq!(sender.public_key("alpha"), Some(ka.public.as_str()));
    let sub_a = service.subscribe(&ka.public).await;
    let sub_b = service.subscribe(&kb.public).await;

    sender
        .send(&target("alpha", &sub_a.token), &note("to a".into(), &[]))
        .await
        .expect("alpha");
    sender
        .send(&target("beta", &sub_b.token), &note("to b".into(), &[]))
        .await
        .expect("beta");
    // Crossed: the push service checks the key the subscription was made with.
    let crossed = sender
        .send(&target("beta", &sub_a.token), &note("crossed".into(), &[]))
        .await;
    assert!(
        matches!(crossed, Err(SendError::Rejected { .. })),
        "{crossed:?}"
    );
    // An app that is not configured.
    let missing = sender
        .send(&target("gamma", &sub_a.token), &note("x".into(), &[]))
        .await;
    assert!(
        matches!(missing, Err(SendError::NotConfigured { .. })),
        "{missing:?}"
    );

    assert_eq!(service.messages(&sub_a).await, vec!["to a"]);
    assert_eq!(service.messages(&sub_b).await, vec!["to b"]);
    service.stop().await;
}

#[tokio::test]
async fn malformed_tokens_and_headers_are_rejected_with_a_reason() {
    let k = keys();
    let sender = sender(vec![app("", &k)], false);
    for (token, expected) in [
        ("not json", "PushSubscription"),
        (
            r#"{"endpoint":"https://push.example/x","keys":{"p256dh":"AA","auth":"AA"}}"#,
            "p256dh",
        ),
    ] {
        match sender
            .send(&target("", token), &note("x".into(), &[]))
            .await
        {
            Err(SendError::Rejected { reason }) => {
                assert!(
                    reason.contains(expected),
                    "{reason} should mention {expected}"
                )
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
    }
    let (token, _, _) = own_subscription("https://push.example/x");
    for bad in [("urgency", "asap"), ("topic", "not/valid"), ("ttl", "-5")] {
        let result = sender
            .send(&target("", &token), &note("x".into(), &[bad]))
            .await;
        assert!(
            matches!(result, Err(SendError::Rejected { .. })),
            "{bad:?}: {result:?}"
        );
    }
}

#[tokio::test]
async fn non_public_endpoints_are_refused_without_a_request() {
    let wire = Tripwire::start().await;
    let k = keys();
    let sender = sender(vec![app("", &k)], false);
    let port = wire.port;
    for endpoint in [
        format!("https://127.0.0.1:{port}/push"),
        format!("https://127.1.2.3:{port}/push"),
        format!("https://[::1]:{port}/push"),
        format!("https://[::ffff:127.0.0.1]:{port}/push"),
        // a host name that resolves to loopback: refused by the resolver, before connecting
        format!("https://localhost:{port}/push"),
        // plain http, even to a host that would otherwise be checked later
        format!("http://localhost:{port}/push"),
    ] {
        let (token, _, _) = own_subscription(&endpoint);
        match sender
            .send(&target("", &token), &note("x".into(), &[]))
            .await
        {
            Err(SendError::Rejected { reason }) => {
                let expected = if endpoint.starts_with("http:") {
                    "https"
                } else {
                    "loopback"
                };
                assert!(reason.contains(expected), "{endpoint}: {reason}");
            }
            other => panic!("{endpoint}: expected Rejected, got {other:?}"),
        }
    }
    assert!(!wire.tripped().await, "a refused endpoint was connected to");
}

#[tokio::test]
async fn the_real_push_service_on_loopback_is_refused_unless_allowed() {
    let service = WebPushTesting::start().await;
    let k = keys();
    let sub = service.subscribe(&k.public).await;
    // web-push-testing hands out http://localhost:PORT/… endpoints.
    let strict = sender(vec![app("", &k)], false);
    let refused = strict
        .send(&target("", &sub.token), &note("x".into(), &[]))
        .await;
    assert!(
        matches!(refused, Err(SendError::Rejected { .. })),
        "{refused:?}"
    );
    // Same subscription with https (still loopback): refused by the resolver.
    let https_token = sub.token.replace("http://", "https://");
    let refused = strict
        .send(&target("", &https_token), &note("x".into(), &[]))
        .await;
    match refused {
        Err(SendError::Rejected { reason }) => assert!(reason.contains("loopback"), "{reason}"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(service.messages(&sub).await.is_empty());
    service.stop().await;
}

#[tokio::test]
async fn responses_are_classified() {
    let k = keys();
    let sender = sender(vec![app("", &k)], true);
    type Check = fn(&SendError) -> bool;
    type Case<'a> = (u16, Vec<(&'a str, &'a str)>, &'a str, Check);
    let cases: Vec<Case> = vec![
        (404, vec![], "", |e| {
            matches!(e, SendError::Unregistered { .. })
        }),
        (410, vec![], "gone", |e| {
            matches!(e, SendError::Unregistered { .. })
        }),
        (
            413,
            vec![],
            "",
            |e| matches!(e, SendError::Rejected { reason } if reason.contains("too large")),
        ),
        (
            429,
            vec![("Retry-After", "30")],
            "",
            |e| matches!(e, SendError::Retry { after: Some(d), .. } if *d == Duration::from_secs(30)),
        ),
        (
            503,
            vec![("Retry-After", "7")],
            "",
            |e| matches!(e, SendError::Retry { after: Some(d), .. } if *d == Duration::from_secs(7)),
        ),
        (500, vec![], "", |e| {
            matches!(e, SendError::Retry { after: None, .. })
        }),
        (
            400,
            vec![],
            "UnauthorizedRegistration: bad payload",
            |e| matches!(e, SendError::Rejected { reason } if reason.contains("bad payload")),
        ),
        (
            401,
            vec![],
            "invalid JWT",
            |e| matches!(e, SendError::Rejected { reason } if reason.contains("VAPID") && reason.contains("invalid JWT")),
        ),
        (403, vec![], "", |e| matches!(e, SendError::Rejected { .. })),
    ];
    for (status, headers, body, check) in cases {
        let endpoint = ScriptedEndpoint::start(status, &headers, body).await;
        let (token, _, _) = own_subscription(&endpoint.url("/p"));
        let err = sender
            .send(&target("", &token), &note("x".into(), &[]))
            .await
            .expect_err("not a success");
        assert!(check(&err), "{status}: {err:?}");
    }
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let wire = Tripwire::start().await;
    let redirect_to = format!("http://127.0.0.1:{}/elsewhere", wire.port);
    let endpoint = ScriptedEndpoint::start(307, &[("Location", &redirect_to)], "").await;
    let k = keys();
    let sender = sender(vec![app("", &k)], true);
    let (token, _, _) = own_subscription(&endpoint.url("/p"));
    let err = sender
        .send(&target("", &token), &note("x".into(), &[]))
        .await
        .expect_err("redirect");
    assert!(
        matches!(&err, SendError::Rejected { reason } if reason.contains("redirect")),
        "{err:?}"
    );
    assert!(!wire.tripped().await, "the redirect was followed");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_retried() {
    let k = keys();
    let sender = sender(vec![app("", &k)], true);
    // A port nobody listens on.
    let port = support::free_port();
    let (token, _, _) = own_subscription(&format!("http://127.0.0.1:{port}/p"));
    let err = sender
        .send(&target("", &token), &note("x".into(), &[]))
        .await
        .expect_err("unreachable");
    assert!(matches!(err, SendError::Retry { .. }), "{err:?}");
}

/// Not an assertion on speed: 2,000 sends, 64 at a time, through web-push-testing (a
/// single-threaded Node server, the bottleneck). Prints the rate; every message must arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_2000_sends_concurrency_64() {
    use futures::StreamExt as _;

    let service = WebPushTesting::start().await;
    let k = keys();
    let sender = Arc::new(sender(vec![app("", &k)], true));
    let subs = futures::future::join_all((0..8).map(|_| service.subscribe(&k.public))).await;
    const TOTAL: usize = 2000;
    let started = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..TOTAL)
        .map(|i| {
            let sender = sender.clone();
            let token = subs[i % subs.len()].token.clone();
            async move {
                sender
                    .send(&target("", &token), &note(format!("m{i}").into(), &[]))
                    .await
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    println!(
        "web push throughput: {TOTAL} sends, concurrency 64, {:.2} s, {:.0} sends/s",
        elapsed.as_secs_f64(),
        TOTAL as f64 / elapsed.as_secs_f64()
    );
    let mut received = 0;
    for sub in &subs {
        received += service.messages(sub).await.len();
    }
    assert_eq!(received, TOTAL);
    service.stop().await;
}
