//! The registry's listings on Redis: devices, device–topic pairs, user–topic pairs and
//! removals, paged by cursor.
//!
//! Owns: how a filter becomes candidate ids (a [`Source`]: the ids it names, the union of
//! index zsets, or every device) and the walk over them in id order, a chunk at a time.
//!
//! May touch: the registry's keys (read only), through its [`Link`](super::conn::Link).
//!
//! Why paging never skips or repeats: every source is walked in lexicographic id order
//! (`ZRANGEBYLEX` of zsets with score 0), several zsets are merged only up to the smallest
//! last id any of them returned in full (nothing below it can come later), and a page's
//! cursor is the last item it holds, so the next page starts strictly after it. Candidates
//! are checked against the whole filter here, with the same `matches` every backend uses;
//! a listing is not one snapshot, so a device changed during a walk shows as it was when
//! its chunk was read.

use std::collections::{BTreeSet, HashMap};

use herald_core::device::{
    Device, DeviceError, DeviceFilter, DeviceRemoval, DeviceTopic, DeviceTopicFilter, Page,
    PageRequest, UserTopic, UserTopicFilter, merged_topics, pair_cursor, parse_pair_cursor,
};

use super::devices::{RedisDeviceStore, Stored, decode, device_error, malformed};

/// Candidates read per zset per round trip.
const CHUNK: usize = 500;
/// A topic filter becomes the union of its topics' device sets and the device sets of every
/// user with one of the topics, while that is at most this many users; past it a walk over
/// every device costs less than merging that many sets.
const MAX_TOPIC_USERS: u64 = 128;

/// Where candidate ids come from, in lexicographic order.
pub(super) enum Source {
    /// These ids.
    Ids(BTreeSet<String>),
    /// The union of these zsets of ids.
    Union(Vec<String>),
}

/// Where a walk continues.
#[derive(Clone, Debug)]
enum Bound {
    /// Strictly after this id (empty: from the first).
    After(String),
    /// At this id or after.
    From(String),
}

impl Bound {
    fn lex(&self) -> String {
        match self {
            Bound::After(id) if id.is_empty() => "-".to_owned(),
            Bound::After(id) => format!("({id}"),
            Bound::From(id) => format!("[{id}"),
        }
    }

    fn admits(&self, id: &str) -> bool {
        match self {
            Bound::After(after) => id > after.as_str(),
            Bound::From(from) => id >= from.as_str(),
        }
    }
}

/// Keeps the first `limit` of `items` (one more than a page was gathered where there was
/// more) and returns the next page's cursor: empty when nothing was beyond the page.
fn cut<T>(items: &mut Vec<T>, limit: usize, cursor_of: impl Fn(&T) -> String) -> String {
    if items.len() <= limit {
        return String::new();
    }
    items.truncate(limit);
    items.last().map(cursor_of).unwrap_or_default()
}

fn unique(values: &[String]) -> BTreeSet<String> {
    values.iter().cloned().collect()
}

