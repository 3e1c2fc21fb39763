//! The APNs sender against the APNs emulator: every documented answer and how it is
//! classified, provider-token caching and re-signing, the checks made before sending.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use herald_core::device::Provider;
use herald_core::duration::HumanDuration;
use herald_outbound::apns::{ApnsConfig, ApnsSender};
use herald_outbound::sender::{ApnsNotification, Destination, SendError, Sender, Target};
use herald_pushmock::{ApnsFailure, ApnsKey};
use serde_json::json;

fn alert(text: &str) -> ApnsNotification {
    ApnsNotification {
        headers: BTreeMap::new(),
        payload: json!({"aps": {"alert": {"title": "Herald", "body": text}}, "room": "r1"}),
    }
}

fn with_headers(mut n: ApnsNotification, headers: &[(&str, &str)]) -> ApnsNotification {
    for (name, value) in headers {
        n.headers.insert((*name).to_owned(), (*value).to_owned());
    }
    n
}

async fn send(sender: &ApnsSender, token: &str, n: &ApnsNotification) -> Result<String, SendError> {
    sender
        .send(&apns_target("", token), n)
        .await
        .map(|sent| sent.message_id)
}

fn rejected_with(result: Result<String, SendError>, what: &str) {
    match result {
        Err(SendError::Rejected { reason }) => {
            assert!(reason.contains(what), "{reason:?} should mention {what}")
        }
        other => panic!("expected Rejected({what}), got {other:?}"),
    }
}

#[tokio::test]
async fn sent_with_the_headers_and_payload_apple_gets() {
    let mock = mock().await;
    let sender = ApnsSender::new(&apns_config(&mock)).expect("sender");
    let id = "6E1F4C3A-1A2B-4C5D-8E9F-0A1B2C3D4E5F";
    let n = with_headers(
        alert("hello"),
        &[
            ("apns-id", id),
            ("APNS-Expiration", "1900000000"),
            ("apns-collapse-id", "room-r1"),
        ],
    );
    let message_id = send(&sender, &device(1), &n).await.expect("sent");
    assert_eq!(message_id, id);

    let records = mock.apns.records();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.token, device(1));
    assert_eq!(record.payload, n.payload);
    assert_eq!(record.headers["apns-topic"], TOPIC);
    assert_eq!(record.headers["apns-push-type"], "alert");
    assert_eq!(record.headers["apns-priority"], "10");
    assert_eq!(record.headers["apns-expiration"], "1900000000");
    assert_eq!(record.headers["apns-collapse-id"], "room-r1");
    assert_eq!(record.key_id, "KEY0000001");
    assert_eq!(record.team_id, "TEAM000001");

    // Without an apns-id, the one APNs made up comes back.
    let generated = send(&sender, &device(2), &alert("again"))
        .await
        .expect("sent");
    assert_eq!(generated.len(), 36);
    assert_eq!(mock.apns.records()[1].apns_id, generated);
}

