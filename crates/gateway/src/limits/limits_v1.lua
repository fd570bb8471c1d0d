-- limits_v1: Sluice's rate-limit script, version 1. Its keys live under `<prefix>rl:v1:`;
-- a change to what a key holds is a new file (limits_v2.lua) with new keys, so two
-- versions running side by side during a rollout never read each other's numbers. An
-- operation may be added (as `settle` and `sync` were) or dropped (as `adjust` was, a one-bucket
-- `settle`) without one: the keys mean what they meant, and each gateway runs the
-- script text it was built with.
--
-- ARGV[1] picks the operation; each is one atomic step on Redis's own clock (TIME), so
-- any number of gateways share exact limits. Layouts (KEYS / ARGV) are documented in
-- redis.rs beside the code that builds them.
--
-- Precision: Lua numbers are doubles, exact for integers below 2^53 (~9.0e15). Every
-- value here is an integer number of microseconds: now (~1.8e15 µs since the epoch), a
-- period or an increment (the caller clamps both to 2^50 µs, ~35 years, and passes an
-- increment already computed exactly in 128-bit arithmetic: cost * period for a large
-- token limit would not fit a double), and a TAT (capped at now + 2^51 below). Sums stay
-- under 2^53 until about the year 2100. The products that could lose precision
-- (remaining = free * limit / period) are not computed here: the script returns the TAT
-- each charge started from and the caller derives the bucket state exactly.
-- Numbers going back to Redis are formatted with '%d': Lua's own tostring keeps only
-- 14 significant digits. Every such number is a whole number below 2^53, so '%d' (a
-- conversion to a 64-bit integer) is exact, as '%.0f' was; '%.0f' took glibc's
-- multi-precision path, a tenth of the check's instructions.

-- Redis < 5 replicates scripts verbatim unless told otherwise, and TIME would then make
-- replicas diverge; from Redis 7 on this call does nothing.
if redis.replicate_commands then
  redis.replicate_commands()
end

local MAX_AHEAD_US = 2 ^ 51

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function int(n)
  return string.format('%d', n)
end

-- Milliseconds a key must live to outlast the moment `until_us`.
local function ms_until(until_us, now)
  return int(math.ceil((until_us - now) / 1000) + 1)
end

-- Move a bucket's TAT (`tat`, as read) by `inc` µs: forward ('+', a charge after the
-- fact) or back ('-', a refund; unused allowance does not carry into the future).
-- Returns the new TAT.
local function adjust(key, tat, sign, inc, now)
  local new_tat
  if sign == '+' then
    new_tat = math.min(math.max(tat, now) + inc, now + MAX_AHEAD_US)
  else
    new_tat = math.max(tat - inc, now)
  end
  if new_tat > now then
    redis.call('SET', key, int(new_tat), 'PX', ms_until(new_tat, now))
  else
    redis.call('DEL', key)
  end
  return new_tat
end

local op = ARGV[1]

