//! The Lua scripts of the Redis outbound queue: every change that touches more than one key
//! is one script, so it is atomic however many nodes call at once.
//!
//! Owns: the queue's key layout (below) and the scripts over it. `KEYS[1]` of every script is
//! the push base (`<prefix>:{push}`, see [`super::scripts::Keys::push`]); the scripts build
//! every other key from it, so all of them share its hash tag and its Redis.
//!
//! Key layout under the base `B`:
//! - `B:j:<id>` hash, one per job: `k` kind, `g` group, `r` recipient, `p` payload (dropped
//!   once final), `nb` not_before, `x` expire_at (`''`: none), `o` order key (absent: none),
//!   `s` state name, `a` attempts, `e` reason, `u` updated_at;
//! - `B:ready:<kind>` zset, queued jobs a claim may take, by `not_before` (a job waiting behind
//!   an earlier one of its `order_key` is not in it);
//! - `B:leased:<kind>` zset, jobs being sent, by the end of their lease;
//! - `B:line:<order key>` list, the unfinished jobs of a key in enqueue order (only the head
//!   may be in `ready` or `leased`);
//! - `B:all`, `B:g:<group>`, `B:r:<recipient>` zsets of ids (score 0: lexicographic, for
//!   paging statuses by id);
//! - `B:done` zset, final jobs by `updated_at` (what `purge` removes);
//! - `B:kinds` set of every kind ever enqueued (for `due`);
//! - `B:rate:<window ms>:<window end>:<key>` counter of one rate window (expires by itself).
//!
//! May touch: nothing; the queue runs the scripts.

use std::sync::LazyLock;

use redis::Script;

/// Helpers every queue script starts with.
const PRELUDE: &str = r#"
local base = KEYS[1]
local function jk(id) return base .. ':j:' .. id end

-- A job that became final leaves its order line; when it was the first, the next one (still
-- queued: only the first of a line is ever claimed) becomes claimable.
local function leave_line(order_key, id)
  if not order_key then return end
  local line = base .. ':line:' .. order_key
  local head = redis.call('LINDEX', line, 0)
  redis.call('LREM', line, 1, id)
  if head == id then
    local nxt = redis.call('LINDEX', line, 0)
    if nxt then
      local f = redis.call('HMGET', jk(nxt), 'k', 'nb', 's')
      if f[3] == 'queued' then
        redis.call('ZADD', base .. ':ready:' .. f[1], f[2], nxt)
      end
    end
  end
end

-- Makes a job final: its state and reason kept until purge, its payload dropped (no status
-- needs it, and it is most of a job's memory).
local function finalize(id, order_key, state, reason, now)
  local key = jk(id)
  redis.call('HSET', key, 's', state, 'e', reason, 'u', now)
  redis.call('HDEL', key, 'p')
  redis.call('ZADD', base .. ':done', now, id)
  leave_line(order_key, id)
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// ARGV: now, then 8 per job: id, kind, group, recipient, payload, not_before, expire_at
/// (`''`: none), order key (`-`: none, `+<key>`). Returns how many jobs were new.
pub(crate) static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local now = ARGV[1]
local added = 0
local kinds = {}
for i = 2, #ARGV, 8 do
  local id = ARGV[i]
  local key = jk(id)
  if redis.call('EXISTS', key) == 0 then
    local kind, group, recipient, nb, order = ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+5], ARGV[i+7]
    redis.call('HSET', key, 'k', kind, 'g', group, 'r', recipient, 'p', ARGV[i+4], 'nb', nb,
      'x', ARGV[i+6], 's', 'queued', 'a', 0, 'e', '', 'u', now)
    redis.call('ZADD', base .. ':all', 0, id)
    redis.call('ZADD', base .. ':g:' .. group, 0, id)
    redis.call('ZADD', base .. ':r:' .. recipient, 0, id)
    kinds[kind] = true
    local first = true
    if string.sub(order, 1, 1) == '+' then
      local line = string.sub(order, 2)
      redis.call('HSET', key, 'o', line)
      first = redis.call('RPUSH', base .. ':line:' .. line, id) == 1
    end
    if first then redis.call('ZADD', base .. ':ready:' .. kind, nb, id) end
    added = added + 1
  end
end
for kind in pairs(kinds) do redis.call('SADD', base .. ':kinds', kind) end
return added
"#,
    )
});

