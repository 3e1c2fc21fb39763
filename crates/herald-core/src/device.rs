//! The device registry port: push targets (FCM, APNs and Web Push tokens, email addresses),
//! their topics, users' topics, and the record of removed devices.
//!
//! Owns the device model and the [`DeviceStore`] contract; backends (memory in
//! [`crate::memory_devices`], SQLite and Redis in `herald-store`) implement it and pass
//! [`crate::conformance::run_device_suite`].
//!
//! Contract every backend keeps:
//! - one device per `(provider, token)`: registering a known token again updates that device
//!   (and keeps its id) instead of adding a second;
//! - registering with an `id` updates that device; an unknown `id` is [`DeviceError::NotFound`];
//! - a device's topics are its own topics plus its user's topics (`user_topic_update`), the
//!   latter attached and detached as the device's user changes, without copying them;
//! - filters are AND across fields and OR within a field; an empty field does not filter;
//! - lists are ordered by id and paged by an opaque cursor (the last id of the previous page);
//! - every removal is recorded with its reason and is listed by [`DeviceStore::removals`].
//!
//! Times are milliseconds since the Unix epoch.
//!
//! May touch: nothing outside the process.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Who delivers to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Fcm,
    Apns,
    Webpush,
    Email,
}

impl Provider {
    pub const ALL: [Provider; 4] = [
        Provider::Fcm,
        Provider::Apns,
        Provider::Webpush,
        Provider::Email,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Fcm => "fcm",
            Provider::Apns => "apns",
            Provider::Webpush => "webpush",
            Provider::Email => "email",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                DeviceError::Invalid(format!(
                    "unknown provider {s:?}: expected fcm, apns, webpush or email"
                ))
            })
    }
}

/// What the device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Ios,
    Android,
    Web,
    Other,
}

impl Platform {
    pub const ALL: [Platform; 4] = [
        Platform::Ios,
        Platform::Android,
        Platform::Web,
        Platform::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Ios => "ios",
            Platform::Android => "android",
            Platform::Web => "web",
            Platform::Other => "other",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Platform {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                DeviceError::Invalid(format!(
                    "unknown platform {s:?}: expected ios, android, web or other"
                ))
            })
    }
}

/// A registered push target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub provider: Provider,
    /// The provider's token; for Web Push the browser's `PushSubscription` JSON; for email
    /// the address.
    pub token: String,
    pub platform: Platform,
    /// Empty: no user.
    pub user: String,
    /// Which of the server's apps the token belongs to (chooses the credentials: APNs topic,
    /// FCM project, VAPID key set); empty is the default app.
    pub app: String,
    /// IANA time zone name (`Europe/Berlin`), empty when unknown.
    pub timezone: String,
    pub locale: String,
    /// The device's own topics, sorted, without duplicates (its user's topics are not in
    /// here; [`DeviceStore::list`] with `include_topics` returns both).
    pub topics: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub created_at: u64,
    pub updated_at: u64,
}

/// `device_register`: a new device, or an update of a known one (by `id`, else by
/// `(provider, token)`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceRegistration {
    /// The id to update; `None` registers (or finds by token).
    pub id: Option<String>,
    pub provider: Option<Provider>,
    pub token: String,
    pub platform: Option<Platform>,
    pub user: String,
    pub app: String,
    pub timezone: String,
    pub locale: String,
    /// Replaces the device's own topics.
    pub topics: Vec<String>,
    pub meta: BTreeMap<String, String>,
}

/// How a topic list changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicOp {
    Add,
    Remove,
    Set,
}

impl FromStr for TopicOp {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "add" => Ok(TopicOp::Add),
            "remove" => Ok(TopicOp::Remove),
            "set" => Ok(TopicOp::Set),
            other => Err(DeviceError::Invalid(format!(
                "unknown op {other:?}: expected add, remove or set"
            ))),
        }
    }
}

/// Applies `op` with `topics` to a sorted, deduplicated list (the one rule every backend uses).
pub fn apply_topic_op(current: &mut Vec<String>, op: TopicOp, topics: &[String]) {
    match op {
        TopicOp::Set => {
            current.clear();
            current.extend(topics.iter().cloned());
        }
        TopicOp::Add => current.extend(topics.iter().cloned()),
        TopicOp::Remove => current.retain(|t| !topics.contains(t)),
    }
    current.sort();
    current.dedup();
}

