//! The device registry on SQLite: [`SqliteDeviceStore`].
//!
//! Owns: the SQL of the [`DeviceStore`] contract over the `devices`, `device_topics`,
//! `user_topics` and `removals` tables, and how a device is laid out in them.
//!
//! May touch: `outbound.db` through [`OutboundDb`] only (writes on its writer thread, reads
//! on its read connections).
//!
//! A device's user's topics are never copied onto it: reads join `user_topics` by the
//! device's user, so changing a user's topics, or a device's user, is one small write.
//! Filters become SQL terms (a list is one `json_each` parameter), so a lookup by user, id,
//! token or topic uses an index; the topic prefix of the pair listings is checked in code.

use async_trait::async_trait;
use herald_core::device::{
    Device, DeviceError, DeviceFilter, DeviceRegistration, DeviceRemoval, DeviceStore, DeviceTopic,
    DeviceTopicFilter, DeviceUpdate, Page, PageRequest, Provider, TopicOp, UserTopic,
    UserTopicFilter, apply_topic_op, merged_topics, pair_cursor, parse_pair_cursor,
    registered_device,
};
use rusqlite::types::Value;
use rusqlite::{Connection, Row, params, params_from_iter};

use super::{DbError, OutboundDb, Terms};
use crate::sqlite::codec::{to_i64, to_u64};

/// The device registry in `outbound.db`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SqliteDeviceStore {
    db: OutboundDb,
}

impl SqliteDeviceStore {
    /// The registry of an open database (shares its writer with the queue).
    pub fn new(db: OutboundDb) -> Self {
        Self { db }
    }

    /// The database this registry lives in.
    pub fn db(&self) -> &OutboundDb {
        &self.db
    }
}

/// The columns [`decode`] reads, from `devices d`.
const DEVICE_COLUMNS: &str = "d.id, d.provider, d.token, d.platform, d.user_id, d.app, \
     d.timezone, d.locale, d.meta, d.created_at, d.updated_at";

fn corrupt(what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, what.into())
}

/// A device row without its topics (filled in by [`with_topics`]).
fn decode(row: &Row<'_>) -> rusqlite::Result<Device> {
    let provider: String = row.get(1)?;
    let platform: String = row.get(3)?;
    let meta: String = row.get(8)?;
    Ok(Device {
        id: row.get(0)?,
        provider: provider
            .parse()
            .map_err(|e: DeviceError| corrupt(e.to_string()))?,
        token: row.get(2)?,
        platform: platform
            .parse()
            .map_err(|e: DeviceError| corrupt(e.to_string()))?,
        user: row.get(4)?,
        app: row.get(5)?,
        timezone: row.get(6)?,
        locale: row.get(7)?,
        topics: Vec::new(),
        meta: serde_json::from_str(&meta).map_err(|e| corrupt(format!("device meta: {e}")))?,
        created_at: to_u64(row.get(9)?),
        updated_at: to_u64(row.get(10)?),
    })
}

fn own_topics(conn: &Connection, device: &str) -> rusqlite::Result<Vec<String>> {
    conn.prepare_cached("SELECT topic FROM device_topics WHERE device = ?1 ORDER BY topic")?
        .query_map(params![device], |row| row.get(0))?
        .collect()
}

fn topics_of_user(conn: &Connection, user: &str) -> rusqlite::Result<Vec<String>> {
    if user.is_empty() {
        return Ok(Vec::new());
    }
    conn.prepare_cached("SELECT topic FROM user_topics WHERE user_id = ?1 ORDER BY topic")?
        .query_map(params![user], |row| row.get(0))?
        .collect()
}

fn with_topics(conn: &Connection, mut device: Device) -> rusqlite::Result<Device> {
    device.topics = own_topics(conn, &device.id)?;
    Ok(device)
}

