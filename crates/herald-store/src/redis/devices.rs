//! The device registry on Redis, shared by every node of a cluster: [`RedisDeviceStore`].
//!
//! Owns: the [`DeviceStore`] contract's changes (register, update, remove, topics) over the
//! keys and scripts of `device_scripts.rs`; the listings are in `device_listing.rs`.
//!
//! May touch: the first shard's Redis, through its [`Link`] (the engine's own connections).
//!
//! How a change stays correct with many nodes: the new device is computed here, with the
//! same rules as every backend (`apply_topic_op`, what a registration keeps), and written
//! by one script that moves every index entry and checks the version it was read at. A
//! device changed in between is read again and the change recomputed (optimistic
//! concurrency), so two nodes never lose each other's change, and the token index is checked
//! inside the script, so two nodes registering one token make one device. A change of many
//! devices (`update`, `remove` by filter) is atomic per device, not as a whole.
//!
//! Like the queue, the registry keeps every key on one Redis (the first shard, one hash
//! tag): it does not shard, so its size is what one Redis holds (about 1 KB per device).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::device::{
    Device, DeviceError, DeviceFilter, DeviceRegistration, DeviceRemoval, DeviceStore, DeviceTopic,
    DeviceTopicFilter, DeviceUpdate, Page, PageRequest, Provider, TopicOp, UserTopic,
    UserTopicFilter, apply_topic_op, registered_device,
};
use herald_core::store::StoreError;
use redis::{FromRedisValue, ScriptInvocation};

use super::conn::Link;
use super::device_scripts::{LOAD, PRUNE, REMOVE, SAVE, USER_TOPICS};

/// How often a change is recomputed after other nodes changed the device in between,
/// before it gives up (with [`back_off`] between tries: many nodes registering one token at
/// once all get through).
const MAX_TRIES: usize = 64;
/// Devices one prune script removes before it returns.
const PRUNE_CHUNK: usize = 500;

/// The device registry of a cluster, in Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisDeviceStore {
    pub(super) link: Arc<Link>,
    pub(super) base: String,
}

impl std::fmt::Debug for RedisDeviceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDeviceStore")
            .field("redis", &self.link.name())
            .field("base", &self.base)
            .finish()
    }
}

/// A device as read, with the version a save must name.
#[derive(Clone, Debug)]
pub(super) struct Stored {
    pub device: Device,
    pub version: u64,
}

enum Saved {
    Ok,
    /// The device changed since it was read.
    Conflict,
    /// Another device holds the token.
    Taken(String),
}

enum Removal {
    Done(Box<Device>),
    /// No such device (or it was updated after the bound).
    Kept,
    Conflict,
}

/// A connection problem is `Unavailable`; anything else is a backend error.
pub(super) fn device_error(error: StoreError) -> DeviceError {
    match error {
        StoreError::Unavailable(message) => DeviceError::Unavailable(message),
        StoreError::Backend(message) | StoreError::UnrecoverablePosition(message) => {
            DeviceError::Backend(message)
        }
    }
}

pub(super) fn malformed(detail: impl std::fmt::Display) -> DeviceError {
    DeviceError::Backend(format!("unexpected reply from redis: {detail}"))
}

/// A device from its stored JSON and version.
pub(super) fn decode(json: &str, version: &str) -> Result<Stored, DeviceError> {
    let device = serde_json::from_str(json).map_err(|e| malformed(format!("a device: {e}")))?;
    let version = version
        .parse()
        .map_err(|_| malformed(format!("device version {version:?}")))?;
    Ok(Stored { device, version })
}

/// Waits a little before recomputing a change another node beat: a random pause that grows
/// with the tries, so nodes changing one device do not collide again in lock step.
async fn back_off(tries: usize) {
    use std::hash::{BuildHasher, Hasher};
    // Each `RandomState` has new keys: a random number without a dependency.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let ceiling_us = 100u64 << tries.min(7);
    tokio::time::sleep(Duration::from_micros(random % ceiling_us)).await;
}

fn too_busy(id: &str) -> DeviceError {
    DeviceError::Backend(format!(
        "device {id:?} kept changing under {MAX_TRIES} attempts to change it"
    ))
}

impl RedisDeviceStore {
    /// The registry under `base` (see `Keys::push`) on the Redis behind `link`.
    pub(crate) fn new(link: Arc<Link>, base: String) -> Self {
        Self { link, base }
    }

    pub(super) async fn run<T: FromRedisValue + Send>(
        &self,
        invocation: ScriptInvocation<'static>,
    ) -> Result<T, DeviceError> {
        self.link
            .run(|mut connection| async move { invocation.invoke_async(&mut connection).await })
            .await
            .map_err(device_error)
    }

    pub(super) async fn load(&self, id: &str) -> Result<Option<Stored>, DeviceError> {
        self.load_by(id, None).await
    }