if op == 'check' then
  -- KEYS: [penalty key if ARGV[2] == '1'], n bucket keys, m lease keys.
  -- ARGV: 'check', has_penalty, n, m, then (increment_us, period_us) per charge,
  --       then (max, ttl_us, lease id) per lease.
  -- Returns {0, penalty, pttl_ms} when penalized, else
  --         {1, now_us, refused (0-based, -1 = none), tat each charge started from...}.
  local now = now_us()
  local k = 1
  if ARGV[2] == '1' then
    local penalty = redis.call('GET', KEYS[1])
    if penalty then
      return {0, penalty, redis.call('PTTL', KEYS[1])}
    end
    k = 2
  end
  local n, m = tonumber(ARGV[3]), tonumber(ARGV[4])
  local out = {1, now, -1}
  local refused = -1
  -- Several charges may name the same bucket: each sees the ones before it.
  local tats, stored, order = {}, {}, {}
  -- Every bucket in one MGET: a redis.call costs more than the read it makes.
  local read = n > 0 and redis.call('MGET', unpack(KEYS, k, k + n - 1)) or {}
  for i = 0, n - 1 do
    local key = KEYS[k + i]
    local inc, period = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
    local tat = tats[key]
    if tat == nil then
      tat = tonumber(read[i + 1]) or 0
      stored[key] = tat
      order[#order + 1] = key
    end
    out[#out + 1] = tat
    local new_tat = math.max(tat, now) + inc
    if new_tat <= now + period then
      tats[key] = new_tat
    else
      tats[key] = tat
      if refused < 0 then
        refused = i
      end
    end
  end
  local lease_argv = 5 + 2 * n
  if refused < 0 then
    local taken = {}
    for j = 0, m - 1 do
      local key = KEYS[k + n + j]
      local max = tonumber(ARGV[lease_argv + 3 * j])
      if taken[key] == nil then
        redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
        taken[key] = 0
      end
      if redis.call('ZCARD', key) + taken[key] >= max then
        refused = n + j
        break
      end
      taken[key] = taken[key] + 1
    end
  end
  out[3] = refused
  if refused >= 0 then
    return out
  end
  for _, key in ipairs(order) do
    local tat = tats[key]
    if tat ~= stored[key] and tat > now then
      redis.call('SET', key, int(tat), 'PX', ms_until(tat, now))
    end
  end
  for j = 0, m - 1 do
    local key = KEYS[k + n + j]
    local ttl, id = tonumber(ARGV[lease_argv + 3 * j + 1]), ARGV[lease_argv + 3 * j + 2]
    redis.call('ZADD', key, int(now + ttl), id)
    -- The set outlives its longest lease: its TTL only grows (PTTL is -1 for the set
    -- this ZADD made).
    local want = ms_until(now + ttl, now)
    if redis.call('PTTL', key) < tonumber(want) then
      redis.call('PEXPIRE', key, want)
    end
  end
  return out
elseif op == 'settle' then
  -- A finished request, in one call: every bucket moved the same way, every lease
  -- released. KEYS: n bucket keys, then lease keys. ARGV: 'settle', '+' or '-', n, then
  -- increment_us per bucket, then the lease id per lease key.
  local now = now_us()
  local n = tonumber(ARGV[3])
  -- One MGET, as in check; a bucket named twice sees its first adjustment.
  local read = n > 0 and redis.call('MGET', unpack(KEYS, 1, n)) or {}
  local tats = {}
  for i = 1, n do
    local key = KEYS[i]
    local tat = tats[key] or tonumber(read[i]) or 0
    tats[key] = adjust(key, tat, ARGV[2], tonumber(ARGV[3 + i]), now)
  end
  for j = n + 1, #KEYS do
    redis.call('ZREM', KEYS[j], ARGV[3 + j])
  end
  return 1
elseif op == 'sync' then
  -- One instance's reconciliation (`[redis] sync`): what it charged and
  -- refunded on its own since its last sync goes in, everybody's state comes back.
  -- KEYS: n bucket keys, m synced-lease hashes, p penalty keys.
  -- ARGV: 'sync', n, m, p, instance id, lease_ttl_ms, then net_us per bucket (the
  --       TAT moves this instance made, signed; 0 = only read), then the leases this
  --       instance holds per hash.
  -- A synced-lease hash holds, per instance, `<id>` = leases held and `<id>@` = until
  -- when (ms on Redis's clock) that count stands without a newer sync.
  -- Returns {now_us, tat per bucket (0 = idle)..., other instances' leases per hash...,
  --          then per penalty key: value (false when none), pttl_ms}.
  local now = now_us()
  local n, m, p = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local me, ttl = ARGV[5], tonumber(ARGV[6])
  local out = {now}
  local read = n > 0 and redis.call('MGET', unpack(KEYS, 1, n)) or {}
  local tats = {}
  for i = 1, n do
    local key = KEYS[i]
    local tat = tats[key] or tonumber(read[i]) or 0
    local net = tonumber(ARGV[6 + i])
    if net > 0 then
      tat = adjust(key, tat, '+', net, now)
    elseif net < 0 then
      tat = adjust(key, tat, '-', -net, now)
    end
    tats[key] = tat
    out[#out + 1] = tat > now and tat or 0
  end
  local now_ms = math.floor(now / 1000)
  for j = 1, m do
    local key = KEYS[n + j]
    local held = tonumber(ARGV[6 + n + j])
    if held > 0 then
      redis.call('HSET', key, me, held, me .. '@', int(now_ms + ttl))
    else
      redis.call('HDEL', key, me, me .. '@')
    end
    local all = redis.call('HGETALL', key)
    local counts, untils = {}, {}
    for f = 1, #all, 2 do
      local field, value = all[f], all[f + 1]
      if string.sub(field, -1) == '@' then
        untils[string.sub(field, 1, -2)] = tonumber(value)
      else
        counts[field] = tonumber(value)
      end
    end
    local others = 0
    for id, count in pairs(counts) do
      local until_ms = untils[id] or 0
      if until_ms < now_ms then
        redis.call('HDEL', key, id, id .. '@')
      elseif id ~= me then
        others = others + count
      end
    end
    if held > 0 then
      redis.call('PEXPIRE', key, int(ttl))
    end
    out[#out + 1] = others
  end
  for k = 1, p do
    local key = KEYS[n + m + k]
    out[#out + 1] = redis.call('GET', key)
    out[#out + 1] = redis.call('PTTL', key)
  end
  return out
elseif op == 'signal' then
  -- KEYS: counter key, penalty key. ARGV: 'signal', window_ms, threshold, penalty,
  -- period_ms. Returns 1 when this signal started the penalty.
  local count = redis.call('INCR', KEYS[1])
  -- A fixed window from the first signal; a counter somehow left without a TTL gets one.
  if count == 1 or redis.call('PTTL', KEYS[1]) < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
  if count >= tonumber(ARGV[3]) and redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
    -- Counting starts afresh once the penalty is over.
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
return redis.error_reply('limits_v1: unknown operation')
