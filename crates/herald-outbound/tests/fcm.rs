//! The FCM sender against the FCM emulator and its OAuth token endpoint: access tokens
//! (one fetch for many sends, refresh on 401 and before expiry), every documented error code
//! and how it is classified, message shaping, several projects.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use herald_outbound::fcm::{FcmConfig, FcmSender};
use herald_outbound::sender::{Destination, FcmNotification, SendError, Sender};
use herald_pushmock::{FcmFailure, ServiceAccount};
use serde_json::json;

fn message() -> FcmNotification {
    FcmNotification {
        message: json!({
            "notification": {"title": "Herald", "body": "hello"},
            "data": {"room": "r1", "unread": 3, "urgent": true, "meta": {"k": [1, 2]}},
            "android": {"priority": "high"},
        }),
    }
}

async fn send_to(sender: &FcmSender, token: &str) -> Result<String, SendError> {
    sender
        .send(
            &fcm_target("", Destination::Token(token.to_owned())),
            &message(),
        )
        .await
        .map(|sent| sent.message_id)
}

fn inject(mock: &herald_pushmock::PushMock, target: &str, error: &str, retry_after: Option<u64>) {
    mock.fcm.inject(FcmFailure {
        target: Some(target.to_owned()),
        count: 1,
        error: error.to_owned(),
        retry_after,
    });
}

#[tokio::test]
async fn sent_with_target_set_and_data_stringified() {
    let mock = mock().await;
    let sender = FcmSender::new(&fcm_config(&mock)).expect("sender");
    let name = send_to(&sender, &fcm_token(1)).await.expect("sent");
    assert!(name.starts_with("projects/proj-a/messages/"), "{name}");

    let records = mock.fcm.records();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.project_id, "proj-a");
    assert_eq!(record.name, name);
    assert_eq!(record.http_version, "HTTP/2.0");
    assert_eq!(
        record.message,
        json!({
            "token": fcm_token(1),
            "notification": {"title": "Herald", "body": "hello"},
            "data": {"room": "r1", "unread": "3", "urgent": "true", "meta": "{\"k\":[1,2]}"},
            "android": {"priority": "high"},
        })
    );
}

#[tokio::test]
async fn topic_and_condition_destinations() {
    let mock = mock().await;
    let sender = FcmSender::new(&fcm_config(&mock)).expect("sender");
    let condition = "'news' in topics && ('sport' in topics || 'tech' in topics)";
    for to in [
        Destination::FcmTopic("news".into()),
        Destination::FcmCondition(condition.into()),
    ] {
        sender
            .send(&fcm_target("", to), &message())
            .await
            .expect("sent");
    }
    let records = mock.fcm.records();
    assert_eq!(records[0].message["topic"], "news");
    assert!(records[0].message.get("token").is_none());
    assert_eq!(records[1].message["condition"], condition);
    assert!(records[1].message.get("topic").is_none());
}

#[tokio::test]
async fn one_token_fetch_serves_many_concurrent_sends() {
    let mock = mock().await;
    let sender = Arc::new(FcmSender::new(&fcm_config(&mock)).expect("sender"));
    let sends = (0..200).map(|i| {
        let sender = sender.clone();
        async move { send_to(&sender, &fcm_token(i)).await }
    });
    for result in futures::future::join_all(sends).await {
        result.expect("sent");
    }
    assert_eq!(mock.fcm.accepted(), 200);
    assert_eq!(mock.fcm.tokens_issued(), 1, "single-flight refresh");
    assert_eq!(sender.token_fetches(""), Some(1));
    let stats = mock.fcm.stats();
    assert_eq!(stats.token_requests, 1);
    // Token request and 200 sends multiplexed on one HTTP/2 connection.
    assert_eq!(stats.connections, 1);
}

#[tokio::test]
async fn a_revoked_token_is_refreshed_after_the_401() {
    let mock = mock().await;
    let sender = FcmSender::new(&fcm_config(&mock)).expect("sender");
    send_to(&sender, &fcm_token(1)).await.expect("sent");
    mock.fcm.revoke_all_tokens();
    match send_to(&sender, &fcm_token(1)).await {
        Err(SendError::Retry { reason, after }) => {
            assert!(reason.contains("401"), "{reason}");
            assert_eq!(after, Some(Duration::ZERO));
        }
        other => panic!("expected Retry after a 401, got {other:?}"),
    }
    send_to(&sender, &fcm_token(1))
        .await
        .expect("sent with a new token");
    assert_eq!(mock.fcm.tokens_issued(), 2);
    assert_eq!(mock.fcm.stats().rejected["UNAUTHENTICATED"], 1);
}

