//! The in-memory device registry: [`MemoryDeviceStore`], for a single ephemeral node
//! (`--memory`) and for tests. Everything is lost on restart.
//!
//! Owns: the devices, the token index that keeps one device per `(provider, token)`, users'
//! topics and the removal record, all behind one mutex (every call is short and none awaits
//! while holding it). Also [`paged`], the page cutting the memory backends share.
//!
//! May touch: nothing outside the process.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::device::{
    Device, DeviceError, DeviceFilter, DeviceRegistration, DeviceRemoval, DeviceStore, DeviceTopic,
    DeviceTopicFilter, DeviceUpdate, Page, PageRequest, Provider, TopicOp, UserTopic,
    UserTopicFilter, apply_topic_op, merged_topics, pair_cursor, parse_pair_cursor,
    registered_device,
};

/// One page of `items` (already past the cursor, in listing order): at most `limit`, and the
/// cursor of the last one when more follow (empty at the end).
pub(crate) fn paged<T>(
    mut items: impl Iterator<Item = T>,
    limit: usize,
    cursor_of: impl Fn(&T) -> String,
    total: Option<u64>,
) -> Page<T> {
    let page: Vec<T> = items.by_ref().take(limit).collect();
    // Looking one item ahead is what keeps `next_cursor` empty on the last page.
    let next_cursor = match (items.next(), page.last()) {
        (Some(_), Some(last)) => cursor_of(last),
        _ => String::new(),
    };
    Page {
        items: page,
        next_cursor,
        total,
    }
}

#[derive(Default)]
struct State {
    /// By id; each device's `topics` are its own.
    devices: BTreeMap<String, Device>,
    tokens: HashMap<(Provider, String), String>,
    /// Sorted, deduplicated; a user without topics has no entry.
    user_topics: BTreeMap<String, Vec<String>>,
    /// By sequence number (the order removals were recorded).
    removals: BTreeMap<u64, DeviceRemoval>,
    next_removal: u64,
}

impl State {
    fn topics_of_user(&self, user: &str) -> &[String] {
        if user.is_empty() {
            return &[];
        }
        self.user_topics.get(user).map_or(&[], Vec::as_slice)
    }

    /// Own and user's topics, sorted, deduplicated.
    fn all_topics(&self, device: &Device) -> Vec<String> {
        merged_topics(&device.topics, self.topics_of_user(&device.user))
            .into_iter()
            .map(|(topic, _)| topic)
            .collect()
    }

    fn matches(&self, filter: &DeviceFilter, device: &Device) -> bool {
        filter.matches(device, &self.all_topics(device))
    }

    fn matching_ids(&self, filter: &DeviceFilter) -> Vec<String> {
        self.devices
            .values()
            .filter(|d| self.matches(filter, d))
            .map(|d| d.id.clone())
            .collect()
    }

    fn remove_device(&mut self, id: &str, reason: &str, now: u64) -> Option<Device> {
        let device = self.devices.remove(id)?;
        self.tokens.remove(&(device.provider, device.token.clone()));
        self.next_removal += 1;
        self.removals.insert(
            self.next_removal,
            DeviceRemoval {
                device: device.clone(),
                reason: reason.to_owned(),
                removed_at: now,
            },
        );
        Some(device)
    }
}

/// The device registry kept in process memory.
#[derive(Default)]
pub struct MemoryDeviceStore {
    state: Mutex<State>,
}

impl std::fmt::Debug for MemoryDeviceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDeviceStore")
            .field("devices", &self.state.lock().devices.len())
            .finish()
    }
}