/// A topic list as stored: sorted, without duplicates.
pub fn normalised_topics(topics: &[String]) -> Vec<String> {
    let mut own = Vec::new();
    apply_topic_op(&mut own, TopicOp::Set, topics);
    own
}

/// The device `registration` makes of `known` (the device it updates) or of nothing (a new
/// device, with a fresh id): the one rule every backend keeps. The token's uniqueness is the
/// backend's to check.
pub fn registered_device(
    known: Option<&Device>,
    registration: &DeviceRegistration,
    now: u64,
) -> Result<Device, DeviceError> {
    let Some(current) = known else {
        let provider = registration
            .provider
            .ok_or_else(|| DeviceError::Invalid("a new device needs a provider".to_owned()))?;
        let platform = registration
            .platform
            .ok_or_else(|| DeviceError::Invalid("a new device needs a platform".to_owned()))?;
        if registration.token.is_empty() {
            return Err(DeviceError::Invalid(
                "a new device needs a token".to_owned(),
            ));
        }
        return Ok(Device {
            id: new_device_id(),
            provider,
            token: registration.token.clone(),
            platform,
            user: registration.user.clone(),
            app: registration.app.clone(),
            timezone: registration.timezone.clone(),
            locale: registration.locale.clone(),
            topics: normalised_topics(&registration.topics),
            meta: registration.meta.clone(),
            created_at: now,
            updated_at: now,
        });
    };
    Ok(Device {
        id: current.id.clone(),
        provider: registration.provider.unwrap_or(current.provider),
        token: if registration.token.is_empty() {
            current.token.clone()
        } else {
            registration.token.clone()
        },
        platform: registration.platform.unwrap_or(current.platform),
        user: registration.user.clone(),
        app: registration.app.clone(),
        timezone: registration.timezone.clone(),
        locale: registration.locale.clone(),
        topics: normalised_topics(&registration.topics),
        meta: registration.meta.clone(),
        created_at: current.created_at,
        updated_at: now,
    })
}

/// `device_update`: what changes; `None` leaves a field alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceUpdate {
    pub user: Option<String>,
    pub timezone: Option<String>,
    pub locale: Option<String>,
    /// Replaces the meta map.
    pub meta: Option<BTreeMap<String, String>>,
    pub topics: Option<(TopicOp, Vec<String>)>,
}

/// Which devices: AND across fields, OR within one; an empty field does not filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    pub ids: Vec<String>,
    pub users: Vec<String>,
    /// Matches a device's own topics and its user's topics.
    pub topics: Vec<String>,
    pub providers: Vec<Provider>,
    pub platforms: Vec<Platform>,
}

impl DeviceUpdate {
    /// `device` with these changes, updated at `now`.
    pub fn applied_to(&self, mut device: Device, now: u64) -> Device {
        if let Some(user) = &self.user {
            device.user.clone_from(user);
        }
        if let Some(timezone) = &self.timezone {
            device.timezone.clone_from(timezone);
        }
        if let Some(locale) = &self.locale {
            device.locale.clone_from(locale);
        }
        if let Some(meta) = &self.meta {
            device.meta.clone_from(meta);
        }
        if let Some((op, topics)) = &self.topics {
            apply_topic_op(&mut device.topics, *op, topics);
        }
        device.updated_at = now;
        device
    }
}

