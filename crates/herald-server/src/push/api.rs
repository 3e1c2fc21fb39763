//! The push methods of the server API, in Centrifugo PRO's shape so that `cent` and `cent.js`
//! call them unchanged: the device registry (`device_*`, `*_topic_*`), `send_push_notification`,
//! `cancel_push`, `update_push_status` — and Herald's own `push_status` and `device_removals`.
//!
//! Owns: the typed requests and results of these methods ([`PushRequest`], [`PushReply`])
//! and their mapping to the registry and the [`PushService`](herald_outbound::push::PushService).
//! Method names, decoding and scopes are the API layer's ([`crate::api`]).
//!
//! May touch: the push runtime in the application state.

use std::collections::BTreeMap;

use herald_core::device::{
    Device, DeviceError, DeviceFilter, DeviceRegistration, DeviceTopicFilter, DeviceUpdate, Page,
    PageRequest, Platform, Provider, TopicOp, UserTopicFilter,
};
use herald_core::error::{ErrorCode, HeraldError};
use herald_core::outbound::{JobState, JobStatus, QueueError, StatusFilter};
use herald_core::time::now_ms;
use herald_outbound::push::{PushError, SendPush};
use serde::{Deserialize, Serialize};

use super::PushRuntime;
use crate::api::types::integer;
use crate::app::AppState;

pub(crate) fn device_error(error: DeviceError) -> HeraldError {
    match error {
        DeviceError::Invalid(detail) => HeraldError::bad_request(detail),
        DeviceError::NotFound(id) => HeraldError::bad_request(format!("device {id:?} not found")),
        DeviceError::Unavailable(detail) => HeraldError::unavailable(detail),
        DeviceError::Backend(detail) => HeraldError::internal(detail),
    }
}

pub(crate) fn push_error(error: PushError) -> HeraldError {
    match error {
        PushError::Invalid(detail) => HeraldError::bad_request(detail),
        PushError::Queue(error) => queue_error(error),
    }
}

fn queue_error(error: QueueError) -> HeraldError {
    match error {
        QueueError::Invalid(detail) => HeraldError::bad_request(detail),
        QueueError::Unavailable(detail) => HeraldError::unavailable(detail),
        QueueError::Backend(detail) => HeraldError::internal(detail),
    }
}

/// The push runtime, or the error that says push is off.
pub(crate) fn runtime(state: &AppState) -> Result<&PushRuntime, HeraldError> {
    state.push.as_deref().ok_or_else(not_enabled)
}

pub(crate) fn not_enabled() -> HeraldError {
    HeraldError::new(
        ErrorCode::NotAvailable,
        "push notifications are not enabled ([push] enabled = true)",
    )
}

#[derive(Debug, Serialize)]
pub struct Empty {}

// ---------------------------------------------------------------------------------------
// Wire types

/// `device_register`'s parameters (also the client's own registration).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterParams {
    #[serde(default)]
    pub id: Option<String>,
    pub provider: String,
    pub token: String,
    pub platform: String,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub app: Option<String>,
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default)]
    pub locale: Option<String>,
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub topics: Option<Vec<String>>,
}

/// Topics are names: none may be empty.
fn check_topics(topics: &[String]) -> Result<(), HeraldError> {
    if topics.iter().any(String::is_empty) {
        return Err(HeraldError::bad_request("a topic must not be empty"));
    }
    Ok(())
}