#[tokio::test]
async fn unregistered_token_reports_since_when() {
    let mock = mock().await;
    let sender = ApnsSender::new(&apns_config(&mock)).expect("sender");
    mock.apns.unregister(&device(3), 1_700_000_000_123);
    match send(&sender, &device(3), &alert("x")).await {
        Err(SendError::Unregistered { reason, since }) => {
            assert_eq!(reason, "Unregistered");
            assert_eq!(since, Some(1_700_000_000_123));
        }
        other => panic!("expected Unregistered, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_device_token_and_token_of_another_topic_are_dead() {
    let mock = mock().await;
    let sender = ApnsSender::new(&apns_config(&mock)).expect("sender");

    // Well-formed but unknown to this environment.
    mock.apns.set_unknown_token(&device(4));
    let dead = send(&sender, &device(4), &alert("x")).await;
    assert_eq!(
        dead,
        Err(SendError::Unregistered {
            reason: "BadDeviceToken".into(),
            since: None
        })
    );
    // Not 64 hex digits: APNs says BadDeviceToken too.
    let short = send(&sender, "abcdef", &alert("x")).await;
    assert!(matches!(
        short,
        Err(SendError::Unregistered { since: None, .. })
    ));
    // Not even URL-safe: refused the same way without a request.
    let before = mock.apns.requests();
    let garbage = send(&sender, "ab/../cd", &alert("x")).await;
    assert!(matches!(garbage, Err(SendError::Unregistered { .. })));
    assert_eq!(mock.apns.requests(), before);

    mock.apns.set_token_topic(&device(5), "com.example.other");
    assert_eq!(
        send(&sender, &device(5), &alert("x")).await,
        Err(SendError::Unregistered {
            reason: "DeviceTokenNotForTopic".into(),
            since: None
        })
    );
}

#[tokio::test]
async fn expired_provider_token_is_re_signed_for_the_next_attempt() {
    let mock = mock().await;
    let sender = ApnsSender::new(&apns_config(&mock)).expect("sender");
    send(&sender, &device(6), &alert("1")).await.expect("sent");
    assert_eq!(mock.apns.provider_tokens().len(), 1);

    mock.apns.expire_next(1);
    assert_eq!(
        send(&sender, &device(6), &alert("2")).await,
        Err(SendError::Retry {
            reason: "ExpiredProviderToken: re-signed the provider token".into(),
            after: Some(Duration::ZERO)
        })
    );
    send(&sender, &device(6), &alert("3"))
        .await
        .expect("sent with the new token");
    let tokens = mock.apns.provider_tokens();
    assert_eq!(tokens.len(), 2, "the retry used a new provider token");
    assert_ne!(tokens[0], tokens[1]);
    assert_eq!(sender.signatures(""), Some(2));
    let records = mock.apns.records();
    assert!(records[1].jwt_iat > records[0].jwt_iat);
}

#[tokio::test]
async fn provider_token_is_reused_for_20_minutes_and_replaced_before_60() {
    let mock = mock().await;
    let clocks = Clocks::new();
    let sender =
        Arc::new(ApnsSender::with_clock(&apns_config(&mock), clocks.shared()).expect("sender"));
    let burst = |from: u32| {
        let sender = sender.clone();
        async move {
            let sends = (from..from + 50).map(|i| {
                let sender = sender.clone();
                async move { send(&sender, &device(i), &alert("burst")).await }
            });
            for result in futures::future::join_all(sends).await {
                result.expect("sent");
            }
        }
    };
    burst(0).await;
    assert_eq!(mock.apns.provider_tokens().len(), 1, "50 sends, one token");

    clocks.advance(&mock, Duration::from_secs(19 * 60));
    burst(100).await;
    assert_eq!(
        mock.apns.provider_tokens().len(),
        1,
        "still fresh at 19 minutes"
    );

    clocks.advance(&mock, Duration::from_secs(36 * 60));
    burst(200).await;
    let tokens = mock.apns.provider_tokens();
    assert_eq!(tokens.len(), 2, "re-signed once by 55 minutes");
    assert_eq!(sender.signatures(""), Some(2));
    assert_eq!(mock.apns.accepted(), 150);
    let stats = mock.apns.stats();
    assert!(stats.rejected.is_empty());
    // Multiplexed: 150 requests, 50 at a time, on one HTTP/2 connection.
    assert_eq!(stats.connections, 1);
    assert!(
        mock.apns
            .records()
            .iter()
            .all(|r| r.http_version == "HTTP/2.0")
    );
}

#[tokio::test]
async fn a_token_apple_finds_older_than_an_hour_is_refused() {
    // The sender's clock lags the emulator's by over an hour: APNs says the token expired;
    // the sender re-signs (which cannot help here) and reports Retry each time.
    let mock = mock().await;
    let sender = ApnsSender::new(&apns_config(&mock)).expect("sender");
    mock.advance_clock(Duration::from_secs(61 * 60));
    assert!(matches!(
        send(&sender, &device(7), &alert("x")).await,
        Err(SendError::Retry { after: Some(d), .. }) if d.is_zero()
    ));
    assert_eq!(mock.apns.stats().rejected["ExpiredProviderToken"], 1);
}

#[tokio::test]
async fn too_many_requests_and_unavailable_honour_retry_after() {
    let mock = mock().await;
    let sender = ApnsSender::new(&apns_config(&mock)).expect("sender");
    let token = device(8);
    let inject = |status, reason: &str, retry_after| {
        mock.apns.inject(ApnsFailure {
            token: Some(token.clone()),
            count: 1,
            status,
            reason: reason.to_owned(),
            retry_after,
        })
    };
    inject(429, "TooManyRequests", Some(30));
    assert_eq!(
        send(&sender, &token, &alert("x")).await,
        Err(SendError::Retry {
            reason: "TooManyRequests".into(),
            after: Some(Duration::from_secs(30))
        })
    );
    inject(503, "ServiceUnavailable", Some(5));
    assert_eq!(
        send(&sender, &token, &alert("x")).await,
        Err(SendError::Retry {
            reason: "ServiceUnavailable".into(),
            after: Some(Duration::from_secs(5))
        })
    );
    inject(500, "InternalServerError", None);
    assert_eq!(
        send(&sender, &token, &alert("x")).await,
        Err(SendError::Retry {
            reason: "InternalServerError".into(),
            after: None
        })
    );
    inject(503, "Shutdown", None);
    assert!(matches!(
        send(&sender, &token, &alert("x")).await,
        Err(SendError::Retry { after: None, .. })
    ));
    // Another token was never affected; this one works again.
    send(&sender, &device(9), &alert("x")).await.expect("sent");
    send(&sender, &token, &alert("x")).await.expect("sent");
}

#[tokio::test]
async fn payload_too_large_is_caught_before_sending() {
    let mock = mock().await;
    let sender = ApnsSender::new(&apns_config(&mock)).expect("sender");
    let big = ApnsNotification {
        headers: BTreeMap::new(),
        payload: json!({"aps": {"alert": "x"}, "blob": "a".repeat(4100)}),
    };
    rejected_with(send(&sender, &device(10), &big).await, "PayloadTooLarge");
    assert_eq!(mock.apns.requests(), 0, "nothing reached APNs");

    // VoIP allows 5120 bytes, and goes to the bundle's .voip topic.
    let voip = with_headers(big, &[("apns-push-type", "voip")]);
    send(&sender, &device(10), &voip).await.expect("voip fits");
    let record = &mock.apns.records()[0];
    assert_eq!(record.headers["apns-topic"], format!("{TOPIC}.voip"));
    assert_eq!(record.headers["apns-push-type"], "voip");
}

#[tokio::test]
async fn background_pushes_get_their_type_and_priority_5() {
    let mock = mock().await;
    let sender = ApnsSender::new(&apns_config(&mock)).expect("sender");
    let silent = ApnsNotification {
        headers: BTreeMap::new(),
        payload: json!({"aps": {"content-available": 1}, "sync": "inbox"}),
    };
    send(&sender, &device(11), &silent).await.expect("sent");
    let record = &mock.apns.records()[0];
    assert_eq!(record.headers["apns-push-type"], "background");
    assert_eq!(record.headers["apns-priority"], "5");

    // Priority 10 on a background push is an error at Apple: refused here, unsent.
    let wrong = with_headers(silent, &[("apns-priority", "10")]);
    rejected_with(send(&sender, &device(11), &wrong).await, "BadPriority");
    assert_eq!(mock.apns.requests(), 1);
}

#[tokio::test]
async fn other_client_errors_are_rejected_and_the_device_kept() {
    let mock = mock().await;
    let sender = ApnsSender::new(&apns_config(&mock)).expect("sender");
    let token = device(12);
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("apns-topic", "com.not.ours")], "TopicDisallowed"),
        (&[("apns-expiration", "tomorrow")], "BadExpirationDate"),
        (&[("apns-id", "not-a-uuid")], "BadMessageId"),
        (&[("apns-priority", "7")], "BadPriority"),
        (&[("apns-push-type", "telepathy")], "InvalidPushType"),
    ];
    for (headers, reason) in cases {
        let n = with_headers(alert("x"), headers);
        rejected_with(send(&sender, &token, &n).await, reason);
    }
    // Refused before sending: too long a collapse id, a header that is not APNs's.
    let long = "c".repeat(65);
    let n = with_headers(alert("x"), &[("apns-collapse-id", long.as_str())]);
    rejected_with(send(&sender, &token, &n).await, "BadCollapseId");
    let n = with_headers(alert("x"), &[("authorization", "bearer mine")]);
    rejected_with(send(&sender, &token, &n).await, "not an APNs header");
    assert_eq!(mock.apns.requests(), cases.len() as u64);

    // A key APNs does not know.
    let stranger = ApnsKey::generate("KEYUNKNOWN", "TEAM000001").expect("key");
    let config = ApnsConfig {
        apps: vec![apns_app(&mock, "", &stranger, TOPIC)],
    };
    let sender = ApnsSender::new(&config).expect("sender");
    rejected_with(
        send(&sender, &token, &alert("x")).await,
        "403 InvalidProviderToken",
    );
}