impl DeviceFilter {
    /// Changing or removing "every device" needs a filter: an empty one is refused.
    pub fn require_selection(&self) -> Result<(), DeviceError> {
        if self.is_empty() {
            return Err(DeviceError::Invalid(
                "a filter is required: an empty one would match every device".to_owned(),
            ));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.users.is_empty()
            && self.topics.is_empty()
            && self.providers.is_empty()
            && self.platforms.is_empty()
    }

    /// Whether `device` (whose topics, own and its user's, are `topics`) matches.
    pub fn matches(&self, device: &Device, topics: &[String]) -> bool {
        (self.ids.is_empty() || self.ids.contains(&device.id))
            && (self.users.is_empty() || self.users.contains(&device.user))
            && (self.providers.is_empty() || self.providers.contains(&device.provider))
            && (self.platforms.is_empty() || self.platforms.contains(&device.platform))
            && (self.topics.is_empty() || self.topics.iter().any(|t| topics.contains(t)))
    }
}

/// `device_topic_list`: which device–topic pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceTopicFilter {
    pub device_ids: Vec<String>,
    pub device_users: Vec<String>,
    pub device_providers: Vec<Provider>,
    pub device_platforms: Vec<Platform>,
    pub topics: Vec<String>,
    pub topic_prefix: String,
}

impl DeviceTopicFilter {
    pub fn matches(&self, device: &Device, topic: &str) -> bool {
        (self.device_ids.is_empty() || self.device_ids.contains(&device.id))
            && (self.device_users.is_empty() || self.device_users.contains(&device.user))
            && (self.device_providers.is_empty()
                || self.device_providers.contains(&device.provider))
            && (self.device_platforms.is_empty()
                || self.device_platforms.contains(&device.platform))
            && (self.topics.is_empty() || self.topics.iter().any(|t| t == topic))
            && topic.starts_with(&self.topic_prefix)
    }
}

/// `user_topic_list`: which user–topic pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserTopicFilter {
    pub users: Vec<String>,
    pub topics: Vec<String>,
    pub topic_prefix: String,
}

impl UserTopicFilter {
    pub fn matches(&self, user: &str, topic: &str) -> bool {
        (self.users.is_empty() || self.users.iter().any(|u| u == user))
            && (self.topics.is_empty() || self.topics.iter().any(|t| t == topic))
            && topic.starts_with(&self.topic_prefix)
    }
}

/// One page of a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// The `next_cursor` of the previous page; empty for the first.
    pub cursor: String,
    /// At most this many items (backends cap it at [`MAX_PAGE`]; 0 means [`DEFAULT_PAGE`]).
    pub limit: usize,
    /// Also count every match (costs a scan on some backends).
    pub include_total: bool,
}

impl PageRequest {
    /// The limit to apply.
    pub fn effective_limit(&self) -> usize {
        match self.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        }
    }
}

pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

/// Items of one page and the cursor of the next (empty when this was the last).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: String,
    pub total: Option<u64>,
}

/// The id of a new device: a random (v4) UUID, the same kind from every backend. It holds
/// no `:`, so a device–topic pair's id (`<device id>:<topic>`) splits at its first `:`.
pub fn new_device_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The cursor that continues a listing ordered by the pair `(first, second)` after that pair
/// (device topics: device id and topic; user topics: user and topic). The item ids
/// (`<first>:<second>`) cannot serve: users and topics may both hold `:`. The length prefix
/// makes the cursor unambiguous; callers treat it as opaque.
pub fn pair_cursor(first: &str, second: &str) -> String {
    format!("{}:{first}{second}", first.len())
}

/// The pair a [`pair_cursor`] encodes; `None` for the empty cursor (the first page).
pub fn parse_pair_cursor(cursor: &str) -> Result<Option<(&str, &str)>, DeviceError> {
    if cursor.is_empty() {
        return Ok(None);
    }
    let invalid = || DeviceError::Invalid(format!("invalid cursor {cursor:?}"));
    let (len, rest) = cursor.split_once(':').ok_or_else(invalid)?;
    let len: usize = len.parse().map_err(|_| invalid())?;
    match (rest.get(..len), rest.get(len..)) {
        (Some(first), Some(second)) => Ok(Some((first, second))),
        _ => Err(invalid()),
    }
}

/// A device's topics as [`DeviceStore::device_topics`] lists them: its own and its user's,
/// sorted, each once, `true` where the topic comes from the user only (an own topic wins).
pub fn merged_topics(own: &[String], user: &[String]) -> Vec<(String, bool)> {
    let mut merged: Vec<(String, bool)> = own
        .iter()
        .map(|t| (t.clone(), false))
        .chain(user.iter().map(|t| (t.clone(), true)))
        .collect();
    // `false` sorts first, so dedup keeps the own entry of a topic both have.
    merged.sort();
    merged.dedup_by(|later, earlier| later.0 == earlier.0);
    merged
}