    async fn load_by(
        &self,
        id: &str,
        token: Option<(Provider, &str)>,
    ) -> Result<Option<Stored>, DeviceError> {
        let (provider, token) = token.map_or(("", ""), |(p, t)| (p.as_str(), t));
        let mut invocation = LOAD.key(&self.base);
        invocation.arg(id).arg(provider).arg(token);
        let reply: Vec<String> = self.run(invocation).await?;
        match reply.as_slice() {
            [] => Ok(None),
            [json, version] => decode(json, version).map(Some),
            _ => Err(malformed("a device that is not JSON and a version")),
        }
    }

    async fn save(&self, device: &Device, version: u64) -> Result<Saved, DeviceError> {
        let json = serde_json::to_string(device)
            .map_err(|e| DeviceError::Backend(format!("encode a device: {e}")))?;
        let mut invocation = SAVE.key(&self.base);
        invocation
            .arg(&device.id)
            .arg(version)
            .arg(json)
            .arg(device.provider.as_str())
            .arg(&device.token)
            .arg(&device.user)
            .arg(device.updated_at);
        for topic in &device.topics {
            invocation.arg(topic);
        }
        let reply: Vec<String> = self.run(invocation).await?;
        match reply.as_slice() {
            [ok] if ok == "ok" => Ok(Saved::Ok),
            [conflict] if conflict == "conflict" => Ok(Saved::Conflict),
            [taken, holder] if taken == "taken" => Ok(Saved::Taken(holder.clone())),
            other => Err(malformed(format!("save answered {other:?}"))),
        }
    }

    /// Removes a device by id (or, with an empty id, by token) if it is still at `version`
    /// (`None`: any) and was not updated after `unless_updated_after`.
    async fn remove_one(
        &self,
        id: &str,
        token: Option<(Provider, &str)>,
        version: Option<u64>,
        unless_updated_after: Option<u64>,
        reason: &str,
        now: u64,
    ) -> Result<Removal, DeviceError> {
        let (provider, token) = token.map_or(("", ""), |(p, t)| (p.as_str(), t));
        let mut invocation = REMOVE.key(&self.base);
        invocation
            .arg(id)
            .arg(provider)
            .arg(token)
            .arg(version.map(|v| v.to_string()).unwrap_or_default())
            .arg(
                unless_updated_after
                    .map(|at| at.to_string())
                    .unwrap_or_default(),
            )
            .arg(reason)
            .arg(now);
        let reply: Vec<String> = self.run(invocation).await?;
        match reply.as_slice() {
            [removed, json] if removed == "removed" => {
                let device = serde_json::from_str(json)
                    .map_err(|e| malformed(format!("a removed device: {e}")))?;
                Ok(Removal::Done(Box::new(device)))
            }
            [kept] if kept == "kept" => Ok(Removal::Kept),
            [conflict] if conflict == "conflict" => Ok(Removal::Conflict),
            other => Err(malformed(format!("remove answered {other:?}"))),
        }
    }

    /// The device `id` as it is now, if it still matches `filter`.
    async fn still_matching(
        &self,
        id: &str,
        filter: &DeviceFilter,
    ) -> Result<Option<Stored>, DeviceError> {
        let Some(stored) = self.load(id).await? else {
            return Ok(None);
        };
        Ok(self
            .matches(filter, &stored.device)
            .await?
            .then_some(stored))
    }
}

#[async_trait]
impl DeviceStore for RedisDeviceStore {
    async fn register(
        &self,
        registration: DeviceRegistration,
        now: u64,
    ) -> Result<Device, DeviceError> {
        for tries in 0..MAX_TRIES {
            if tries > 0 {
                back_off(tries).await;
            }
            let known = match &registration.id {
                Some(id) => Some(
                    self.load(id)
                        .await?
                        .ok_or_else(|| DeviceError::NotFound(id.clone()))?,
                ),
                None => {
                    let provider = registration.provider.ok_or_else(|| {
                        DeviceError::Invalid("a new device needs a provider".to_owned())
                    })?;
                    if registration.token.is_empty() {
                        return Err(DeviceError::Invalid(
                            "a new device needs a token".to_owned(),
                        ));
                    }
                    self.load_by("", Some((provider, &registration.token)))
                        .await?
                }
            };
            let device = registered_device(known.as_ref().map(|s| &s.device), &registration, now)?;
            let version = known.as_ref().map_or(0, |s| s.version);
            match self.save(&device, version).await? {
                Saved::Ok => return Ok(device),
                Saved::Taken(holder) if registration.id.is_some() => {
                    return Err(DeviceError::Invalid(format!(
                        "the token is registered to another device ({holder})"
                    )));
                }
                // Without an id, the token's holder is the device to update: another node
                // registered or moved the token since it was looked up; look again.
                Saved::Taken(_) | Saved::Conflict => {}
            }
        }
        Err(too_busy(registration.id.as_deref().unwrap_or("(new)")))
    }

