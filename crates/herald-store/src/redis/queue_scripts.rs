//! The Lua scripts of the Redis outbound queue: every change that touches more than one key
//! is one script, so it is atomic however many nodes call at once.
//!
//! Owns: the queue's key layout (below) and the scripts over it. `KEYS[1]` of every script is
//! the push base (`<prefix>:{push}`, see [`super::scripts::Keys::push`]); the scripts build
//! every other key from it, so all of them share its hash tag and its Redis.
//!
//! Key layout under the base `B`:
//! - `B:j:<id>` hash, one per job: `d` the fields a job never changes (kind, group,
//!   recipient, expire_at (`''`: none), order key (`-`: none, `+<key>`, `=`: a batch's
//!   held member, never in `ready` until settled for a retry), packed with
//!   `cmsgpack`: one field instead of five makes the hash cheaper to write and read), `p`
//!   payload (emptied once final), `nb` not_before, `s` state name, `a` attempts, `e` reason,
//!   `u` updated_at;
//! - `B:ready:<kind>` zset, queued jobs a claim may take, by `not_before` (a job waiting behind
//!   an earlier one of its `order_key` is not in it);
//! - `B:leased:<kind>` zset, jobs being sent, by the end of their lease;
//! - `B:line:<order key>` list, the unfinished jobs of a key in enqueue order (only the head
//!   may be in `ready` or `leased`);
//! - `B:all`, `B:g:<group>`, `B:r:<recipient>` zsets of ids (score 0: lexicographic, for
//!   paging statuses by id); `all` holds exactly the jobs that exist;
//! - `B:done` zset, final jobs by `updated_at` (what `purge` removes);
//! - `B:kinds` set of every kind ever enqueued (for `due`);
//! - `B:rate:<window ms>:<window end>:<key>` counter of one rate window (expires by itself).
//!
//! Speed: a script's cost is mostly its `redis.call`s, so per job the scripts make about two
//! (enqueue: the hash and the recipient index; claim and finish: read and write the hash),
//! and gather the sorted-set changes of a whole batch into a few variadic calls.
//!
//! May touch: nothing; the queue runs the scripts.

use std::sync::LazyLock;

use redis::Script;

/// Helpers every queue script starts with.
const PRELUDE: &str = r#"
local base = KEYS[1]
local function jk(id) return base .. ':j:' .. id end