impl RedisDeviceStore {
    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.base)
    }

    /// The next chunk of candidate ids of `source` from `bound`, which moves past them;
    /// `None` when the source has no more.
    async fn next_chunk(
        &self,
        source: &Source,
        bound: &mut Option<Bound>,
        chunk: usize,
    ) -> Result<Option<Vec<String>>, DeviceError> {
        let Some(from) = bound.take() else {
            return Ok(None);
        };
        match source {
            Source::Ids(ids) => {
                let ids: Vec<String> = ids
                    .iter()
                    .filter(|id| from.admits(id))
                    .take(chunk)
                    .cloned()
                    .collect();
                if ids.len() == chunk
                    && let Some(last) = ids.last()
                {
                    *bound = Some(Bound::After(last.clone()));
                }
                Ok(Some(ids))
            }
            Source::Union(keys) => {
                let start = from.lex();
                let mut pipe = redis::pipe();
                for key in keys {
                    pipe.cmd("ZRANGEBYLEX")
                        .arg(key)
                        .arg(&start)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(chunk);
                }
                let ranges: Vec<Vec<String>> = if keys.is_empty() {
                    Vec::new()
                } else {
                    self.link.pipeline(pipe).await.map_err(device_error)?
                };
                // A zset that filled its chunk may hold more after its last id: only ids up
                // to the smallest such last id are complete across all zsets.
                let frontier = ranges
                    .iter()
                    .filter(|range| range.len() == chunk)
                    .filter_map(|range| range.last())
                    .min()
                    .cloned();
                let ids: BTreeSet<String> = ranges
                    .into_iter()
                    .flatten()
                    .filter(|id| frontier.as_ref().is_none_or(|f| id <= f))
                    .collect();
                *bound = frontier.map(Bound::After);
                Ok(Some(ids.into_iter().collect()))
            }
        }
    }

    /// Reads the devices `ids` (skipping any removed meanwhile) with their versions.
    async fn fetch(&self, ids: &[String]) -> Result<Vec<Stored>, DeviceError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET").arg(self.key("dev", id)).arg("j").arg("v");
        }
        let rows: Vec<(Option<String>, Option<String>)> =
            self.link.pipeline(pipe).await.map_err(device_error)?;
        rows.into_iter()
            .filter_map(|row| match row {
                (Some(json), Some(version)) => Some(decode(&json, &version)),
                _ => None,
            })
            .collect()
    }

    /// The topics of each of `users` (the empty user has none).
    async fn topics_of(
        &self,
        users: BTreeSet<&str>,
    ) -> Result<HashMap<String, Vec<String>>, DeviceError> {
        let users: Vec<&str> = users.into_iter().filter(|u| !u.is_empty()).collect();
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for user in &users {
            pipe.cmd("ZRANGE").arg(self.key("ut", user)).arg(0).arg(-1);
        }
        let topics: Vec<Vec<String>> = self.link.pipeline(pipe).await.map_err(device_error)?;
        Ok(users.into_iter().map(str::to_owned).zip(topics).collect())
    }

    /// Where the devices matching `filter` are found: the narrowest index it names.
    async fn source(&self, filter: &DeviceFilter) -> Result<Source, DeviceError> {
        if !filter.ids.is_empty() {
            return Ok(Source::Ids(unique(&filter.ids)));
        }
        if !filter.users.is_empty() {
            let keys = unique(&filter.users)
                .iter()
                .map(|user| self.key("ud", user))
                .collect();
            return Ok(Source::Union(keys));
        }
        if !filter.topics.is_empty() {
            let topics = unique(&filter.topics);
            let mut pipe = redis::pipe();
            for topic in &topics {
                pipe.cmd("ZCARD").arg(self.key("tu", topic));
            }
            let counts: Vec<u64> = self.link.pipeline(pipe).await.map_err(device_error)?;
            if counts.iter().sum::<u64>() <= MAX_TOPIC_USERS {
                let mut pipe = redis::pipe();
                for topic in &topics {
                    pipe.cmd("ZRANGE").arg(self.key("tu", topic)).arg(0).arg(-1);
                }
                let users: Vec<Vec<String>> =
                    self.link.pipeline(pipe).await.map_err(device_error)?;
                let users: BTreeSet<String> = users.into_iter().flatten().collect();
                let keys = topics
                    .iter()
                    .map(|topic| self.key("td", topic))
                    .chain(users.iter().map(|user| self.key("ud", user)))
                    .collect();
                return Ok(Source::Union(keys));
            }
        }
        Ok(Source::Union(vec![format!("{}:ids", self.base)]))
    }

    /// Calls `visit` with each device of `source` from `from`, in id order, with its user's
    /// topics when `with_user_topics`, until it returns false.
    async fn visit(
        &self,
        source: &Source,
        from: Bound,
        with_user_topics: bool,
        chunk: usize,
        mut visit: impl FnMut(Stored, &[String]) -> bool,
    ) -> Result<(), DeviceError> {
        let mut bound = Some(from);
        while let Some(ids) = self.next_chunk(source, &mut bound, chunk).await? {
            let devices = self.fetch(&ids).await?;
            let users = if with_user_topics {
                self.topics_of(devices.iter().map(|s| s.device.user.as_str()).collect())
                    .await?
            } else {
                HashMap::new()
            };
            for stored in devices {
                let topics = users.get(&stored.device.user).cloned().unwrap_or_default();
                if !visit(stored, &topics) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Every device matching `filter` (for changes by filter).
    pub(super) async fn matching(&self, filter: &DeviceFilter) -> Result<Vec<Stored>, DeviceError> {
        let source = self.source(filter).await?;
        let mut found = Vec::new();
        let with_user_topics = !filter.topics.is_empty();
        self.visit(
            &source,
            Bound::After(String::new()),
            with_user_topics,
            CHUNK,
            |stored, user| {
                if filter.matches(&stored.device, &all_topics(&stored.device, user)) {
                    found.push(stored);
                }
                true
            },
        )
        .await?;
        Ok(found)
    }

    /// Whether `device`, as read, matches `filter`.
    pub(super) async fn matches(
        &self,
        filter: &DeviceFilter,
        device: &Device,
    ) -> Result<bool, DeviceError> {
        let user = if filter.topics.is_empty() {
            Vec::new()
        } else {
            self.topics_of(BTreeSet::from([device.user.as_str()]))
                .await?
                .remove(&device.user)
                .unwrap_or_default()
        };
        Ok(filter.matches(device, &all_topics(device, &user)))
    }

    pub(super) async fn list_page(
        &self,
        filter: &DeviceFilter,
        include_user_topics: bool,
        page: &PageRequest,
    ) -> Result<Page<Device>, DeviceError> {
        let limit = page.effective_limit();
        let source = self.source(filter).await?;
        let with_user_topics = include_user_topics || !filter.topics.is_empty();
        let mut items = Vec::new();
        self.visit(
            &source,
            Bound::After(page.cursor.clone()),
            with_user_topics,
            (limit + 1).max(CHUNK),
            |stored, user| {
                let mut device = stored.device;
                let all = all_topics(&device, user);
                if filter.matches(&device, &all) {
                    if include_user_topics {
                        device.topics = all;
                    }
                    items.push(device);
                }
                items.len() <= limit
            },
        )
        .await?;
        let next_cursor = cut(&mut items, limit, |d| d.id.clone());
        let total = match page.include_total {
            false => None,
            true if filter.is_empty() => Some(
                self.link
                    .query(
                        redis::cmd("ZCARD")
                            .arg(format!("{}:ids", self.base))
                            .to_owned(),
                    )
                    .await
                    .map_err(device_error)?,
            ),
            true => Some(self.matching(filter).await?.len() as u64),
        };
        Ok(Page {
            items,
            next_cursor,
            total,
        })
    }

    /// Calls `visit` with each device–topic pair matching `filter` of the devices from
    /// `from`, by device id then topic, until it returns false.
    async fn visit_pairs(
        &self,
        filter: &DeviceTopicFilter,
        from: Bound,
        mut visit: impl FnMut(DeviceTopic) -> bool,
    ) -> Result<(), DeviceError> {
        // Narrows the devices by index; the pairs themselves are checked by `filter.matches`.
        let devices = DeviceFilter {
            ids: filter.device_ids.clone(),
            users: filter.device_users.clone(),
            topics: filter.topics.clone(),
            providers: filter.device_providers.clone(),
            platforms: filter.device_platforms.clone(),
        };
        let source = self.source(&devices).await?;
        self.visit(&source, from, true, CHUNK, |stored, user| {
            let device = stored.device;
            for (topic, from_user) in merged_topics(&device.topics, user) {
                if !filter.matches(&device, &topic) {
                    continue;
                }
                let pair = DeviceTopic {
                    id: format!("{}:{topic}", device.id),
                    topic,
                    from_user,
                    device: device.clone(),
                };
                if !visit(pair) {
                    return false;
                }
            }
            true
        })
        .await
    }

    pub(super) async fn device_topic_page(
        &self,
        filter: &DeviceTopicFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceTopic>, DeviceError> {
        let after = parse_pair_cursor(&page.cursor)?;
        let limit = page.effective_limit();
        let from = after.map_or(Bound::After(String::new()), |(device, _)| {
            Bound::From(device.to_owned())
        });
        let mut items = Vec::new();
        self.visit_pairs(filter, from, |pair| {
            let past = after.is_none_or(|(device, topic)| {
                (pair.device.id.as_str(), pair.topic.as_str()) > (device, topic)
            });
            if past {
                items.push(pair);
            }
            items.len() <= limit
        })
        .await?;
        let next_cursor = cut(&mut items, limit, |p| pair_cursor(&p.device.id, &p.topic));
        let total = if page.include_total {
            let mut count = 0;
            self.visit_pairs(filter, Bound::After(String::new()), |_| {
                count += 1;
                true
            })
            .await?;
            Some(count)
        } else {
            None
        };
        Ok(Page {
            items,
            next_cursor,
            total,
        })
    }

    /// Calls `visit` with each user–topic pair matching `filter` of the users from `from`,
    /// by user then topic, until it returns false.
    async fn visit_user_pairs(
        &self,
        filter: &UserTopicFilter,
        from: Bound,
        mut visit: impl FnMut(UserTopic) -> bool,
    ) -> Result<(), DeviceError> {
        let source = if !filter.users.is_empty() {
            Source::Ids(unique(&filter.users))
        } else if !filter.topics.is_empty() {
            Source::Union(
                unique(&filter.topics)
                    .iter()
                    .map(|topic| self.key("tu", topic))
                    .collect(),
            )
        } else {
            Source::Union(vec![format!("{}:users", self.base)])
        };
        let mut bound = Some(from);
        while let Some(users) = self.next_chunk(&source, &mut bound, CHUNK).await? {
            let topics = self
                .topics_of(users.iter().map(String::as_str).collect())
                .await?;
            for user in &users {
                for topic in topics.get(user).into_iter().flatten() {
                    if !filter.matches(user, topic) {
                        continue;
                    }
                    let pair = UserTopic {
                        id: format!("{user}:{topic}"),
                        user: user.clone(),
                        topic: topic.clone(),
                    };
                    if !visit(pair) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) async fn user_topic_page(
        &self,
        filter: &UserTopicFilter,
        page: &PageRequest,
    ) -> Result<Page<UserTopic>, DeviceError> {
        let after = parse_pair_cursor(&page.cursor)?;
        let limit = page.effective_limit();
        let from = after.map_or(Bound::After(String::new()), |(user, _)| {
            Bound::From(user.to_owned())
        });
        let mut items = Vec::new();
        self.visit_user_pairs(filter, from, |pair| {
            let past = after.is_none_or(|(user, topic)| {
                (pair.user.as_str(), pair.topic.as_str()) > (user, topic)
            });
            if past {
                items.push(pair);
            }
            items.len() <= limit
        })
        .await?;
        let next_cursor = cut(&mut items, limit, |p| pair_cursor(&p.user, &p.topic));
        let total = if page.include_total {
            let mut count = 0;
            self.visit_user_pairs(filter, Bound::After(String::new()), |_| {
                count += 1;
                true
            })
            .await?;
            Some(count)
        } else {
            None
        };
        Ok(Page {
            items,
            next_cursor,
            total,
        })
    }

    pub(super) async fn removal_page(
        &self,
        page: &PageRequest,
    ) -> Result<Page<DeviceRemoval>, DeviceError> {
        let limit = page.effective_limit();
        let before = if page.cursor.is_empty() {
            "+inf".to_owned()
        } else {
            let seq: u64 = page
                .cursor
                .parse()
                .map_err(|_| DeviceError::Invalid(format!("invalid cursor {:?}", page.cursor)))?;
            format!("({seq}")
        };
        let key = format!("{}:rm", self.base);
        let records: Vec<String> = self
            .link
            .query(
                redis::cmd("ZREVRANGEBYSCORE")
                    .arg(&key)
                    .arg(before)
                    .arg("-inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit + 1)
                    .to_owned(),
            )
            .await
            .map_err(device_error)?;
        let mut rows = records
            .iter()
            .map(|record| parse_removal(record))
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = cut(&mut rows, limit, |(seq, _)| seq.to_string());
        let total = if page.include_total {
            Some(
                self.link
                    .query(redis::cmd("ZCARD").arg(&key).to_owned())
                    .await
                    .map_err(device_error)?,
            )
        } else {
            None
        };
        Ok(Page {
            items: rows.into_iter().map(|(_, removal)| removal).collect(),
            next_cursor,
            total,
        })
    }
}

/// A device's own and user's topics, sorted, each once.
fn all_topics(device: &Device, user: &[String]) -> Vec<String> {
    if user.is_empty() {
        return device.topics.clone();
    }
    merged_topics(&device.topics, user)
        .into_iter()
        .map(|(topic, _)| topic)
        .collect()
}

/// `<seq>:<removed_at>:<reason length>:<reason><device JSON>` (see `device_scripts.rs`).
fn parse_removal(record: &str) -> Result<(u64, DeviceRemoval), DeviceError> {
    let bad = || malformed(format!("removal record {:.80?}", record));
    let mut parts = record.splitn(4, ':');
    let (Some(seq), Some(removed_at), Some(len), Some(rest)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let seq: u64 = seq.parse().map_err(|_| bad())?;
    let removed_at: u64 = removed_at.parse().map_err(|_| bad())?;
    let len: usize = len.parse().map_err(|_| bad())?;
    let (reason, json) = (
        rest.get(..len).ok_or_else(bad)?,
        rest.get(len..).ok_or_else(bad)?,
    );
    let device =
        serde_json::from_str(json).map_err(|e| malformed(format!("removed device: {e}")))?;
    Ok((
        seq,
        DeviceRemoval {
            device,
            reason: reason.to_owned(),
            removed_at,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_records_keep_any_reason() {
        let json = r#"{"id":"d","provider":"fcm","token":"t","platform":"android","user":"",
            "app":"","timezone":"","locale":"","topics":[],"meta":{},"created_at":1,
            "updated_at":2}"#;
        let reason = "odd: reason {with} colons";
        let record = format!("7:99:{}:{reason}{json}", reason.len());
        let (seq, removal) = parse_removal(&record).expect("parses");
        assert_eq!((seq, removal.removed_at), (7, 99));
        assert_eq!(
            (removal.reason.as_str(), removal.device.id.as_str()),
            (reason, "d")
        );
        for bad in ["", "1:2", "x:2:0:{}", "1:2:99:short", "1:2:0:not json"] {
            assert!(parse_removal(bad).is_err(), "{bad:?}");
        }
    }
}