/// A device and one of its topics. The id is `<device id>:<topic>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTopic {
    pub id: String,
    pub topic: String,
    /// True when the topic comes from the device's user rather than the device itself.
    pub from_user: bool,
    pub device: Device,
}

/// A user and one of their topics. The id is `<user>:<topic>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserTopic {
    pub id: String,
    pub user: String,
    pub topic: String,
}

/// A removed device and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRemoval {
    pub device: Device,
    /// `api`, `unregistered` (the provider said the token is dead), `inactive` (pruned),
    /// or a provider's error code (`BadDeviceToken`, `SENDER_ID_MISMATCH`, …).
    pub reason: String,
    pub removed_at: u64,
}

/// Why a registry call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}")]
    Invalid(String),
    #[error("device {0:?} not found")]
    NotFound(String),
    #[error("device store unavailable: {0}")]
    Unavailable(String),
    #[error("device store error: {0}")]
    Backend(String),
}

/// The registry. Backends keep the contract in the module header.
#[async_trait]
pub trait DeviceStore: Send + Sync + 'static {
    /// Registers or updates a device; returns it as stored. `now` sets `updated_at` (and
    /// `created_at` of a new device). A new device needs a provider, a token and a platform;
    /// an update keeps the ones the registration leaves out (`None`, an empty token) and
    /// replaces every other field. Moving a device to a token another device holds is
    /// [`DeviceError::Invalid`].
    async fn register(
        &self,
        registration: DeviceRegistration,
        now: u64,
    ) -> Result<Device, DeviceError>;

    /// Updates every device matching `filter` (which must not be empty); returns how many.
    async fn update(
        &self,
        filter: &DeviceFilter,
        update: &DeviceUpdate,
        now: u64,
    ) -> Result<u64, DeviceError>;

    /// Removes every device matching `filter` (which must not be empty) and records why;
    /// returns the removed devices.
    async fn remove(
        &self,
        filter: &DeviceFilter,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Device>, DeviceError>;

    /// Removes the device holding `token` at `provider` — token hygiene after a provider said
    /// the token is dead — unless it was updated after `unless_updated_after` (APNs: the
    /// app registered the token again after the time Apple says it became invalid).
    /// Returns the removed device.
    async fn remove_token(
        &self,
        provider: Provider,
        token: &str,
        reason: &str,
        unless_updated_after: Option<u64>,
        now: u64,
    ) -> Result<Option<Device>, DeviceError>;

    /// Removes devices not updated since `before` (reason `inactive`); returns how many.
    async fn prune(&self, before: u64, now: u64) -> Result<u64, DeviceError>;

    /// Devices matching `filter`, by id. Each device's `topics` holds its own topics, and
    /// with `include_user_topics` its user's topics too (sorted, deduplicated).
    async fn list(
        &self,
        filter: &DeviceFilter,
        include_user_topics: bool,
        page: &PageRequest,
    ) -> Result<Page<Device>, DeviceError>;

    /// Device–topic pairs (own and the user's), ordered by device id, then topic.
    async fn device_topics(
        &self,
        filter: &DeviceTopicFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceTopic>, DeviceError>;

    /// Changes a device's own topics; an unknown device is [`DeviceError::NotFound`].
    async fn update_device_topics(
        &self,
        device_id: &str,
        op: TopicOp,
        topics: &[String],
        now: u64,
    ) -> Result<(), DeviceError>;

    /// User–topic pairs, ordered by user, then topic.
    async fn user_topics(
        &self,
        filter: &UserTopicFilter,
        page: &PageRequest,
    ) -> Result<Page<UserTopic>, DeviceError>;

    /// Changes a user's topics (which every device of the user then has). An empty user is
    /// [`DeviceError::Invalid`]: anonymous devices share no topics.
    async fn update_user_topics(
        &self,
        user: &str,
        op: TopicOp,
        topics: &[String],
    ) -> Result<(), DeviceError>;

    /// Removed devices, newest first.
    async fn removals(&self, page: &PageRequest) -> Result<Page<DeviceRemoval>, DeviceError>;
}
