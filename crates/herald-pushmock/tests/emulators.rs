//! The emulators themselves, driven by a bare HTTP client: the checks a well-behaved sender
//! never trips (missing or forged credentials, bad paths and methods, malformed requests),
//! each answered with the status and body the real service documents.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use herald_pushmock::{ApnsKey, PushMock, ServiceAccount};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const TOPIC: &str = "com.example.app";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn h2() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client")
}

fn apns_jwt(key: &ApnsKey, iat: u64) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.key_id.clone());
    let key_pem = EncodingKey::from_ec_pem(key.private_key_pem.as_bytes()).expect("key");
    jsonwebtoken::encode(&header, &json!({"iss": key.team_id, "iat": iat}), &key_pem).expect("sign")
}

struct Apns {
    mock: PushMock,
    client: reqwest::Client,
    jwt: String,
}

impl Apns {
    async fn start() -> (Self, ApnsKey) {
        let mock = PushMock::start_default().await.expect("start");
        let key = mock.apns_key("KEY1", "TEAM1", &[TOPIC]).expect("key");
        let jwt = apns_jwt(&key, now());
        let apns = Self {
            mock,
            client: h2(),
            jwt,
        };
        (apns, key)
    }

    /// A request that passes every check, to be spoiled by `edit`.
    async fn post(
        &self,
        path: &str,
        edit: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> (u16, Value) {
        let request = self
            .client
            .post(format!("{}{path}", self.mock.apns_url()))
            .header("authorization", format!("bearer {}", self.jwt))
            .header("apns-topic", TOPIC)
            .body(r#"{"aps":{"alert":"hi"}}"#);
        let response = edit(request).send().await.expect("answer");
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("body");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

fn device() -> String {
    "ab".repeat(32)
}

#[tokio::test]
async fn apns_refuses_what_apple_refuses() {
    let (apns, key) = Apns::start().await;
    let path = format!("/3/device/{}", device());
    let reason =
        |(status, body): (u16, Value)| (status, body["reason"].as_str().unwrap_or("").to_owned());

    assert_eq!(apns.post(&path, |r| r).await.0, 200);
    assert_eq!(
        reason(apns.post("/3/device/", |r| r).await),
        (400, "MissingDeviceToken".into())
    );
    assert_eq!(
        reason(apns.post("/2/device/x", |r| r).await),
        (404, "BadPath".into())
    );
    let get = apns
        .client
        .get(format!("{}{path}", apns.mock.apns_url()))
        .send()
        .await
        .expect("answer");
    assert_eq!(get.status().as_u16(), 405);

    // Provider tokens.
    let unsigned = |r: reqwest::RequestBuilder| {
        let mut request = r.build().expect("request");
        request.headers_mut().remove("authorization");
        reqwest::RequestBuilder::from_parts(h2(), request)
    };
    assert_eq!(
        reason(apns.post(&path, unsigned).await),
        (403, "MissingProviderToken".into())
    );
    let forged = ApnsKey::generate("KEY1", "TEAM1").expect("key");
    let forged_jwt = apns_jwt(&forged, now());
    let (status, body) = apns
        .post(&path, |r| {
            let mut request = r.build().expect("request");
            request.headers_mut().insert(
                "authorization",
                format!("bearer {forged_jwt}").parse().expect("header"),
            );
            reqwest::RequestBuilder::from_parts(h2(), request)
        })
        .await;
    assert_eq!(
        (status, body["reason"].clone()),
        (403, json!("InvalidProviderToken"))
    );
    let stale = apns_jwt(&key, now() - 3601);
    let (status, body) = apns
        .post(&path, |r| {
            let mut request = r.build().expect("request");
            request.headers_mut().insert(
                "authorization",
                format!("bearer {stale}").parse().expect("header"),
            );
            reqwest::RequestBuilder::from_parts(h2(), request)
        })
        .await;
    assert_eq!(
        (status, body["reason"].clone()),
        (403, json!("ExpiredProviderToken"))
    );

    // Headers.
    let without_topic = |r: reqwest::RequestBuilder| {
        let mut request = r.build().expect("request");
        request.headers_mut().remove("apns-topic");
        reqwest::RequestBuilder::from_parts(h2(), request)
    };
    assert_eq!(
        reason(apns.post(&path, without_topic).await),
        (400, "MissingTopic".into())
    );
    let duplicated = |r: reqwest::RequestBuilder| {
        let mut request = r.build().expect("request");
        request
            .headers_mut()
            .append("apns-topic", TOPIC.parse().expect("header"));
        reqwest::RequestBuilder::from_parts(h2(), request)
    };
    assert_eq!(
        reason(apns.post(&path, duplicated).await),
        (400, "DuplicateHeaders".into())
    );
    let cases: &[(&str, &str, &str)] = &[
        ("apns-priority", "11", "BadPriority"),
        ("apns-expiration", "-1", "BadExpirationDate"),
        ("apns-id", "123", "BadMessageId"),
        ("apns-push-type", "fax", "InvalidPushType"),
    ];
    for (name, value, expected) in cases {
        let got = reason(apns.post(&path, |r| r.header(*name, *value)).await);
        assert_eq!(got, (400, (*expected).to_owned()), "{name}: {value}");
    }
    let long = "x".repeat(65);
    let got = reason(
        apns.post(&path, |r| r.header("apns-collapse-id", long.as_str()))
            .await,
    );
    assert_eq!(got, (400, "BadCollapseId".into()));
    let voip_needs_suffix = reason(
        apns.post(&path, |r| r.header("apns-push-type", "voip"))
            .await,
    );
    assert_eq!(voip_needs_suffix, (400, "InvalidPushType".into()));

    // Payloads.
    assert_eq!(
        reason(apns.post(&path, |r| r.body("")).await),
        (400, "PayloadEmpty".into())
    );
    let big = format!(r#"{{"aps":{{}},"b":"{}"}}"#, "x".repeat(4100));
    assert_eq!(
        reason(apns.post(&path, |r| r.body(big)).await),
        (413, "PayloadTooLarge".into())
    );

    let stats = apns.mock.apns.stats();
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.rejected["BadPriority"], 1);
}

#[tokio::test]
async fn apns_scripted_failures_and_latency() {
    let (apns, _key) = Apns::start().await;
    let path = format!("/3/device/{}", device());
    apns.mock.apns.inject(herald_pushmock::ApnsFailure {
        token: None,
        count: 2,
        status: 503,
        reason: "ServiceUnavailable".into(),
        retry_after: Some(9),
    });
    for _ in 0..2 {
        let response = apns
            .client
            .post(format!("{}{path}", apns.mock.apns_url()))
            .header("authorization", format!("bearer {}", apns.jwt))
            .header("apns-topic", TOPIC)
            .body("{}")
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status().as_u16(), 503);
        assert_eq!(response.headers()["retry-after"], "9");
    }
    assert_eq!(apns.post(&path, |r| r).await.0, 200);

    apns.mock
        .apns
        .set_latency(std::time::Duration::from_millis(150));
    let started = std::time::Instant::now();
    assert_eq!(apns.post(&path, |r| r).await.0, 200);
    assert!(started.elapsed() >= std::time::Duration::from_millis(150));
}

async fn oauth(mock: &PushMock, form: &[(&str, &str)]) -> (u16, Value) {
    // The token endpoint, like Google's, speaks HTTP/1.1 too.
    let response = reqwest::Client::new()
        .post(mock.token_url())
        .form(form)
        .send()
        .await
        .expect("answer");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn assertion(account: &ServiceAccount, claims: Value) -> String {
    let key = EncodingKey::from_rsa_pem(account.private_key_pem.as_bytes()).expect("key");
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).expect("sign")
}

const GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

#[tokio::test]
async fn oauth_endpoint_checks_the_assertion() {
    let mock = PushMock::start_default().await.expect("start");
    let account = mock.fcm_account("proj-a").expect("account");
    let claims = |aud: &str, scope: &str, iat: u64, exp: u64| json!({"iss": account.client_email, "aud": aud, "scope": scope, "iat": iat, "exp": exp});
    let t = now();
    let good = assertion(&account, claims(&mock.token_url(), SCOPE, t, t + 3600));
    let (status, body) = oauth(&mock, &[("grant_type", GRANT), ("assertion", &good)]).await;
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    let access = body["access_token"].as_str().expect("token").to_owned();

    let error =
        |(status, body): (u16, Value)| (status, body["error"].as_str().unwrap_or("").to_owned());
    assert_eq!(
        error(oauth(&mock, &[("grant_type", "password"), ("assertion", &good)]).await),
        (400, "unsupported_grant_type".into())
    );
    assert_eq!(
        error(oauth(&mock, &[("grant_type", GRANT)]).await),
        (400, "invalid_request".into())
    );
    let wrong_aud = assertion(
        &account,
        claims("https://oauth2.googleapis.com/token", SCOPE, t, t + 3600),
    );
    assert_eq!(
        error(oauth(&mock, &[("grant_type", GRANT), ("assertion", &wrong_aud)]).await),
        (400, "invalid_grant".into())
    );
    let too_long = assertion(&account, claims(&mock.token_url(), SCOPE, t, t + 7200));
    assert_eq!(
        error(oauth(&mock, &[("grant_type", GRANT), ("assertion", &too_long)]).await),
        (400, "invalid_grant".into())
    );
    let expired = assertion(
        &account,
        claims(&mock.token_url(), SCOPE, t - 7200, t - 3600),
    );
    assert_eq!(
        error(oauth(&mock, &[("grant_type", GRANT), ("assertion", &expired)]).await),
        (400, "invalid_grant".into())
    );
    let wrong_scope = assertion(&account, claims(&mock.token_url(), "email", t, t + 3600));
    assert_eq!(
        error(oauth(&mock, &[("grant_type", GRANT), ("assertion", &wrong_scope)]).await),
        (400, "invalid_scope".into())
    );
    let stranger = ServiceAccount::generate("proj-a", &mock.token_url()).expect("account");
    let forged = assertion(
        &stranger,
        json!({"iss": account.client_email, "aud": mock.token_url(), "scope": SCOPE, "iat": t, "exp": t + 3600}),
    );
    let (status, body) = oauth(&mock, &[("grant_type", GRANT), ("assertion", &forged)]).await;
    assert_eq!(
        (status, body["error_description"].clone()),
        (400, json!("Invalid JWT Signature."))
    );
    assert_eq!(mock.fcm.tokens_issued(), 1);

    // FCM itself, over HTTP/1.1.
    let fcm = |project: &str, token: &str, body: Value| {
        reqwest::Client::new()
            .post(format!(
                "{}/v1/projects/{project}/messages:send",
                mock.fcm_url()
            ))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let ok = fcm("proj-a", &access, json!({"message": {"topic": "news"}}))
        .await
        .expect("answer");
    assert_eq!(ok.status().as_u16(), 200);
    let name: Value = ok.json().await.expect("json");
    assert!(
        name["name"]
            .as_str()
            .expect("name")
            .starts_with("projects/proj-a/messages/")
    );

    let status_of = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body["error"]["details"]
            .as_array()
            .and_then(|d| d.iter().find_map(|d| d["errorCode"].as_str()))
            .unwrap_or("")
            .to_owned();
        (
            status,
            body["error"]["status"].as_str().unwrap_or("").to_owned(),
            code,
        )
    };
    let unauthenticated = fcm("proj-a", "nope", json!({"message": {"topic": "news"}}))
        .await
        .expect("answer");
    assert_eq!(
        status_of(unauthenticated).await,
        (401, "UNAUTHENTICATED".into(), "".into())
    );
    let other_project = fcm("proj-b", &access, json!({"message": {"topic": "news"}}))
        .await
        .expect("answer");
    assert_eq!(
        status_of(other_project).await,
        (403, "PERMISSION_DENIED".into(), "".into())
    );
    let invalid: &[Value] = &[
        json!({"message": {}}),
        json!({"message": {"topic": "a", "token": "b"}}),
        json!({"message": {"topic": "a", "data": {"n": 1}}}),
        json!({"message": {"topic": "a", "colour": "red"}}),
        json!({"msg": {"topic": "a"}}),
        json!({"message": {"topic": "no spaces"}}),
    ];
    for body in invalid {
        let response = fcm("proj-a", &access, body.clone()).await.expect("answer");
        let (status, rpc, _) = status_of(response).await;
        assert_eq!((status, rpc.as_str()), (400, "INVALID_ARGUMENT"), "{body}");
    }
    let validate_only = fcm(
        "proj-a",
        &access,
        json!({"message": {"topic": "news"}, "validate_only": true}),
    )
    .await
    .expect("answer");
    let name: Value = validate_only.json().await.expect("json");
    assert_eq!(name["name"], "projects/proj-a/messages/fake_message_id");

    mock.fcm.revoke_all_tokens();
    let revoked = fcm("proj-a", &access, json!({"message": {"topic": "news"}}))
        .await
        .expect("answer");
    assert_eq!(revoked.status().as_u16(), 401);
    let rejected: HashSet<String> = mock.fcm.stats().rejected.keys().cloned().collect();
    assert!(rejected.contains("UNAUTHENTICATED") && rejected.contains("PERMISSION_DENIED"));
}
