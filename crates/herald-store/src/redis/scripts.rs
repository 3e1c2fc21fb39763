//! Key names and the Lua scripts that make publishing one atomic step.
//!
//! Owns: [`Keys`] (every key and pub/sub channel name the engine uses, under the configured
//! prefix; a channel's keys share the `{channel}` hash tag so one script may touch them all on
//! a Redis Cluster slot too), and the scripts:
//! - [`PUBLISH`]: idempotency check, offset increment, stream append with size retention and
//!   expired entries trimmed, TTLs, pub/sub publish — in that order, in one round trip;
//! - [`READ`]: the stream's epoch (created on first sight, so readers and the first publish
//!   agree on it), top offset and a page of entries, in one round trip.
//!
//! May touch: nothing; the engine runs the scripts.

use std::sync::LazyLock;

use redis::Script;

/// Key and channel names under one prefix.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The stream of a channel's publications (entry id `0-<offset>`).
    pub(crate) fn stream(&self, channel: &str) -> String {
        format!("{}:s:{{{channel}}}", self.prefix)
    }

    /// The hash with the channel's epoch (`e`) and top offset (`s`).
    pub(crate) fn meta(&self, channel: &str) -> String {
        format!("{}:m:{{{channel}}}", self.prefix)
    }

    /// One idempotency key of a channel.
    pub(crate) fn idempotency(&self, channel: &str, key: &str) -> String {
        format!("{}:i:{{{channel}}}:{key}", self.prefix)
    }

    /// The pub/sub channel the channel's events travel on.
    pub(crate) fn pubsub(&self, channel: &str) -> String {
        format!("{}:c:{channel}", self.prefix)
    }

    /// The pub/sub pattern (PSUBSCRIBE) of every channel whose name starts with `prefix`:
    /// the glob's special characters of the names are escaped, `*` is appended.
    pub(crate) fn pubsub_pattern(&self, prefix: &str) -> String {
        let mut pattern = String::with_capacity(self.prefix.len() + prefix.len() + 5);
        for c in self.pubsub(prefix).chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        pattern
    }

    /// The channel name of a pub/sub channel, if it is one of ours.
    pub(crate) fn channel_of<'a>(&self, pubsub: &'a str) -> Option<&'a str> {
        pubsub
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix(":c:"))
    }

    /// Presence entries of a channel (client id -> info JSON).
    pub(crate) fn presence(&self, channel: &str) -> String {
        format!("{}:p:{{{channel}}}", self.prefix)
    }

    /// When each presence entry of a channel expires (client id -> ms).
    pub(crate) fn presence_expiry(&self, channel: &str) -> String {
        format!("{}:q:{{{channel}}}", self.prefix)
    }

    /// The pub/sub channel of cluster-wide commands (disconnects, revocations, …).
    pub(crate) fn control(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// Cluster-wide commands kept for nodes that start later (member: the command, score:
    /// until when it matters, in Unix seconds).
    pub(crate) fn kept_controls(&self) -> String {
        format!("{}:kept", self.prefix)
    }

    /// Nodes' answers to one cluster-wide query (node uid -> answer).
    pub(crate) fn answers(&self, request: &str) -> String {
        format!("{}:answers:{request}", self.prefix)
    }

    /// The node registry (node uid -> JSON with its last heartbeat).
    pub(crate) fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The base of every key of the outbound queue and the device registry. The `{push}`
    /// hash tag puts them all in one slot, so one script may touch any of them (see
    /// `queue_scripts.rs` and `device_scripts.rs` for the layout).
    pub(crate) fn push(&self) -> String {
        format!("{}:{{push}}", self.prefix)
    }
}

/// KEYS: stream, meta, idempotency key (or "" for none).
/// ARGV: stored publication, history size (0: not stored), stream TTL ms, meta TTL ms (0:
/// keep), a new epoch (used if the stream has none), idempotency window ms, pub/sub channel,
/// now ms, expiry ms of this entry (0: never).
/// Returns `{duplicate (0|1), "offset:epoch" or ""}`.
pub(crate) static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local idem = KEYS[3]
if idem ~= '' then
  local seen = redis.call('GET', idem)
  if seen then return {1, seen} end
end
local size = tonumber(ARGV[2])
if size == 0 then
  redis.call('PUBLISH', ARGV[7], 'P0::' .. ARGV[1])
  if idem ~= '' then redis.call('SET', idem, '', 'PX', ARGV[6]) end
  return {0, ''}
end
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[2], 'e', epoch)
  redis.call('DEL', KEYS[1])
end
local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', size, '0-' .. offset, 'x', ARGV[9], 'p', ARGV[1])
local now = tonumber(ARGV[8])
-- Expired entries are at the head: look at one entry at a time (most publishes find the
-- head alive at the first look; reading 16 entries with their payloads cost Redis ~25 us).
for _ = 1, 16 do
  local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #head == 0 then break end
  local expires = tonumber(head[1][2][2])
  if expires ~= 0 and expires <= now then
    redis.call('XDEL', KEYS[1], head[1][1])
  else
    break
  end
end
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
local position = offset .. ':' .. epoch
if idem ~= '' then redis.call('SET', idem, position, 'PX', ARGV[6]) end
redis.call('PUBLISH', ARGV[7], 'P' .. position .. ':' .. ARGV[1])
return {0, position}
"#,
    )
});

/// KEYS: stream, meta. ARGV: a new epoch, meta TTL ms (0: keep), direction (`f` forward,
/// `r` reverse, `n` no entries), the exclusive bound to read from (`(0-<offset>`, or `-` /
/// `+` for the oldest / newest), most entries (0: all).
/// Returns `{epoch, top offset, entries}`.
pub(crate) static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[2], 'e', epoch)
  redis.call('DEL', KEYS[1])
  if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
end
local top = redis.call('HGET', KEYS[2], 's') or '0'
local entries = {}
local count = tonumber(ARGV[5])
if ARGV[3] == 'f' then
  if count == 0 then
    entries = redis.call('XRANGE', KEYS[1], ARGV[4], '+')
  else
    entries = redis.call('XRANGE', KEYS[1], ARGV[4], '+', 'COUNT', count)
  end
elseif ARGV[3] == 'r' then
  if count == 0 then
    entries = redis.call('XREVRANGE', KEYS[1], ARGV[4], '-')
  else
    entries = redis.call('XREVRANGE', KEYS[1], ARGV[4], '-', 'COUNT', count)
  end
end
return {epoch, top, entries}
"#,
    )
});

/// KEYS: presence hash, presence expiry zset. ARGV: now ms.
/// Drops expired entries, returns the rest as a flat `client, info, …` list.
pub(crate) static PRESENCE_GET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if #expired > 0 then
  redis.call('HDEL', KEYS[1], unpack(expired))
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"#,
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channels_keys_share_one_hash_tag() {
        let keys = Keys::new("h");
        assert_eq!(keys.stream("chat:1"), "h:s:{chat:1}");
        assert_eq!(keys.meta("chat:1"), "h:m:{chat:1}");
        assert_eq!(keys.idempotency("chat:1", "k"), "h:i:{chat:1}:k");
        assert_eq!(keys.channel_of(&keys.pubsub("a:b")), Some("a:b"));
        assert_eq!(keys.channel_of("other:c:a"), None);
        assert_eq!(keys.push(), "h:{push}");
        assert_eq!(keys.pubsub_pattern("mqtt:a/"), "h:c:mqtt:a/*");
        assert_eq!(keys.pubsub_pattern("x*?[]"), r"h:c:x\*\?\[\]*");
    }
}