impl RegisterParams {
    pub fn registration(self) -> Result<DeviceRegistration, HeraldError> {
        check_topics(self.topics.as_deref().unwrap_or_default())?;
        let provider: Provider = self.provider.parse().map_err(device_error)?;
        let platform: Platform = self.platform.parse().map_err(device_error)?;
        if self.token.is_empty() {
            return Err(HeraldError::bad_request("token is required"));
        }
        Ok(DeviceRegistration {
            id: self.id.filter(|id| !id.is_empty()),
            provider: Some(provider),
            token: self.token,
            platform: Some(platform),
            user: self.user.unwrap_or_default(),
            app: self.app.unwrap_or_default(),
            timezone: self.timezone.unwrap_or_default(),
            locale: self.locale.unwrap_or_default(),
            topics: self.topics.unwrap_or_default(),
            meta: self.meta.unwrap_or_default(),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct RegisterResult {
    pub id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    pub user: String,
}
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimezoneUpdate {
    pub timezone: String,
}
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocaleUpdate {
    pub locale: String,
}
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaUpdate {
    pub meta: BTreeMap<String, String>,
}
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsUpdate {
    pub op: String,
    #[serde(default)]
    pub topics: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateParams {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub user_update: Option<UserUpdate>,
    #[serde(default)]
    pub timezone_update: Option<TimezoneUpdate>,
    #[serde(default)]
    pub locale_update: Option<LocaleUpdate>,
    #[serde(default)]
    pub meta_update: Option<MetaUpdate>,
    #[serde(default)]
    pub topics_update: Option<TopicsUpdate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterParams {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default)]
    pub providers: Vec<String>,
    #[serde(default)]
    pub platforms: Vec<String>,
}

fn providers(names: &[String]) -> Result<Vec<Provider>, HeraldError> {
    names
        .iter()
        .map(|p| p.parse().map_err(device_error))
        .collect()
}

fn platforms(names: &[String]) -> Result<Vec<Platform>, HeraldError> {
    names
        .iter()
        .map(|p| p.parse().map_err(device_error))
        .collect()
}

impl FilterParams {
    fn filter(self) -> Result<DeviceFilter, HeraldError> {
        Ok(DeviceFilter {
            providers: providers(&self.providers)?,
            platforms: platforms(&self.platforms)?,
            ids: self.ids,
            users: self.users,
            topics: self.topics,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default)]
    pub filter: Option<FilterParams>,
    #[serde(default)]
    pub include_total_count: bool,
    #[serde(default)]
    pub include_meta: bool,
    #[serde(default)]
    pub include_topics: bool,
    #[serde(default)]
    pub cursor: String,
    #[serde(default, deserialize_with = "integer::required")]
    pub limit: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTopicFilterParams {
    #[serde(default)]
    pub device_ids: Vec<String>,
    #[serde(default)]
    pub device_providers: Vec<String>,
    #[serde(default)]
    pub device_platforms: Vec<String>,
    #[serde(default)]
    pub device_users: Vec<String>,
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default)]
    pub topic_prefix: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTopicListParams {
    #[serde(default)]
    pub filter: Option<DeviceTopicFilterParams>,
    #[serde(default)]
    pub include_total_count: bool,
    #[serde(default)]
    pub include_device: bool,
    #[serde(default)]
    pub cursor: String,
    #[serde(default, deserialize_with = "integer::required")]
    pub limit: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserTopicFilterParams {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default)]
    pub topic_prefix: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserTopicListParams {
    #[serde(default)]
    pub filter: Option<UserTopicFilterParams>,
    #[serde(default)]
    pub include_total_count: bool,
    #[serde(default)]
    pub cursor: String,
    #[serde(default, deserialize_with = "integer::required")]
    pub limit: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTopicUpdateParams {
    pub device_id: String,
    pub op: String,
    #[serde(default)]
    pub topics: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserTopicUpdateParams {
    pub user: String,
    pub op: String,
    #[serde(default)]
    pub topics: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushStatusUpdate {
    #[serde(default, alias = "uid")]
    pub analytics_uid: String,
    pub status: String,
    #[serde(default)]
    pub device_id: String,
    /// Accepted for compatibility; the provider's message id is already recorded.
    #[serde(default)]
    pub msg_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelParams {
    pub uid: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusParams {
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub device_id: String,
    #[serde(default)]
    pub states: Vec<String>,
    #[serde(default)]
    pub cursor: String,
    #[serde(default, deserialize_with = "integer::required")]
    pub limit: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    #[serde(default)]
    pub cursor: String,
    #[serde(default, deserialize_with = "integer::required")]
    pub limit: u64,
}

/// A device on the wire (times in Unix seconds, like the rest of the API).
#[derive(Debug, Serialize)]
pub struct WireDevice {
    pub id: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub provider: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub token: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub platform: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub app: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub timezone: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub locale: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub created_at: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub updated_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl WireDevice {
    pub fn new(device: Device, meta: bool, topics: bool) -> Self {
        Self {
            id: device.id,
            provider: device.provider.as_str(),
            token: device.token,
            platform: device.platform.as_str(),
            user: device.user,
            app: device.app,
            timezone: device.timezone,
            locale: device.locale,
            created_at: device.created_at / 1000,
            updated_at: device.updated_at / 1000,
            meta: meta.then_some(device.meta),
            topics: topics.then_some(device.topics),
        }
    }

    fn id_only(id: String) -> Self {
        Self {
            id,
            provider: "",
            token: String::new(),
            platform: "",
            user: String::new(),
            app: String::new(),
            timezone: String::new(),
            locale: String::new(),
            created_at: 0,
            updated_at: 0,
            meta: None,
            topics: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ListResult<T> {
    pub items: Vec<T>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub next_cursor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_count: Option<u64>,
}

impl<T> ListResult<T> {
    pub fn from_page<U>(page: Page<U>, map: impl FnMut(U) -> T) -> Self {
        Self {
            items: page.items.into_iter().map(map).collect(),
            next_cursor: page.next_cursor,
            total_count: page.total,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct WireDeviceTopic {
    pub id: String,
    pub topic: String,
    pub device: WireDevice,
}

#[derive(Debug, Serialize)]
pub struct WireUserTopic {
    pub id: String,
    pub user: String,
    pub topic: String,
}

#[derive(Debug, Serialize)]
pub struct WireStatus {
    pub id: String,
    pub uid: String,
    pub kind: String,
    pub recipient: String,
    pub state: &'static str,
    pub attempts: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub updated_at: u64,
}

impl From<JobStatus> for WireStatus {
    fn from(status: JobStatus) -> Self {
        Self {
            id: status.id,
            uid: status.group,
            kind: status.kind,
            recipient: status.recipient,
            state: status.state.as_str(),
            attempts: status.attempts,
            reason: status.reason,
            updated_at: status.updated_at / 1000,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct WireRemoval {
    pub device: WireDevice,
    pub reason: String,
    pub removed_at: u64,
}

#[derive(Debug, Serialize)]
pub struct SendResult {
    pub uid: String,
}

fn page(cursor: String, limit: u64, include_total: bool) -> PageRequest {
    PageRequest {
        cursor,
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
        include_total,
    }
}

fn topic_op(op: &str) -> Result<TopicOp, HeraldError> {
    op.parse().map_err(device_error)
}

fn selection(ids: Vec<String>, users: Vec<String>) -> Result<DeviceFilter, HeraldError> {
    if ids.is_empty() && users.is_empty() {
        return Err(HeraldError::bad_request("ids or users is required"));
    }
    Ok(DeviceFilter {
        ids,
        users,
        ..DeviceFilter::default()
    })
}

// ---------------------------------------------------------------------------------------
// Dispatch

/// A push method's request, decoded.
#[derive(Debug)]
pub enum PushRequest {
    DeviceRegister(RegisterParams),
    DeviceUpdate(UpdateParams),
    DeviceRemove(RemoveParams),
    DeviceList(ListParams),
    DeviceTopicList(DeviceTopicListParams),
    DeviceTopicUpdate(DeviceTopicUpdateParams),
    UserTopicList(UserTopicListParams),
    UserTopicUpdate(UserTopicUpdateParams),
    // Boxed: far larger than the other requests.
    SendPushNotification(Box<SendPush>),
    CancelPush(CancelParams),
    UpdatePushStatus(PushStatusUpdate),
    PushStatus(StatusParams),
    DeviceRemovals(PageParams),
}

/// A push method's result (JSON: the object itself).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum PushReply {
    Empty(Empty),
    DeviceRegister(RegisterResult),
    DeviceList(ListResult<WireDevice>),
    DeviceTopicList(ListResult<WireDeviceTopic>),
    UserTopicList(ListResult<WireUserTopic>),
    SendPushNotification(SendResult),
    PushStatus(ListResult<WireStatus>),
    DeviceRemovals(ListResult<WireRemoval>),
}

/// Runs a push method.
pub async fn call(state: &AppState, request: PushRequest) -> Result<PushReply, HeraldError> {
    let push = runtime(state)?;
    let devices = push.service.devices();
    let now = now_ms();
    match request {
        PushRequest::DeviceRegister(params) => {
            let device = devices
                .register(params.registration()?, now)
                .await
                .map_err(device_error)?;
            Ok(PushReply::DeviceRegister(RegisterResult { id: device.id }))
        }
        PushRequest::DeviceUpdate(params) => {
            let filter = selection(params.ids, params.users)?;
            let topics = match params.topics_update {
                Some(update) => {
                    check_topics(&update.topics)?;
                    Some((topic_op(&update.op)?, update.topics))
                }
                None => None,
            };
            let update = DeviceUpdate {
                user: params.user_update.map(|u| u.user),
                timezone: params.timezone_update.map(|u| u.timezone),
                locale: params.locale_update.map(|u| u.locale),
                meta: params.meta_update.map(|u| u.meta),
                topics,
            };
            devices
                .update(&filter, &update, now)
                .await
                .map_err(device_error)?;
            Ok(PushReply::Empty(Empty {}))
        }
        PushRequest::DeviceRemove(params) => {
            let filter = selection(params.ids, params.users)?;
            devices
                .remove(&filter, "api", now)
                .await
                .map_err(device_error)?;
            Ok(PushReply::Empty(Empty {}))
        }
        PushRequest::DeviceList(params) => {
            let filter = params.filter.unwrap_or_default().filter()?;
            let found = devices
                .list(
                    &filter,
                    params.include_topics,
                    &page(params.cursor, params.limit, params.include_total_count),
                )
                .await
                .map_err(device_error)?;
            let (meta, topics) = (params.include_meta, params.include_topics);
            Ok(PushReply::DeviceList(ListResult::from_page(found, |d| {
                WireDevice::new(d, meta, topics)
            })))
        }
        PushRequest::DeviceTopicList(params) => {
            let f = params.filter.unwrap_or_default();
            let filter = DeviceTopicFilter {
                device_providers: providers(&f.device_providers)?,
                device_platforms: platforms(&f.device_platforms)?,
                device_ids: f.device_ids,
                device_users: f.device_users,
                topics: f.topics,
                topic_prefix: f.topic_prefix,
            };
            let found = devices
                .device_topics(
                    &filter,
                    &page(params.cursor, params.limit, params.include_total_count),
                )
                .await
                .map_err(device_error)?;
            let include_device = params.include_device;
            Ok(PushReply::DeviceTopicList(ListResult::from_page(
                found,
                |t| WireDeviceTopic {
                    id: t.id,
                    topic: t.topic,
                    device: if include_device {
                        WireDevice::new(t.device, true, false)
                    } else {
                        WireDevice::id_only(t.device.id)
                    },
                },
            )))
        }
        PushRequest::DeviceTopicUpdate(params) => {
            if params.device_id.is_empty() {
                return Err(HeraldError::bad_request("device_id is required"));
            }
            check_topics(&params.topics)?;
            devices
                .update_device_topics(
                    &params.device_id,
                    topic_op(&params.op)?,
                    &params.topics,
                    now,
                )
                .await
                .map_err(device_error)?;
            Ok(PushReply::Empty(Empty {}))
        }
        PushRequest::UserTopicList(params) => {
            let f = params.filter.unwrap_or_default();
            let filter = UserTopicFilter {
                users: f.users,
                topics: f.topics,
                topic_prefix: f.topic_prefix,
            };
            let found = devices
                .user_topics(
                    &filter,
                    &page(params.cursor, params.limit, params.include_total_count),
                )
                .await
                .map_err(device_error)?;
            Ok(PushReply::UserTopicList(ListResult::from_page(
                found,
                |t| WireUserTopic {
                    id: t.id,
                    user: t.user,
                    topic: t.topic,
                },
            )))
        }
        PushRequest::UserTopicUpdate(params) => {
            if params.user.is_empty() {
                return Err(HeraldError::bad_request("user is required"));
            }
            check_topics(&params.topics)?;
            devices
                .update_user_topics(&params.user, topic_op(&params.op)?, &params.topics)
                .await
                .map_err(device_error)?;
            Ok(PushReply::Empty(Empty {}))
        }
        PushRequest::SendPushNotification(request) => {
            let uid = push.service.send(*request).await.map_err(push_error)?;
            Ok(PushReply::SendPushNotification(SendResult { uid }))
        }
        PushRequest::CancelPush(params) => {
            push.service.cancel(&params.uid).await.map_err(push_error)?;
            Ok(PushReply::Empty(Empty {}))
        }
        PushRequest::UpdatePushStatus(params) => {
            push.service
                .report(&params.analytics_uid, &params.device_id, &params.status)
                .await
                .map_err(push_error)?;
            Ok(PushReply::Empty(Empty {}))
        }
        PushRequest::PushStatus(params) => {
            if params.uid.is_empty() && params.device_id.is_empty() && params.states.is_empty() {
                return Err(HeraldError::bad_request(
                    "uid, device_id or states is required",
                ));
            }
            let states = params
                .states
                .iter()
                .map(|s| s.parse::<JobState>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(queue_error)?;
            let filter = StatusFilter {
                group: params.uid,
                recipient: params.device_id,
                states,
            };
            let found = push
                .service
                .statuses(&filter, &page(params.cursor, params.limit, false))
                .await
                .map_err(push_error)?;
            Ok(PushReply::PushStatus(ListResult::from_page(
                found,
                WireStatus::from,
            )))
        }
        PushRequest::DeviceRemovals(params) => {
            let found = devices
                .removals(&page(params.cursor, params.limit, false))
                .await
                .map_err(device_error)?;
            Ok(PushReply::DeviceRemovals(ListResult::from_page(
                found,
                |r| WireRemoval {
                    device: WireDevice::new(r.device, true, true),
                    reason: r.reason,
                    removed_at: r.removed_at / 1000,
                },
            )))
        }
    }
}