/// ARGV: kind, limit, now, lease end (after now). Takes the due jobs of `ready` and the
/// lapsed ones of `leased` together, oldest due time first; expired jobs it meets become
/// final and do not count against the limit. Returns [`CLAIM_FIELDS`] fields per claimed
/// job: id, group, recipient, payload, not_before, expire_at (`''`: none), attempt, last
/// error.
pub(crate) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local kind, limit, now, lease_end = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if tonumber(lease_end) <= now then
  return redis.error_reply('the lease must end after now')
end
local ready = base .. ':ready:' .. kind
local leased = base .. ':leased:' .. kind
local out = {}
local claimed = 0
-- Every job looked at leaves the due range (leased past now, expired, or a stale entry
-- dropped), so the loop ends.
while claimed < limit do
  local want = limit - claimed
  local r = redis.call('ZRANGEBYSCORE', ready, '-inf', ARGV[3], 'WITHSCORES', 'LIMIT', 0, want)
  local l = redis.call('ZRANGEBYSCORE', leased, '-inf', ARGV[3], 'WITHSCORES', 'LIMIT', 0, want)
  if #r == 0 and #l == 0 then break end
  local ri, li, taken = 1, 1, 0
  while taken < want and (ri <= #r or li <= #l) do
    local id, from
    if li > #l or (ri <= #r and tonumber(r[ri + 1]) <= tonumber(l[li + 1])) then
      id, from = r[ri], ready
      ri = ri + 2
    else
      id, from = l[li], leased
      li = li + 2
    end
    taken = taken + 1
    redis.call('ZREM', from, id)
    local key = jk(id)
    local f = redis.call('HMGET', key, 'g', 'r', 'p', 'nb', 'x', 'o', 'e', 's')
    local expected = 'queued'
    if from == leased then expected = 'sending' end
    if f[8] == expected then
      if f[5] ~= '' and tonumber(f[5]) < now then
        finalize(id, f[6], 'expired', 'expired before it could be sent', ARGV[3])
      else
        local reason = f[7]
        -- Its holder died or stalled: say so to the next attempt and in the status.
        if from == leased then reason = 'lease expired' end
        local attempt = redis.call('HINCRBY', key, 'a', 1)
        redis.call('HSET', key, 's', 'sending', 'e', reason, 'u', ARGV[3])
        redis.call('ZADD', leased, lease_end, id)
        local n = #out
        out[n + 1] = id
        out[n + 2] = f[1]
        out[n + 3] = f[2]
        out[n + 4] = f[3] or ''
        out[n + 5] = f[4]
        out[n + 6] = f[5]
        out[n + 7] = tostring(attempt)
        out[n + 8] = reason
        claimed = claimed + 1
      end
    end
  end
end
return out
"#,
    )
});

/// Fields per job in [`CLAIM`]'s reply.
pub(crate) const CLAIM_FIELDS: usize = 8;

/// ARGV: now, then 5 per attempt: id, attempt, outcome (`sent`, `retry`, `failed`,
/// `expired`), reason, retry time. Applies only where the job is being sent by that attempt.
pub(crate) static FINISH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local now = ARGV[1]
for i = 2, #ARGV, 5 do
  local id = ARGV[i]
  local key = jk(id)
  local f = redis.call('HMGET', key, 's', 'a', 'k', 'o')
  if f[1] == 'sending' and f[2] == ARGV[i + 1] then
    redis.call('ZREM', base .. ':leased:' .. f[3], id)
    if ARGV[i + 2] == 'retry' then
      redis.call('HSET', key, 's', 'queued', 'nb', ARGV[i + 4], 'e', ARGV[i + 3], 'u', now)
      -- It was claimed, so it is the first of its line: it may go straight back.
      redis.call('ZADD', base .. ':ready:' .. f[3], ARGV[i + 4], id)
    else
      finalize(id, f[4], ARGV[i + 2], ARGV[i + 3], now)
    end
  end
end
return 0
"#,
    )
});

/// ARGV: group, now, lexicographic start (`-` or `(<id>`), most ids to look at. Cancels the
/// queued jobs among them. Returns `{cancelled, last id looked at ('' when the group has no
/// more)}`.
pub(crate) static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local budget = tonumber(ARGV[4])
local ids = redis.call('ZRANGEBYLEX', base .. ':g:' .. ARGV[1], ARGV[3], '+', 'LIMIT', 0, budget)
local count = 0
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', jk(id), 's', 'k', 'o')
  if f[1] == 'queued' then
    redis.call('ZREM', base .. ':ready:' .. f[2], id)
    finalize(id, f[3], 'cancelled', 'cancelled', ARGV[2])
    count = count + 1
  end