impl MemoryDeviceStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl DeviceStore for MemoryDeviceStore {
    async fn register(
        &self,
        registration: DeviceRegistration,
        now: u64,
    ) -> Result<Device, DeviceError> {
        let mut state = self.state.lock();
        let known = match &registration.id {
            Some(id) => match state.devices.get(id) {
                Some(device) => Some(device.clone()),
                None => return Err(DeviceError::NotFound(id.clone())),
            },
            None => {
                let provider = registration.provider.ok_or_else(|| {
                    DeviceError::Invalid("a new device needs a provider".to_owned())
                })?;
                if registration.token.is_empty() {
                    return Err(DeviceError::Invalid(
                        "a new device needs a token".to_owned(),
                    ));
                }
                state
                    .tokens
                    .get(&(provider, registration.token.clone()))
                    .and_then(|id| state.devices.get(id))
                    .cloned()
            }
        };
        let device = registered_device(known.as_ref(), &registration, now)?;
        let key = (device.provider, device.token.clone());
        if let Some(holder) = state.tokens.get(&key)
            && *holder != device.id
        {
            return Err(DeviceError::Invalid(format!(
                "the token is registered to another device ({holder})"
            )));
        }
        if let Some(current) = &known {
            state
                .tokens
                .remove(&(current.provider, current.token.clone()));
        }
        state.tokens.insert(key, device.id.clone());
        state.devices.insert(device.id.clone(), device.clone());
        Ok(device)
    }

    async fn update(
        &self,
        filter: &DeviceFilter,
        update: &DeviceUpdate,
        now: u64,
    ) -> Result<u64, DeviceError> {
        filter.require_selection()?;
        let mut state = self.state.lock();
        let ids = state.matching_ids(filter);
        for id in &ids {
            if let Some(device) = state.devices.get_mut(id) {
                *device = update.applied_to(device.clone(), now);
            }
        }
        Ok(ids.len() as u64)
    }