-- `cmd key args...` in slices: Lua's unpack holds at most ~8000 values (an even slice size
-- keeps score-member pairs together).
local function bulk(cmd, key, args)
  for i = 1, #args, 1000 do
    redis.call(cmd, key, unpack(args, i, math.min(i + 999, #args)))
  end
end

-- Appends to the list kept under `name` in `lists`.
local function push(lists, name, ...)
  local list = lists[name]
  if not list then
    list = {}
    lists[name] = list
  end
  for _, value in ipairs({...}) do list[#list + 1] = value end
end

-- Final jobs of this call, as `updated_at, id` pairs for `B:done` (written by flush_done).
local done = {}
local function flush_done()
  if #done > 0 then bulk('ZADD', base .. ':done', done) end
end

-- A job that became final leaves its order line; when it was the first, the next one (still
-- queued: only the first of a line is ever claimed) becomes claimable.
local function leave_line(order, id)
  if string.sub(order, 1, 1) ~= '+' then return end
  local line = base .. ':line:' .. string.sub(order, 2)
  local head = redis.call('LINDEX', line, 0)
  redis.call('LREM', line, 1, id)
  if head == id then
    local nxt = redis.call('LINDEX', line, 0)
    if nxt then
      local f = redis.call('HMGET', jk(nxt), 'd', 'nb', 's')
      if f[3] == 'queued' then
        local kind = cmsgpack.unpack(f[1])
        redis.call('ZADD', base .. ':ready:' .. kind, f[2], nxt)
      end
    end
  end
end

-- Makes a job final: its state and reason kept until purge, its payload dropped (no status
-- needs it, and it is most of a job's memory). The caller takes it out of ready/leased.
local function finalize(id, order, state, reason, now)
  redis.call('HSET', jk(id), 's', state, 'e', reason, 'u', now, 'p', '')
  done[#done + 1] = now
  done[#done + 1] = id
  leave_line(order, id)
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// ARGV: now, mode (`jobs`, or `batch`: the first job is a batch, the rest its held members
/// with order key `=`; nothing is added when the batch is known, and the batch only when a
/// member was new), then 8 per job: id, kind, group, recipient, payload, not_before,
/// expire_at (`''`: none), order key (`-`: none, `+<key>`, `=`). Returns how many jobs (in
/// batch mode: members) were new.
pub(crate) static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local now, batch = ARGV[1], ARGV[2] == 'batch'
local ids = {}
for i = 3, #ARGV, 8 do ids[#ids + 1] = ARGV[i] end
if batch and redis.call('ZSCORE', base .. ':all', ids[1]) then return 0 end
-- Which ids are known, in one call per thousand (`all` holds exactly the existing jobs).
local known = {}
for i = 1, #ids, 1000 do
  local scores = redis.call('ZMSCORE', base .. ':all', unpack(ids, i, math.min(i + 999, #ids)))
  for k = 1, #scores do known[i + k - 1] = scores[k] end
end
local added, all, groups, ready, seen = 0, {}, {}, {}, {}
local function add(j)
  local id = ids[j]
  if known[j] or seen[id] then return false end
  seen[id] = true
  local i = 3 + (j - 1) * 8
  local kind, group, recipient, nb, order = ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+5], ARGV[i+7]
  redis.call('HSET', jk(id), 'd', cmsgpack.pack(kind, group, recipient, ARGV[i+6], order),
    'p', ARGV[i+4], 'nb', nb, 's', 'queued', 'a', 0, 'e', '', 'u', now)
  redis.call('ZADD', base .. ':r:' .. recipient, 0, id)
  all[#all + 1] = 0
  all[#all + 1] = id
  push(groups, group, 0, id)
  local first = order ~= '='
  if string.sub(order, 1, 1) == '+' then
    first = redis.call('RPUSH', base .. ':line:' .. string.sub(order, 2), id) == 1
  end
  if first then push(ready, kind, nb, id) end
  return true
end
local from = 1
if batch then from = 2 end
for j = from, #ids do
  if add(j) then added = added + 1 end
end
if batch and added > 0 then add(1) end
if #all > 0 then bulk('ZADD', base .. ':all', all) end
for group, list in pairs(groups) do bulk('ZADD', base .. ':g:' .. group, list) end
for kind, list in pairs(ready) do
  bulk('ZADD', base .. ':ready:' .. kind, list)
  redis.call('SADD', base .. ':kinds', kind)
end
return added
"#,
    )
});

/// ARGV: ids. Returns those of batch members still held (queued with order key `=`).
pub(crate) static HELD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local out = {}
for _, id in ipairs(ARGV) do
  local f = redis.call('HMGET', jk(id), 's', 'd')
  if f[1] == 'queued' then
    local _, _, _, _, order = cmsgpack.unpack(f[2])
    if order == '=' then out[#out + 1] = id end
  end
end
return out
"#,
    )
});

/// ARGV: now, then 5 per member: id, outcome (`sent`, `retry`, `failed`, `expired`), reason,
/// retry time, payload (for a retry). Settles members that are still held: a retry makes the
/// member an ordinary queued job (order key `-`) in `ready` at its retry time with the
/// payload; anything else makes it final. The first attempt is counted either way.
pub(crate) static FINISH_MEMBERS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local now = ARGV[1]
local ready = {}
for i = 2, #ARGV, 5 do
  local id = ARGV[i]
  local key = jk(id)
  local f = redis.call('HMGET', key, 's', 'd')
  if f[1] == 'queued' then
    local kind, group, recipient, expire_at, order = cmsgpack.unpack(f[2])
    if order == '=' then
      if ARGV[i + 1] == 'retry' then
        redis.call('HSET', key, 'd', cmsgpack.pack(kind, group, recipient, expire_at, '-'),
          'nb', ARGV[i + 3], 'e', ARGV[i + 2], 'a', 1, 'u', now, 'p', ARGV[i + 4])
        push(ready, kind, ARGV[i + 3], id)
      else
        redis.call('HSET', key, 'a', 1)
        finalize(id, order, ARGV[i + 1], ARGV[i + 2], now)
      end
    end
  end
end
for kind, list in pairs(ready) do
  bulk('ZADD', base .. ':ready:' .. kind, list)
  redis.call('SADD', base .. ':kinds', kind)
end
flush_done()
return 0
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
-- dropped) before the next round reads it again, so the loop ends.
while claimed < limit do
  local want = limit - claimed
  local r = redis.call('ZRANGEBYSCORE', ready, '-inf', ARGV[3], 'WITHSCORES', 'LIMIT', 0, want)
  local l = redis.call('ZRANGEBYSCORE', leased, '-inf', ARGV[3], 'WITHSCORES', 'LIMIT', 0, want)
  if #r == 0 and #l == 0 then break end
  local unready, unleased, leases = {}, {}, {}
  local ri, li, taken = 1, 1, 0
  while taken < want and (ri <= #r or li <= #l) do
    local id, from_ready
    if li > #l or (ri <= #r and tonumber(r[ri + 1]) <= tonumber(l[li + 1])) then
      id, from_ready = r[ri], true
      ri = ri + 2
      unready[#unready + 1] = id
    else
      id, from_ready = l[li], false
      li = li + 2
    end
    taken = taken + 1
    local key = jk(id)
    local f = redis.call('HMGET', key, 'd', 'p', 'nb', 'e', 's', 'a')
    local expected = 'sending'
    if from_ready then expected = 'queued' end
    if f[5] ~= expected then
      -- An index entry without its job: drop it.
      if not from_ready then unleased[#unleased + 1] = id end
    else
      local _, group, recipient, expire_at, order = cmsgpack.unpack(f[1])
      if expire_at ~= '' and tonumber(expire_at) < now then
        if not from_ready then unleased[#unleased + 1] = id end
        finalize(id, order, 'expired', 'expired before it could be sent', ARGV[3])
      else
        local reason = f[4]
        -- Its holder died or stalled: say so to the next attempt and in the status.
        if not from_ready then reason = 'lease expired' end
        local attempt = tostring(tonumber(f[6]) + 1)
        redis.call('HSET', key, 's', 'sending', 'a', attempt, 'e', reason, 'u', ARGV[3])
        -- A lapsed lease is renewed in place: ZADD moves its score.
        leases[#leases + 1] = lease_end
        leases[#leases + 1] = id
        local n = #out
        out[n + 1] = id
        out[n + 2] = group
        out[n + 3] = recipient
        out[n + 4] = f[2]
        out[n + 5] = f[3]
        out[n + 6] = expire_at
        out[n + 7] = attempt
        out[n + 8] = reason
        claimed = claimed + 1
      end
    end
  end
  if #unready > 0 then bulk('ZREM', ready, unready) end
  if #unleased > 0 then bulk('ZREM', leased, unleased) end
  if #leases > 0 then bulk('ZADD', leased, leases) end
end
flush_done()
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
local unleased, ready = {}, {}
for i = 2, #ARGV, 5 do
  local id = ARGV[i]
  local key = jk(id)
  local f = redis.call('HMGET', key, 's', 'a', 'd')
  if f[1] == 'sending' and f[2] == ARGV[i + 1] then
    local kind, _, _, _, order = cmsgpack.unpack(f[3])
    push(unleased, kind, id)
    if ARGV[i + 2] == 'retry' then
      redis.call('HSET', key, 's', 'queued', 'nb', ARGV[i + 4], 'e', ARGV[i + 3], 'u', now)
      -- It was claimed, so it is the first of its line: it may go straight back.
      push(ready, kind, ARGV[i + 4], id)
    else
      finalize(id, order, ARGV[i + 2], ARGV[i + 3], now)
    end
  end
end
for kind, ids in pairs(unleased) do bulk('ZREM', base .. ':leased:' .. kind, ids) end
for kind, list in pairs(ready) do bulk('ZADD', base .. ':ready:' .. kind, list) end
flush_done()
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
local count, unready = 0, {}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', jk(id), 's', 'd')
  if f[1] == 'queued' then
    local kind, _, _, _, order = cmsgpack.unpack(f[2])
    -- Out of ready before finalize: leaving its line may put the next job of the line in.
    redis.call('ZREM', base .. ':ready:' .. kind, id)
    finalize(id, order, 'cancelled', 'cancelled', ARGV[2])
    count = count + 1
  end
end
flush_done()
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
  local f = redis.call('HMGET', key, 'd', 's')
  local g, r
  if f[1] then _, g, r = cmsgpack.unpack(f[1]) end
  if g == group and r == recipient then
    if f[2] == 'interacted' then
      matched = 1
    elseif f[2] == 'sent' or f[2] == 'delivered' then
      matched = 1
      -- Interacted wins: a delivered report leaves an interacted job alone (above).
      if f[2] ~= state then
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
  local f = redis.call('HMGET', jk(id), 'd', 's', 'a', 'e', 'u')
  if f[1] then
    local kind, g, r = cmsgpack.unpack(f[1])
    if (group == '' or g == group) and (recipient == '' or r == recipient)
       and (states == '' or string.find(states, ',' .. f[2] .. ',', 1, true)) then
      matches = matches + 1
      if not count_only then
        local n = #out
        out[n + 1] = id
        out[n + 2] = kind
        out[n + 3] = g
        out[n + 4] = r
        out[n + 5] = f[2]
        out[n + 6] = f[3]
        out[n + 7] = f[4]
        out[n + 8] = f[5]
      end
      -- Enough for the caller: the next call starts after this one.
      if matches >= want then
        last = id
        break
      end
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
local ids = redis.call('ZRANGEBYSCORE', base .. ':done', '-inf', '(' .. ARGV[1], 'LIMIT', 0,
  tonumber(ARGV[2]))
if #ids == 0 then return 0 end
local keys, groups, recipients = {}, {}, {}
for _, id in ipairs(ids) do
  local key = jk(id)
  local d = redis.call('HGET', key, 'd')
  if d then
    local _, group, recipient = cmsgpack.unpack(d)
    push(groups, group, id)
    push(recipients, recipient, id)
  end
  keys[#keys + 1] = key
end
for i = 1, #keys, 1000 do redis.call('DEL', unpack(keys, i, math.min(i + 999, #keys))) end
bulk('ZREM', base .. ':all', ids)
bulk('ZREM', base .. ':done', ids)
for group, list in pairs(groups) do bulk('ZREM', base .. ':g:' .. group, list) end
for recipient, list in pairs(recipients) do bulk('ZREM', base .. ':r:' .. recipient, list) end
return #ids
"#,
    )
});
/// KEYS[2]: the counter of one rate window. ARGV: limit, how long the counter lives (ms).
/// Counts one use unless the window is full (a use over the limit is not counted, so a
/// later call with a higher limit sees only the uses that went through). Returns 1 when
/// the use counted.
pub(crate) static TAKE_RATE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if used >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
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