end
local last = ''
if #ids == budget then last = ids[#ids] end
return {count, last}
"#,
    )
});

/// ARGV: group, recipient, reported state (`delivered` or `interacted`), now. Walks the
/// smaller of the group's and the recipient's ids. Returns 1 when a sent, delivered or
/// interacted job of both matched.
pub(crate) static REPORT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local group, recipient, state, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local gk, rk = base .. ':g:' .. group, base .. ':r:' .. recipient
local smaller = gk
if redis.call('ZCARD', rk) < redis.call('ZCARD', gk) then smaller = rk end
local matched = 0
for _, id in ipairs(redis.call('ZRANGE', smaller, 0, -1)) do
  local key = jk(id)
  local f = redis.call('HMGET', key, 'g', 'r', 's')
  if f[1] == group and f[2] == recipient then
    if f[3] == 'interacted' then
      matched = 1
    elseif f[3] == 'sent' or f[3] == 'delivered' then
      matched = 1
      -- Interacted wins: a delivered report leaves an interacted job alone (above).
      if f[3] ~= state then
        redis.call('HSET', key, 's', state, 'u', now)
        redis.call('ZADD', base .. ':done', now, id)
      end
    end
  end
end
return matched
"#,
    )
});

/// KEYS[2]: the id index to walk (`all`, a group's or a recipient's). ARGV: lexicographic
/// start, most ids to look at, group (`''`: any), recipient (`''`: any), states
/// (`,a,b,`; `''`: any), most matches wanted, `1` to count only.
/// Returns `{last id looked at ('' when the index has no more), matches, 8 fields per match
/// unless counting: id, kind, group, recipient, state, attempts, reason, updated_at}`.
pub(crate) static STATUSES: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local budget, group, recipient, states = tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local want, count_only = tonumber(ARGV[6]), ARGV[7] == '1'
local ids = redis.call('ZRANGEBYLEX', KEYS[2], ARGV[1], '+', 'LIMIT', 0, budget)
local out = {'', 0}
local matches = 0
local last = ''
if #ids == budget then last = ids[#ids] end
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', jk(id), 'k', 'g', 'r', 's', 'a', 'e', 'u')
  if f[4] and (group == '' or f[2] == group) and (recipient == '' or f[3] == recipient)
     and (states == '' or string.find(states, ',' .. f[4] .. ',', 1, true)) then
    matches = matches + 1
    if not count_only then
      local n = #out
      out[n + 1] = id
      for i = 1, 7 do out[n + 1 + i] = f[i] end
    end
    -- Enough for the caller: the next call starts after this one.
    if matches >= want then
      last = id
      break
    end
  end
end
out[1] = last
out[2] = matches
return out
"#,
    )
});

/// Fields per status in [`STATUSES`]' reply.
pub(crate) const STATUS_FIELDS: usize = 8;

/// ARGV: before (exclusive), most jobs to remove. Removes final jobs last updated before
/// `before`, with their index entries. Returns how many.
pub(crate) static PURGE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local done = base .. ':done'
local ids = redis.call('ZRANGEBYSCORE', done, '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  local key = jk(id)
  local f = redis.call('HMGET', key, 'g', 'r')
  redis.call('DEL', key)
  redis.call('ZREM', base .. ':all', id)
  if f[1] then redis.call('ZREM', base .. ':g:' .. f[1], id) end
  if f[2] then redis.call('ZREM', base .. ':r:' .. f[2], id) end
  redis.call('ZREM', done, id)
end
return #ids
"#,
    )
});

/// ARGV: now. Returns `kind, count, …` for every kind with due jobs (queued and due, or
/// leased with the lease run out).
pub(crate) static DUE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local out = {}
for _, kind in ipairs(redis.call('SMEMBERS', base .. ':kinds')) do
  local count = redis.call('ZCOUNT', base .. ':ready:' .. kind, '-inf', ARGV[1])
    + redis.call('ZCOUNT', base .. ':leased:' .. kind, '-inf', ARGV[1])
  if count > 0 then
    out[#out + 1] = kind
    out[#out + 1] = tostring(count)
  end
end
return out
"#,
    )
});