    async fn remove(
        &self,
        filter: &DeviceFilter,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Device>, DeviceError> {
        filter.require_selection()?;
        let mut state = self.state.lock();
        let ids = state.matching_ids(filter);
        Ok(ids
            .iter()
            .filter_map(|id| state.remove_device(id, reason, now))
            .collect())
    }

    async fn remove_token(
        &self,
        provider: Provider,
        token: &str,
        reason: &str,
        unless_updated_after: Option<u64>,
        now: u64,
    ) -> Result<Option<Device>, DeviceError> {
        let mut state = self.state.lock();
        let Some(id) = state.tokens.get(&(provider, token.to_owned())).cloned() else {
            return Ok(None);
        };
        let updated_at = state.devices.get(&id).map_or(0, |d| d.updated_at);
        if unless_updated_after.is_some_and(|after| updated_at > after) {
            return Ok(None);
        }
        Ok(state.remove_device(&id, reason, now))
    }

    async fn prune(&self, before: u64, now: u64) -> Result<u64, DeviceError> {
        let mut state = self.state.lock();
        let stale: Vec<String> = state
            .devices
            .values()
            .filter(|d| d.updated_at < before)
            .map(|d| d.id.clone())
            .collect();
        for id in &stale {
            state.remove_device(id, "inactive", now);
        }
        Ok(stale.len() as u64)
    }

    async fn list(
        &self,
        filter: &DeviceFilter,
        include_user_topics: bool,
        page: &PageRequest,
    ) -> Result<Page<Device>, DeviceError> {
        let state = self.state.lock();
        let total = page.include_total.then(|| {
            state
                .devices
                .values()
                .filter(|d| state.matches(filter, d))
                .count() as u64
        });
        let after = page.cursor.as_str();
        let items = state
            .devices
            .values()
            .filter(|d| after.is_empty() || d.id.as_str() > after)
            .filter(|d| state.matches(filter, d))
            .map(|d| {
                let mut device = d.clone();
                if include_user_topics {
                    device.topics = state.all_topics(d);
                }
                device
            });
        Ok(paged(
            items,
            page.effective_limit(),
            |d: &Device| d.id.clone(),
            total,
        ))
    }

    async fn device_topics(
        &self,
        filter: &DeviceTopicFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceTopic>, DeviceError> {
        let after = parse_pair_cursor(&page.cursor)?;
        let state = self.state.lock();
        let pairs = state.devices.values().flat_map(|device| {
            merged_topics(&device.topics, state.topics_of_user(&device.user))
                .into_iter()
                .filter(|(topic, _)| filter.matches(device, topic))
                .map(|(topic, from_user)| DeviceTopic {
                    id: format!("{}:{topic}", device.id),
                    topic,
                    from_user,
                    device: device.clone(),
                })
        });
        let pairs: Vec<DeviceTopic> = pairs.collect();
        let total = page.include_total.then_some(pairs.len() as u64);
        let items = pairs.into_iter().filter(|pair| {
            after.is_none_or(|(id, topic)| {
                (pair.device.id.as_str(), pair.topic.as_str()) > (id, topic)
            })
        });
        Ok(paged(
            items,
            page.effective_limit(),
            |pair: &DeviceTopic| pair_cursor(&pair.device.id, &pair.topic),
            total,
        ))
    }

    async fn update_device_topics(
        &self,
        device_id: &str,
        op: TopicOp,
        topics: &[String],
        now: u64,
    ) -> Result<(), DeviceError> {
        let mut state = self.state.lock();
        let device = state
            .devices
            .get_mut(device_id)
            .ok_or_else(|| DeviceError::NotFound(device_id.to_owned()))?;
        apply_topic_op(&mut device.topics, op, topics);
        device.updated_at = now;
        Ok(())
    }

    async fn user_topics(
        &self,
        filter: &UserTopicFilter,
        page: &PageRequest,
    ) -> Result<Page<UserTopic>, DeviceError> {
        let after = parse_pair_cursor(&page.cursor)?;
        let state = self.state.lock();
        let pairs = state.user_topics.iter().flat_map(|(user, topics)| {
            topics
                .iter()
                .filter(|topic| filter.matches(user, topic))
                .map(move |topic| UserTopic {
                    id: format!("{user}:{topic}"),
                    user: user.clone(),
                    topic: topic.clone(),
                })
        });
        let pairs: Vec<UserTopic> = pairs.collect();
        let total = page.include_total.then_some(pairs.len() as u64);
        let items = pairs.into_iter().filter(|pair| {
            after.is_none_or(|(user, topic)| {
                (pair.user.as_str(), pair.topic.as_str()) > (user, topic)
            })
        });
        Ok(paged(
            items,
            page.effective_limit(),
            |pair: &UserTopic| pair_cursor(&pair.user, &pair.topic),
            total,
        ))
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
        let mut state = self.state.lock();
        let current = state.user_topics.entry(user.to_owned()).or_default();
        apply_topic_op(current, op, topics);
        if current.is_empty() {
            state.user_topics.remove(user);
        }
        Ok(())
    }

    async fn removals(&self, page: &PageRequest) -> Result<Page<DeviceRemoval>, DeviceError> {
        let before = removal_cursor(&page.cursor)?;
        let state = self.state.lock();
        let total = page.include_total.then_some(state.removals.len() as u64);
        let items = state
            .removals
            .range(..before)
            .rev()
            .map(|(seq, removal)| (*seq, removal.clone()));
        let page = paged(
            items,
            page.effective_limit(),
            |(seq, _)| seq.to_string(),
            total,
        );
        Ok(Page {
            items: page.items.into_iter().map(|(_, removal)| removal).collect(),
            next_cursor: page.next_cursor,
            total: page.total,
        })
    }
}

/// Removals before this sequence number: the cursor is the last one listed.
fn removal_cursor(cursor: &str) -> Result<u64, DeviceError> {
    if cursor.is_empty() {
        return Ok(u64::MAX);
    }
    cursor
        .parse()
        .map_err(|_| DeviceError::Invalid(format!("invalid cursor {cursor:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_devices_pass_conformance() {
        crate::conformance::run_device_suite(|| async { Ok(MemoryDeviceStore::new()) }).await;
    }

    #[test]
    fn pair_cursors_round_trip_whatever_the_parts_hold() {
        for (first, second) in [("a:b", "c:d"), ("", ":"), ("ü", "x"), ("12", "")] {
            let cursor = pair_cursor(first, second);
            assert_eq!(
                parse_pair_cursor(&cursor).expect("valid"),
                Some((first, second))
            );
        }
        assert_eq!(parse_pair_cursor("").expect("empty"), None);
        for bad in ["x", "9:ab", "1:\u{fc}", "-1:a"] {
            assert!(parse_pair_cursor(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
