//! Shared set-up for the push sender tests: a running emulator and senders pointed at it.

#![allow(dead_code)] // each test binary uses a different part of it

use std::sync::Arc;
use std::time::Duration;

use herald_core::device::Provider;
use herald_core::duration::HumanDuration;
use herald_outbound::apns::{ApnsAppConfig, ApnsConfig, ApnsEnvironment};
use herald_outbound::clock::{Clock, ManualClock};
use herald_outbound::fcm::{FcmAppConfig, FcmConfig};
use herald_outbound::sender::{Destination, Target};
use herald_pushmock::{ApnsKey, PushMock, ServiceAccount};

pub const TOPIC: &str = "com.example.app";
pub const TOPIC_TWO: &str = "com.example.two";

pub async fn mock() -> PushMock {
    PushMock::start_default()
        .await
        .expect("start the emulators")
}

/// A well-formed device token (64 hex digits) made from `n`.
pub fn device(n: u32) -> String {
    format!("{n:064x}")
}

pub fn apns_target(app: &str, token: &str) -> Target {
    Target {
        provider: Provider::Apns,
        app: app.to_owned(),
        to: Destination::Token(token.to_owned()),
    }
}

pub fn fcm_target(app: &str, to: Destination) -> Target {
    Target {
        provider: Provider::Fcm,
        app: app.to_owned(),
        to,
    }
}

/// An FCM-looking registration token.
pub fn fcm_token(n: u32) -> String {
    format!("d{n:04}:APA91b{}", "x".repeat(140))
}

pub fn apns_app(mock: &PushMock, app: &str, key: &ApnsKey, topic: &str) -> ApnsAppConfig {
    ApnsAppConfig {
        app: app.to_owned(),
        key_file: None,
        key_pem: Some(key.private_key_pem.clone()),
        key_id: key.key_id.clone(),
        team_id: key.team_id.clone(),
        topic: topic.to_owned(),
        environment: ApnsEnvironment::Sandbox,
        base_url: Some(mock.apns_url()),
        request_timeout: HumanDuration::from_secs(5),
    }
}

/// One default app (`""`) with a fresh key accepted for [`TOPIC`].
pub fn apns_config(mock: &PushMock) -> ApnsConfig {
    let key = mock
        .apns_key("KEY0000001", "TEAM000001", &[TOPIC])
        .expect("APNs key");
    ApnsConfig {
        apps: vec![apns_app(mock, "", &key, TOPIC)],
    }
}

pub fn fcm_app(mock: &PushMock, app: &str, account: &ServiceAccount) -> FcmAppConfig {
    FcmAppConfig {
        app: app.to_owned(),
        credentials_file: None,
        credentials_json: Some(account.to_json().to_string()),
        base_url: mock.fcm_url(),
        request_timeout: HumanDuration::from_secs(5),
    }
}

/// One default app (`""`) of project `proj-a`.
pub fn fcm_config(mock: &PushMock) -> FcmConfig {
    let account = mock.fcm_account("proj-a").expect("service account");
    FcmConfig {
        apps: vec![fcm_app(mock, "", &account)],
    }
}

/// A manual clock for the sender, and a way to move it and the emulators' together.
pub struct Clocks {
    pub sender: ManualClock,
}

impl Clocks {
    pub fn new() -> Self {
        Self {
            sender: ManualClock::new(),
        }
    }

    pub fn shared(&self) -> Arc<dyn Clock> {
        Arc::new(self.sender.clone())
    }

    pub fn advance(&self, mock: &PushMock, by: Duration) {
        self.sender.advance(by);
        mock.advance_clock(by);
    }
}
