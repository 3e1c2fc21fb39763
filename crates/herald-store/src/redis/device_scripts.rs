//! The Lua scripts of the Redis device registry: a device's record and every index that
//! points at it change in one script, so the indexes never disagree with the devices.
//!
//! Owns: the registry's key layout (below) and the scripts over it. `KEYS[1]` of every
//! script is the push base (`<prefix>:{push}`), shared with the queue.
//!
//! Key layout under the base `B`:
//! - `B:dev:<id>` hash: `j` the device as JSON (own topics included), `v` its version
//!   (bumped by every save; a save names the version it read, so a concurrent change is seen
//!   and the caller reads again), and the indexed fields `p` provider, `t` token, `u` user;
//! - `B:dt:<id>` set, the device's own topics (to unindex them without parsing JSON);
//! - `B:tok:<provider>:<token>` the id of the device holding the token;
//! - `B:ids` zset of every device id (score 0: lexicographic, for paging by id);
//! - `B:upd` zset of device ids by `updated_at` (what `prune` walks);
//! - `B:ud:<user>` zset of a user's device ids; `B:td:<topic>` zset of the ids of devices
//!   with that own topic;
//! - `B:ut:<user>` zset of a user's topics; `B:tu:<topic>` zset of the users with that
//!   topic; `B:users` zset of users with any topic (all lexicographic);
//! - `B:rm` zset of removal records by sequence number (`B:rmseq`); a record is
//!   `<seq>:<removed_at>:<reason length>:<reason><device JSON>`.
//!
//! May touch: nothing; the registry runs the scripts.

use std::sync::LazyLock;

use redis::Script;

const PRELUDE: &str = r#"
local base = KEYS[1]
local function dk(id) return base .. ':dev:' .. id end
local function tok(provider, token) return base .. ':tok:' .. provider .. ':' .. token end

-- Removes device `id` with every index entry and records why. Returns its JSON, or false
-- when there is no such device, or when `after` is set and it was updated after `after`.
local function drop(id, reason, now, after)
  local key = dk(id)
  local f = redis.call('HMGET', key, 'j', 'p', 't', 'u', 'at')
  if not f[1] then return false end
  if after ~= '' and tonumber(f[5]) > tonumber(after) then return false end
  local tk = tok(f[2], f[3])
  if redis.call('GET', tk) == id then redis.call('DEL', tk) end
  redis.call('ZREM', base .. ':ud:' .. f[4], id)
  local dt = base .. ':dt:' .. id
  for _, topic in ipairs(redis.call('SMEMBERS', dt)) do
    redis.call('ZREM', base .. ':td:' .. topic, id)
  end
  redis.call('DEL', key, dt)
  redis.call('ZREM', base .. ':ids', id)
  redis.call('ZREM', base .. ':upd', id)
  local seq = redis.call('INCR', base .. ':rmseq')
  redis.call('ZADD', base .. ':rm', seq,
    seq .. ':' .. now .. ':' .. string.len(reason) .. ':' .. reason .. f[1])
  return f[1]
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// ARGV: id (`''`: look up by token), provider, token. Returns `{json, version}`, or an
/// empty array when there is no such device.
pub(crate) static LOAD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id = ARGV[1]
if id == '' then
  id = redis.call('GET', tok(ARGV[2], ARGV[3]))
  if not id then return {} end
end
local f = redis.call('HMGET', dk(id), 'j', 'v')
if not f[1] then return {} end
return f
"#,
    )
});

/// ARGV: id, the version read (`0`: the device must be new), device JSON, provider, token,
/// user, updated_at, then its own topics. Writes the device and moves its index entries.
/// Returns `{'ok'}`, `{'conflict'}` (the device changed since it was read) or
/// `{'taken', holder}` (another device holds the token; nothing written).
pub(crate) static SAVE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, provider, token, user = ARGV[1], ARGV[4], ARGV[5], ARGV[6]
local key = dk(id)
local f = redis.call('HMGET', key, 'v', 'p', 't', 'u')
local version = tonumber(f[1] or '0')
if version ~= tonumber(ARGV[2]) then return {'conflict'} end
local tk = tok(provider, token)
local holder = redis.call('GET', tk)
if holder and holder ~= id then return {'taken', holder} end
if f[1] then
  if f[2] ~= provider or f[3] ~= token then
    local old = tok(f[2], f[3])
    if redis.call('GET', old) == id then redis.call('DEL', old) end
  end
  if f[4] ~= user then redis.call('ZREM', base .. ':ud:' .. f[4], id) end
end
redis.call('SET', tk, id)
redis.call('ZADD', base .. ':ud:' .. user, 0, id)
local dt = base .. ':dt:' .. id
for _, topic in ipairs(redis.call('SMEMBERS', dt)) do
  redis.call('ZREM', base .. ':td:' .. topic, id)
end
redis.call('DEL', dt)
for i = 8, #ARGV do
  redis.call('ZADD', base .. ':td:' .. ARGV[i], 0, id)
  redis.call('SADD', dt, ARGV[i])
end
redis.call('ZADD', base .. ':ids', 0, id)
redis.call('ZADD', base .. ':upd', ARGV[7], id)
redis.call('HSET', key, 'j', ARGV[3], 'v', version + 1, 'p', provider, 't', token, 'u', user,
  'at', ARGV[7])
return {'ok'}
"#,
    )
});

/// ARGV: id (`''`: by token), provider, token, the version read (`''`: any), keep it when
/// updated after this (`''`: never), reason, now. Removes the device and records why.
/// Returns `{'removed', json}`, `{'kept'}` (none, or updated after the bound) or
/// `{'conflict'}`.
pub(crate) static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id = ARGV[1]
if id == '' then
  id = redis.call('GET', tok(ARGV[2], ARGV[3]))
  if not id then return {'kept'} end
end
if ARGV[4] ~= '' and redis.call('HGET', dk(id), 'v') ~= ARGV[4] then return {'conflict'} end
local json = drop(id, ARGV[6], ARGV[7], ARGV[5])
if not json then return {'kept'} end
return {'removed', json}
"#,
    )
});

/// ARGV: before (exclusive), most devices, now. Removes devices last updated before
/// `before` as `inactive`. Returns how many.
pub(crate) static PRUNE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local ids = redis.call('ZRANGEBYSCORE', base .. ':upd', '-inf', '(' .. ARGV[1], 'LIMIT', 0,
  tonumber(ARGV[2]))
for _, id in ipairs(ids) do drop(id, 'inactive', ARGV[3], '') end
return #ids
"#,
    )
});

/// ARGV: user (not empty), op (`add`, `remove`, `set`), topics. Changes the user's topics
/// and the topic-to-users index.
pub(crate) static USER_TOPICS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local user, op = ARGV[1], ARGV[2]
local ut = base .. ':ut:' .. user
if op == 'set' then
  for _, topic in ipairs(redis.call('ZRANGE', ut, 0, -1)) do
    redis.call('ZREM', base .. ':tu:' .. topic, user)
  end
  redis.call('DEL', ut)
end
for i = 3, #ARGV do
  if op == 'remove' then
    redis.call('ZREM', ut, ARGV[i])
    redis.call('ZREM', base .. ':tu:' .. ARGV[i], user)
  else
    redis.call('ZADD', ut, 0, ARGV[i])
    redis.call('ZADD', base .. ':tu:' .. ARGV[i], 0, user)
  end
end
if redis.call('ZCARD', ut) == 0 then
  redis.call('ZREM', base .. ':users', user)
else
  redis.call('ZADD', base .. ':users', 0, user)
end
return 0
"#,
    )
});