#[tokio::test]
async fn apps_are_chosen_by_target_app() {
    let mock = mock().await;
    let one = mock
        .apns_key("KEYONE0001", "TEAMONE001", &[TOPIC])
        .expect("key");
    let two = mock
        .apns_key("KEYTWO0001", "TEAMTWO001", &[TOPIC_TWO])
        .expect("key");
    let config = ApnsConfig {
        apps: vec![
            apns_app(&mock, "", &one, TOPIC),
            apns_app(&mock, "two", &two, TOPIC_TWO),
        ],
    };
    let sender = ApnsSender::new(&config).expect("sender");
    let n = alert("x");
    sender
        .send(&apns_target("", &device(13)), &n)
        .await
        .expect("sent");
    sender
        .send(&apns_target("two", &device(14)), &n)
        .await
        .expect("sent");
    let records = mock.apns.records();
    assert_eq!(
        (
            records[0].key_id.as_str(),
            records[0].headers["apns-topic"].as_str()
        ),
        ("KEYONE0001", TOPIC)
    );
    assert_eq!(
        (
            records[1].key_id.as_str(),
            records[1].headers["apns-topic"].as_str()
        ),
        ("KEYTWO0001", TOPIC_TWO)
    );
    assert!(matches!(
        sender.send(&apns_target("three", &device(15)), &n).await,
        Err(SendError::NotConfigured { .. })
    ));
    // Not a device token, not APNs.
    let topic = Target {
        provider: Provider::Apns,
        app: String::new(),
        to: Destination::FcmTopic("news".into()),
    };
    assert!(matches!(
        sender.send(&topic, &n).await,
        Err(SendError::Rejected { .. })
    ));
    let fcm = Target {
        provider: Provider::Fcm,
        ..apns_target("", &device(16))
    };
    assert!(matches!(
        sender.send(&fcm, &n).await,
        Err(SendError::Rejected { .. })
    ));
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_retried() {
    let mock = mock().await;
    let mut config = apns_config(&mock);
    config.apps[0].request_timeout = HumanDuration(Duration::from_millis(200));
    let sender = ApnsSender::new(&config).expect("sender");
    mock.apns.set_latency(Duration::from_secs(2));
    match send(&sender, &device(17), &alert("x")).await {
        Err(SendError::Retry {
            reason,
            after: None,
        }) => assert!(reason.contains("timed out")),
        other => panic!("expected a Retry on timeout, got {other:?}"),
    }

    // Nothing listens there any more.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    config.apps[0].base_url = Some(format!("http://{closed}"));
    let sender = ApnsSender::new(&config).expect("sender");
    assert!(matches!(
        send(&sender, &device(17), &alert("x")).await,
        Err(SendError::Retry { after: None, .. })
    ));
}

#[tokio::test]
async fn config_is_checked_when_the_sender_is_built() {
    let mock = mock().await;
    let key = mock
        .apns_key("KEYFILE001", "TEAMFILE01", &[TOPIC])
        .expect("key");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = key.write_p8(dir.path()).expect("write .p8");
    let parsed: ApnsConfig = serde_json::from_value(json!({
        "apps": [{
            "key_file": path,
            "key_id": "KEYFILE001",
            "team_id": "TEAMFILE01",
            "topic": TOPIC,
            "environment": "sandbox",
            "base_url": mock.apns_url(),
            "request_timeout": "3s",
        }]
    }))
    .expect("valid config");
    let sender = ApnsSender::new(&parsed).expect("sender from a key file");
    send(&sender, &device(18), &alert("x")).await.expect("sent");

    let unknown_field = serde_json::from_value::<ApnsConfig>(json!({
        "apps": [{"key_id": "K", "team_id": "T", "topic": TOPIC, "certificate": "x"}]
    }));
    assert!(unknown_field.is_err());

    let mut both = parsed.clone();
    both.apps[0].key_pem = Some(key.private_key_pem.clone());
    assert!(ApnsSender::new(&both).is_err());
    let mut neither = parsed.clone();
    neither.apps[0].key_file = None;
    assert!(ApnsSender::new(&neither).is_err());
    let mut not_a_key = parsed.clone();
    not_a_key.apps[0].key_file = None;
    not_a_key.apps[0].key_pem =
        Some("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into());
    assert!(ApnsSender::new(&not_a_key).is_err());
    let mut twice = parsed.clone();
    twice.apps.push(parsed.apps[0].clone());
    assert!(ApnsSender::new(&twice).is_err());
    // The key never shows in logs.
    let mut inline = parsed.clone();
    inline.apps[0].key_pem = Some(key.private_key_pem.clone());
    assert!(!format!("{inline:?}").contains("PRIVATE KEY"));
}