    async fn update(
        &self,
        filter: &DeviceFilter,
        update: &DeviceUpdate,
        now: u64,
    ) -> Result<u64, DeviceError> {
        filter.require_selection()?;
        let mut changed = 0;
        for found in self.matching(filter).await? {
            let mut current = Some(found);
            let mut tries = 0;
            while let Some(stored) = current.take() {
                tries += 1;
                if tries > MAX_TRIES {
                    return Err(too_busy(&stored.device.id));
                }
                if tries > 1 {
                    back_off(tries).await;
                }
                let id = stored.device.id.clone();
                match self
                    .save(&update.applied_to(stored.device, now), stored.version)
                    .await?
                {
                    Saved::Ok => changed += 1,
                    Saved::Conflict => current = self.still_matching(&id, filter).await?,
                    Saved::Taken(holder) => {
                        return Err(DeviceError::Backend(format!(
                            "device {id:?}: its token is indexed to {holder:?}"
                        )));
                    }
                }
            }
        }
        Ok(changed)
    }

    async fn remove(
        &self,
        filter: &DeviceFilter,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Device>, DeviceError> {
        filter.require_selection()?;
        let mut removed = Vec::new();
        for found in self.matching(filter).await? {
            let mut current = Some(found);
            let mut tries = 0;
            while let Some(stored) = current.take() {
                tries += 1;
                if tries > MAX_TRIES {
                    return Err(too_busy(&stored.device.id));
                }
                if tries > 1 {
                    back_off(tries).await;
                }
                let id = &stored.device.id;
                match self
                    .remove_one(id, None, Some(stored.version), None, reason, now)
                    .await?
                {
                    Removal::Done(device) => removed.push(*device),
                    Removal::Kept => {}
                    Removal::Conflict => current = self.still_matching(id, filter).await?,
                }
            }
        }
        Ok(removed)
    }

    async fn remove_token(
        &self,
        provider: Provider,
        token: &str,
        reason: &str,
        unless_updated_after: Option<u64>,
        now: u64,
    ) -> Result<Option<Device>, DeviceError> {
        match self
            .remove_one(
                "",
                Some((provider, token)),
                None,
                unless_updated_after,
                reason,
                now,
            )
            .await?
        {
            Removal::Done(device) => Ok(Some(*device)),
            Removal::Kept | Removal::Conflict => Ok(None),
        }
    }

    async fn prune(&self, before: u64, now: u64) -> Result<u64, DeviceError> {
        let mut pruned = 0;
        loop {
            let mut invocation = PRUNE.key(&self.base);
            invocation.arg(before).arg(PRUNE_CHUNK).arg(now);
            let removed: u64 = self.run(invocation).await?;
            pruned += removed;
            if removed < PRUNE_CHUNK as u64 {
                return Ok(pruned);
            }
        }
    }

    async fn list(
        &self,
        filter: &DeviceFilter,
        include_user_topics: bool,
        page: &PageRequest,
    ) -> Result<Page<Device>, DeviceError> {
        self.list_page(filter, include_user_topics, page).await
    }

    async fn device_topics(
        &self,
        filter: &DeviceTopicFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceTopic>, DeviceError> {
        self.device_topic_page(filter, page).await
    }

    async fn update_device_topics(
        &self,
        device_id: &str,
        op: TopicOp,
        topics: &[String],
        now: u64,
    ) -> Result<(), DeviceError> {
        for tries in 0..MAX_TRIES {
            if tries > 0 {
                back_off(tries).await;
            }
            let Stored {
                mut device,
                version,
            } = self
                .load(device_id)
                .await?
                .ok_or_else(|| DeviceError::NotFound(device_id.to_owned()))?;
            apply_topic_op(&mut device.topics, op, topics);
            device.updated_at = now;
            match self.save(&device, version).await? {
                Saved::Ok => return Ok(()),
                Saved::Conflict => {}
                Saved::Taken(holder) => {
                    return Err(DeviceError::Backend(format!(
                        "device {device_id:?}: its token is indexed to {holder:?}"
                    )));
                }
            }
        }
        Err(too_busy(device_id))
    }

    async fn user_topics(
        &self,
        filter: &UserTopicFilter,
        page: &PageRequest,
    ) -> Result<Page<UserTopic>, DeviceError> {
        self.user_topic_page(filter, page).await
    }

    async fn update_user_topics(
        &self,
        user: &str,
        op: TopicOp,
        topics: &[String],
    ) -> Result<(), DeviceError> {
        if user.is_empty() {
            return Err(DeviceError::Invalid(
                "user topics need a user: anonymous devices share no topics".to_owned(),
            ));
        }
        let op = match op {
            TopicOp::Add => "add",
            TopicOp::Remove => "remove",
            TopicOp::Set => "set",
        };
        let mut invocation = USER_TOPICS.key(&self.base);
        invocation.arg(user).arg(op);
        for topic in topics {
            invocation.arg(topic);
        }
        self.run::<()>(invocation).await
    }

    async fn removals(&self, page: &PageRequest) -> Result<Page<DeviceRemoval>, DeviceError> {
        self.removal_page(page).await
    }
}