#[tokio::test]
async fn a_token_is_refreshed_shortly_before_it_expires() {
    let mock = mock().await;
    mock.fcm.set_token_expires_in(600);
    let clocks = Clocks::new();
    let sender = FcmSender::with_clock(&fcm_config(&mock), clocks.shared()).expect("sender");
    send_to(&sender, &fcm_token(1)).await.expect("sent");
    clocks.advance(&mock, Duration::from_secs(500));
    send_to(&sender, &fcm_token(1)).await.expect("sent");
    assert_eq!(mock.fcm.tokens_issued(), 1, "still valid at 500 of 600 s");
    clocks.advance(&mock, Duration::from_secs(50));
    send_to(&sender, &fcm_token(1)).await.expect("sent");
    assert_eq!(
        mock.fcm.tokens_issued(),
        2,
        "refreshed within the last tenth"
    );
    assert!(
        mock.fcm.stats().rejected.is_empty(),
        "refreshed before any 401"
    );
}

#[tokio::test]
async fn unregistered_and_sender_id_mismatch_mean_the_token_is_dead() {
    let mock = mock().await;
    let sender = FcmSender::new(&fcm_config(&mock)).expect("sender");
    mock.fcm.unregister(&fcm_token(2));
    match send_to(&sender, &fcm_token(2)).await {
        Err(SendError::Unregistered { reason, since }) => {
            assert!(reason.starts_with("404 UNREGISTERED"), "{reason}");
            assert_eq!(since, None);
        }
        other => panic!("expected Unregistered, got {other:?}"),
    }
    mock.fcm.set_token_project(&fcm_token(3), "someone-else");
    match send_to(&sender, &fcm_token(3)).await {
        Err(SendError::Unregistered { reason, .. }) => {
            assert!(reason.starts_with("403 SENDER_ID_MISMATCH"), "{reason}")
        }
        other => panic!("expected Unregistered, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_argument_is_rejected_and_never_deletes() {
    let mock = mock().await;
    let sender = FcmSender::new(&fcm_config(&mock)).expect("sender");
    // About the registration token itself: FCM says INVALID_ARGUMENT, which is not proof
    // the device is gone.
    match send_to(&sender, "not a token!").await {
        Err(SendError::Rejected { reason }) => {
            assert!(reason.contains("INVALID_ARGUMENT"), "{reason}");
            assert!(reason.contains("registration token"), "{reason}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    inject(&mock, &fcm_token(4), "INVALID_ARGUMENT", None);
    assert!(matches!(
        send_to(&sender, &fcm_token(4)).await,
        Err(SendError::Rejected { .. })
    ));
    // Too big a payload.
    let big = FcmNotification {
        message: json!({"data": {"blob": "x".repeat(5000)}}),
    };
    let to = fcm_target("", Destination::Token(fcm_token(4)));
    assert!(matches!(
        sender.send(&to, &big).await,
        Err(SendError::Rejected { reason }) if reason.contains("too big")
    ));
    // Not a message object at all: refused without a request.
    let before = mock.fcm.stats().requests;
    let not_object = FcmNotification {
        message: json!(["x"]),
    };
    assert!(matches!(
        sender.send(&to, &not_object).await,
        Err(SendError::Rejected { .. })
    ));
    assert_eq!(mock.fcm.stats().requests, before);
}

#[tokio::test]
async fn quota_unavailable_and_internal_are_retried_after_retry_after() {
    let mock = mock().await;
    let sender = FcmSender::new(&fcm_config(&mock)).expect("sender");
    let token = fcm_token(5);
    inject(&mock, &token, "QUOTA_EXCEEDED", Some(42));
    match send_to(&sender, &token).await {
        Err(SendError::Retry { reason, after }) => {
            assert!(reason.starts_with("429 QUOTA_EXCEEDED"), "{reason}");
            assert_eq!(after, Some(Duration::from_secs(42)));
        }
        other => panic!("expected Retry, got {other:?}"),
    }
    inject(&mock, &token, "UNAVAILABLE", Some(7));
    assert!(matches!(
        send_to(&sender, &token).await,
        Err(SendError::Retry { after: Some(d), .. }) if d == Duration::from_secs(7)
    ));
    inject(&mock, &token, "INTERNAL", None);
    assert!(matches!(
        send_to(&sender, &token).await,
        Err(SendError::Retry { after: None, reason }) if reason.starts_with("500 INTERNAL")
    ));
    send_to(&sender, &token)
        .await
        .expect("sent once the failures are used up");
}

#[tokio::test]
async fn third_party_auth_error_is_rejected_not_a_token_refresh() {
    let mock = mock().await;
    let sender = FcmSender::new(&fcm_config(&mock)).expect("sender");
    inject(&mock, &fcm_token(6), "THIRD_PARTY_AUTH_ERROR", None);
    match send_to(&sender, &fcm_token(6)).await {
        Err(SendError::Rejected { reason }) => {
            assert!(reason.starts_with("401 THIRD_PARTY_AUTH_ERROR"), "{reason}")
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(mock.fcm.tokens_issued(), 1, "our own token was fine");
}

#[tokio::test]
async fn projects_are_chosen_by_target_app() {
    let mock = mock().await;
    let a = mock.fcm_account("proj-a").expect("account");
    let b = mock.fcm_account("proj-b").expect("account");
    let config = FcmConfig {
        apps: vec![fcm_app(&mock, "", &a), fcm_app(&mock, "b", &b)],
    };
    let sender = FcmSender::new(&config).expect("sender");
    assert_eq!(sender.project_id("b"), Some("proj-b"));
    let to = Destination::Token(fcm_token(7));
    sender
        .send(&fcm_target("", to.clone()), &message())
        .await
        .expect("sent");
    sender
        .send(&fcm_target("b", to.clone()), &message())
        .await
        .expect("sent");
    let records = mock.fcm.records();
    assert_eq!(records[0].project_id, "proj-a");
    assert_eq!(records[0].client_email, a.client_email);
    assert_eq!(records[1].project_id, "proj-b");
    assert_eq!(records[1].client_email, b.client_email);
    assert_eq!(mock.fcm.tokens_issued(), 2, "one token per service account");
    assert!(matches!(
        sender.send(&fcm_target("c", to), &message()).await,
        Err(SendError::NotConfigured { .. })
    ));
}

#[tokio::test]
async fn credentials_the_token_endpoint_refuses_are_not_configured() {
    let mock = mock().await;
    // A key Google never issued (not registered with the emulator).
    let stranger = ServiceAccount::generate("proj-a", &mock.token_url()).expect("account");
    let config = FcmConfig {
        apps: vec![fcm_app(&mock, "", &stranger)],
    };
    let sender = FcmSender::new(&config).expect("sender");
    match send_to(&sender, &fcm_token(8)).await {
        Err(SendError::NotConfigured { reason }) => {
            assert!(reason.contains("invalid_grant"), "{reason}")
        }
        other => panic!("expected NotConfigured, got {other:?}"),
    }
    assert_eq!(mock.fcm.stats().requests, 0, "no send without a token");
}

#[tokio::test]
async fn config_is_checked_when_the_sender_is_built() {
    let mock = mock().await;
    let account = mock.fcm_account("proj-file").expect("account");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("service-account.json");
    account.write_json(&path).expect("write");
    let parsed: FcmConfig = serde_json::from_value(json!({
        "apps": [{
            "app": "files",
            "credentials_file": path,
            "base_url": mock.fcm_url(),
            "request_timeout": "2s",
        }]
    }))
    .expect("valid config");
    let sender = FcmSender::new(&parsed).expect("sender from a key file");
    sender
        .send(
            &fcm_target("files", Destination::Token(fcm_token(9))),
            &message(),
        )
        .await
        .expect("sent");

    assert!(serde_json::from_value::<FcmConfig>(json!({"apps": [{"api_key": "x"}]})).is_err());
    let mut both = parsed.clone();
    both.apps[0].credentials_json = Some(account.to_json().to_string());
    assert!(FcmSender::new(&both).is_err());
    let mut bad_key = parsed.clone();
    bad_key.apps[0].credentials_file = None;
    let mut json = account.to_json();
    json["private_key"] = json!("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
    bad_key.apps[0].credentials_json = Some(json.to_string());
    assert!(FcmSender::new(&bad_key).is_err());
    let mut twice = parsed.clone();
    twice.apps.push(parsed.apps[0].clone());
    assert!(FcmSender::new(&twice).is_err());
    let mut inline = parsed.clone();
    inline.apps[0].credentials_json = Some(account.to_json().to_string());
    assert!(!format!("{inline:?}").contains("PRIVATE KEY"));
}