/// The `WHERE` terms of `filter` over `devices d`.
fn device_terms(filter: &DeviceFilter, terms: &mut Terms) -> Result<(), DbError> {
    if !filter.ids.is_empty() {
        terms.add_list("d.id", &filter.ids)?;
    }
    if !filter.users.is_empty() {
        terms.add_list("d.user_id", &filter.users)?;
    }
    if !filter.providers.is_empty() {
        let names: Vec<&str> = filter.providers.iter().map(|p| p.as_str()).collect();
        // `+`: not through the (provider, token) index. A handful of providers match large
        // shares of the registry, and rows found through that index must be sorted by id
        // for every page: paging a fan-out through N devices read N²/page rows (50,000
        // devices: 2.5 million). In id order a page reads only up to its last row.
        terms.add_list("+d.provider", &names)?;
    }
    if !filter.platforms.is_empty() {
        let names: Vec<&str> = filter.platforms.iter().map(|p| p.as_str()).collect();
        terms.add_list("d.platform", &names)?;
    }
    if !filter.topics.is_empty() {
        let list = super::json_list(&filter.topics)?;
        terms.add_many(
            "(d.id IN (SELECT device FROM device_topics
                       WHERE topic IN (SELECT value FROM json_each(#)))
              OR (d.user_id != '' AND d.user_id IN (SELECT user_id FROM user_topics
                       WHERE topic IN (SELECT value FROM json_each(#)))))",
            [Value::Text(list.clone()), Value::Text(list)],
        );
    }
    Ok(())
}

/// Devices matching `terms`, by id, with their own topics; at most `limit` (`None`: all).
fn select_devices(
    conn: &Connection,
    terms: &Terms,
    limit: Option<usize>,
) -> Result<Vec<Device>, DbError> {
    let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
    let sql = format!(
        "SELECT {DEVICE_COLUMNS} FROM devices d WHERE 1{} ORDER BY d.id LIMIT {limit}",
        terms.sql
    );
    let devices: Vec<Device> = conn
        .prepare_cached(&sql)?
        .query_map(params_from_iter(&terms.values), decode)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(devices
        .into_iter()
        .map(|d| with_topics(conn, d))
        .collect::<rusqlite::Result<_>>()?)
}

fn count_devices(conn: &Connection, terms: &Terms) -> Result<u64, DbError> {
    let sql = format!("SELECT count(*) FROM devices d WHERE 1{}", terms.sql);
    Ok(to_u64(
        conn.prepare_cached(&sql)?
            .query_row(params_from_iter(&terms.values), |row| row.get(0))?,
    ))
}

fn matching(conn: &Connection, filter: &DeviceFilter) -> Result<Vec<Device>, DbError> {
    if filter.is_empty() {
        return Err(DbError::Invalid(
            "a filter is required: an empty one would match every device".to_owned(),
        ));
    }
    let mut terms = Terms::default();
    device_terms(filter, &mut terms)?;
    select_devices(conn, &terms, None)
}

fn load(conn: &Connection, id: &str) -> Result<Option<Device>, DbError> {
    let mut terms = Terms::default();
    terms.add("d.id = #", id.to_owned());
    Ok(select_devices(conn, &terms, Some(1))?.pop())
}

fn by_token(conn: &Connection, provider: Provider, token: &str) -> Result<Option<Device>, DbError> {
    let mut terms = Terms::default();
    terms.add_many(
        "d.provider = # AND d.token = #",
        [
            Value::Text(provider.as_str().to_owned()),
            Value::Text(token.to_owned()),
        ],
    );
    Ok(select_devices(conn, &terms, Some(1))?.pop())
}

fn set_own_topics(conn: &Connection, device: &str, topics: &[String]) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM device_topics WHERE device = ?1")?
        .execute(params![device])?;
    let mut insert =
        conn.prepare_cached("INSERT OR IGNORE INTO device_topics (device, topic) VALUES (?1, ?2)")?;
    for topic in topics {
        insert.execute(params![device, topic])?;
    }
    Ok(())
}

fn encode_meta(device: &Device) -> Result<String, DbError> {
    serde_json::to_string(&device.meta).map_err(|e| DbError::Backend(format!("device meta: {e}")))
}

/// Writes every column of `device` (and its own topics), inserting it if it is new.
fn save(conn: &Connection, device: &Device) -> Result<(), DbError> {
    conn.prepare_cached(
        "INSERT INTO devices (id, provider, token, platform, user_id, app, timezone, locale,
                              meta, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (id) DO UPDATE SET provider = excluded.provider, token = excluded.token,
             platform = excluded.platform, user_id = excluded.user_id, app = excluded.app,
             timezone = excluded.timezone, locale = excluded.locale, meta = excluded.meta,
             updated_at = excluded.updated_at",
    )?
    .execute(params![
        device.id,
        device.provider.as_str(),
        device.token,
        device.platform.as_str(),
        device.user,
        device.app,
        device.timezone,
        device.locale,
        encode_meta(device)?,
        to_i64(device.created_at),
        to_i64(device.updated_at),
    ])?;
    set_own_topics(conn, &device.id, &device.topics)?;
    Ok(())
}

/// Deletes `device` and records why.
fn delete(conn: &Connection, device: &Device, reason: &str, now: u64) -> Result<(), DbError> {
    conn.prepare_cached("DELETE FROM devices WHERE id = ?1")?
        .execute(params![device.id])?;
    conn.prepare_cached("DELETE FROM device_topics WHERE device = ?1")?
        .execute(params![device.id])?;
    let record = serde_json::to_string(device)
        .map_err(|e| DbError::Backend(format!("encode a removed device: {e}")))?;
    conn.prepare_cached("INSERT INTO removals (device, reason, removed_at) VALUES (?1, ?2, ?3)")?
        .execute(params![record, reason, to_i64(now)])?;
    Ok(())
}

fn register(
    conn: &Connection,
    registration: DeviceRegistration,
    now: u64,
) -> Result<Device, DbError> {
    let known = match &registration.id {
        Some(id) => Some(load(conn, id)?.ok_or_else(|| DbError::NotFound(id.clone()))?),
        None => {
            let provider = registration
                .provider
                .ok_or_else(|| DbError::Invalid("a new device needs a provider".to_owned()))?;
            if registration.token.is_empty() {
                return Err(DbError::Invalid("a new device needs a token".to_owned()));
            }
            by_token(conn, provider, &registration.token)?
        }
    };
    let device = registered_device(known.as_ref(), &registration, now)?;
    if let Some(current) = &known
        && (device.provider, device.token.as_str()) != (current.provider, current.token.as_str())
        && let Some(holder) = by_token(conn, device.provider, &device.token)?
    {
        return Err(DbError::Invalid(format!(
            "the token is registered to another device ({})",
            holder.id
        )));
    }
    save(conn, &device)?;
    Ok(device)
}

fn update(
    conn: &Connection,
    filter: &DeviceFilter,
    update: &DeviceUpdate,
    now: u64,
) -> Result<u64, DbError> {
    let devices = matching(conn, filter)?;
    for device in devices.iter().cloned() {
        save(conn, &update.applied_to(device, now))?;
    }
    Ok(devices.len() as u64)
}

fn set_user_topics(
    conn: &Connection,
    user: &str,
    op: TopicOp,
    topics: &[String],
) -> Result<(), DbError> {
    if user.is_empty() {
        return Err(DbError::Invalid(
            "user topics need a user: anonymous devices share no topics".to_owned(),
        ));
    }
    let mut current = topics_of_user(conn, user)?;
    apply_topic_op(&mut current, op, topics);
    conn.prepare_cached("DELETE FROM user_topics WHERE user_id = ?1")?
        .execute(params![user])?;
    let mut insert =
        conn.prepare_cached("INSERT INTO user_topics (user_id, topic) VALUES (?1, ?2)")?;
    for topic in &current {
        insert.execute(params![user, topic])?;
    }
    Ok(())
}

fn list(
    conn: &Connection,
    filter: &DeviceFilter,
    include_user_topics: bool,
    page: &PageRequest,
) -> Result<Page<Device>, DbError> {
    let limit = page.effective_limit();
    let mut terms = Terms::default();
    if !page.cursor.is_empty() {
        terms.add("d.id > #", page.cursor.clone());
    }
    device_terms(filter, &mut terms)?;
    let mut items = select_devices(conn, &terms, Some(limit + 1))?;
    let next_cursor = cut(&mut items, limit, |d| d.id.clone());
    if include_user_topics {
        for device in &mut items {
            let user = topics_of_user(conn, &device.user)?;
            device.topics = merged_topics(&device.topics, &user)
                .into_iter()
                .map(|(topic, _)| topic)
                .collect();
        }
    }
    let total = if page.include_total {
        let mut terms = Terms::default();
        device_terms(filter, &mut terms)?;
        Some(count_devices(conn, &terms)?)
    } else {
        None
    };
    Ok(Page {
        items,
        next_cursor,
        total,
    })
}

/// Keeps the first `limit` of `items` (fetched one more than a page) and returns the next
/// page's cursor: empty when nothing was beyond the page.
fn cut<T>(items: &mut Vec<T>, limit: usize, cursor_of: impl Fn(&T) -> String) -> String {
    if items.len() <= limit {
        return String::new();
    }
    items.truncate(limit);
    items.last().map(cursor_of).unwrap_or_default()
}

/// Calls `visit` with each device–topic pair matching `filter` at or after the device
/// `from`, by device id then topic, until it returns false.
fn visit_pairs(
    conn: &Connection,
    filter: &DeviceTopicFilter,
    from: Option<&str>,
    mut visit: impl FnMut(DeviceTopic) -> bool,
) -> Result<(), DbError> {
    // Narrows the devices in SQL; the pairs themselves are checked by `filter.matches`.
    let devices = DeviceFilter {
        ids: filter.device_ids.clone(),
        users: filter.device_users.clone(),
        topics: filter.topics.clone(),
        providers: filter.device_providers.clone(),
        platforms: filter.device_platforms.clone(),
    };
    let mut terms = Terms::default();
    if let Some(from) = from {
        terms.add("d.id >= #", from.to_owned());
    }
    device_terms(&devices, &mut terms)?;
    let sql = format!(
        "SELECT {DEVICE_COLUMNS} FROM devices d WHERE 1{} ORDER BY d.id",
        terms.sql
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(&terms.values))?;
    while let Some(row) = rows.next()? {
        let device = with_topics(conn, decode(row)?)?;
        let user = topics_of_user(conn, &device.user)?;
        for (topic, from_user) in merged_topics(&device.topics, &user) {
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
                return Ok(());
            }
        }
    }
    Ok(())
}

fn device_topics(
    conn: &Connection,
    filter: &DeviceTopicFilter,
    page: &PageRequest,
) -> Result<Page<DeviceTopic>, DbError> {
    let after = parse_pair_cursor(&page.cursor)?;
    let limit = page.effective_limit();
    let mut items = Vec::new();
    visit_pairs(conn, filter, after.map(|(device, _)| device), |pair| {
        let past = after.is_none_or(|(device, topic)| {
            (pair.device.id.as_str(), pair.topic.as_str()) > (device, topic)
        });
        if past {
            items.push(pair);
        }
        items.len() <= limit
    })?;
    let next_cursor = cut(&mut items, limit, |p| pair_cursor(&p.device.id, &p.topic));
    let total = if page.include_total {
        let mut count = 0;
        visit_pairs(conn, filter, None, |_| {
            count += 1;
            true
        })?;
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

fn user_topic_terms(filter: &UserTopicFilter, terms: &mut Terms) -> Result<(), DbError> {
    if !filter.users.is_empty() {
        terms.add_list("user_id", &filter.users)?;
    }
    if !filter.topics.is_empty() {
        terms.add_list("topic", &filter.topics)?;
    }
    if !filter.topic_prefix.is_empty() {
        let prefix = Value::Text(filter.topic_prefix.clone());
        terms.add_many("substr(topic, 1, length(#)) = #", [prefix.clone(), prefix]);
    }
    Ok(())
}

fn user_topics(
    conn: &Connection,
    filter: &UserTopicFilter,
    page: &PageRequest,
) -> Result<Page<UserTopic>, DbError> {
    let limit = page.effective_limit();
    let mut terms = Terms::default();
    if let Some((user, topic)) = parse_pair_cursor(&page.cursor)? {
        terms.add_many(
            "(user_id, topic) > (#, #)",
            [Value::Text(user.to_owned()), Value::Text(topic.to_owned())],
        );
    }
    user_topic_terms(filter, &mut terms)?;
    let sql = format!(
        "SELECT user_id, topic FROM user_topics WHERE 1{} ORDER BY user_id, topic LIMIT {}",
        terms.sql,
        limit + 1
    );
    let mut items: Vec<UserTopic> = conn
        .prepare_cached(&sql)?
        .query_map(params_from_iter(&terms.values), |row| {
            let (user, topic): (String, String) = (row.get(0)?, row.get(1)?);
            Ok(UserTopic {
                id: format!("{user}:{topic}"),
                user,
                topic,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let next_cursor = cut(&mut items, limit, |p| pair_cursor(&p.user, &p.topic));
    let total = if page.include_total {
        let mut terms = Terms::default();
        user_topic_terms(filter, &mut terms)?;
        let sql = format!("SELECT count(*) FROM user_topics WHERE 1{}", terms.sql);
        Some(to_u64(
            conn.prepare_cached(&sql)?
                .query_row(params_from_iter(&terms.values), |row| row.get(0))?,
        ))
    } else {
        None
    };
    Ok(Page {
        items,
        next_cursor,
        total,
    })
}

fn removals(conn: &Connection, page: &PageRequest) -> Result<Page<DeviceRemoval>, DbError> {
    let limit = page.effective_limit();
    let mut terms = Terms::default();
    if !page.cursor.is_empty() {
        let before: i64 = page
            .cursor
            .parse()
            .map_err(|_| DbError::Invalid(format!("invalid cursor {:?}", page.cursor)))?;
        terms.add("seq < #", before);
    }
    let sql = format!(
        "SELECT seq, device, reason, removed_at FROM removals WHERE 1{} ORDER BY seq DESC LIMIT {}",
        terms.sql,
        limit + 1
    );
    let mut rows: Vec<(i64, DeviceRemoval)> = conn
        .prepare_cached(&sql)?
        .query_map(params_from_iter(&terms.values), |row| {
            let device: String = row.get(1)?;
            Ok((
                row.get(0)?,
                DeviceRemoval {
                    device: serde_json::from_str(&device)
                        .map_err(|e| corrupt(format!("removed device: {e}")))?,
                    reason: row.get(2)?,
                    removed_at: to_u64(row.get(3)?),
                },
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let next_cursor = cut(&mut rows, limit, |(seq, _)| seq.to_string());
    let total = if page.include_total {
        Some(to_u64(
            conn.prepare_cached("SELECT count(*) FROM removals")?
                .query_row([], |row| row.get(0))?,
        ))
    } else {
        None
    };
    Ok(Page {
        items: rows.into_iter().map(|(_, removal)| removal).collect(),
        next_cursor,
        total,
    })
}

#[async_trait]
impl DeviceStore for SqliteDeviceStore {
    async fn register(
        &self,
        registration: DeviceRegistration,
        now: u64,
    ) -> Result<Device, DeviceError> {
        Ok(self
            .db
            .write(move |conn| register(conn, registration, now))
            .await?)
    }

    async fn update(
        &self,
        filter: &DeviceFilter,
        changes: &DeviceUpdate,
        now: u64,
    ) -> Result<u64, DeviceError> {
        let (filter, changes) = (filter.clone(), changes.clone());
        Ok(self
            .db
            .write(move |conn| update(conn, &filter, &changes, now))
            .await?)
    }

    async fn remove(
        &self,
        filter: &DeviceFilter,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Device>, DeviceError> {
        let (filter, reason) = (filter.clone(), reason.to_owned());
        Ok(self
            .db
            .write(move |conn| {
                let devices = matching(conn, &filter)?;
                for device in &devices {
                    delete(conn, device, &reason, now)?;
                }
                Ok(devices)
            })
            .await?)
    }

    async fn remove_token(
        &self,
        provider: Provider,
        token: &str,
        reason: &str,
        unless_updated_after: Option<u64>,
        now: u64,
    ) -> Result<Option<Device>, DeviceError> {
        let (token, reason) = (token.to_owned(), reason.to_owned());
        Ok(self
            .db
            .write(move |conn| {
                let Some(device) = by_token(conn, provider, &token)? else {
                    return Ok(None);
                };
                if unless_updated_after.is_some_and(|after| device.updated_at > after) {
                    return Ok(None);
                }
                delete(conn, &device, &reason, now)?;
                Ok(Some(device))
            })
            .await?)
    }

    async fn prune(&self, before: u64, now: u64) -> Result<u64, DeviceError> {
        Ok(self
            .db
            .write(move |conn| {
                let mut terms = Terms::default();
                terms.add("d.updated_at < #", to_i64(before));
                let stale = select_devices(conn, &terms, None)?;
                for device in &stale {
                    delete(conn, device, "inactive", now)?;
                }
                Ok(stale.len() as u64)
            })
            .await?)
    }

    async fn list(
        &self,
        filter: &DeviceFilter,
        include_user_topics: bool,
        page: &PageRequest,
    ) -> Result<Page<Device>, DeviceError> {
        let (filter, page) = (filter.clone(), page.clone());
        Ok(self
            .db
            .read(move |conn| list(conn, &filter, include_user_topics, &page))
            .await?)
    }

    async fn device_topics(
        &self,
        filter: &DeviceTopicFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceTopic>, DeviceError> {
        let (filter, page) = (filter.clone(), page.clone());
        Ok(self
            .db
            .read(move |conn| device_topics(conn, &filter, &page))
            .await?)
    }

    async fn update_device_topics(
        &self,
        device_id: &str,
        op: TopicOp,
        topics: &[String],
        now: u64,
    ) -> Result<(), DeviceError> {
        let (id, topics) = (device_id.to_owned(), topics.to_vec());
        Ok(self
            .db
            .write(move |conn| {
                let mut device = load(conn, &id)?.ok_or_else(|| DbError::NotFound(id.clone()))?;
                apply_topic_op(&mut device.topics, op, &topics);
                device.updated_at = now;
                save(conn, &device)
            })
            .await?)
    }

    async fn user_topics(
        &self,
        filter: &UserTopicFilter,
        page: &PageRequest,
    ) -> Result<Page<UserTopic>, DeviceError> {
        let (filter, page) = (filter.clone(), page.clone());
        Ok(self
            .db
            .read(move |conn| user_topics(conn, &filter, &page))
            .await?)
    }

    async fn update_user_topics(
        &self,
        user: &str,
        op: TopicOp,
        topics: &[String],
    ) -> Result<(), DeviceError> {
        let (user, topics) = (user.to_owned(), topics.to_vec());
        Ok(self
            .db
            .write(move |conn| set_user_topics(conn, &user, op, &topics))
            .await?)
    }

    async fn removals(&self, page: &PageRequest) -> Result<Page<DeviceRemoval>, DeviceError> {
        let page = page.clone();
        Ok(self.db.read(move |conn| removals(conn, &page)).await?)
    }
}
