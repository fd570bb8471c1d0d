-- limits_v1: Sluice's rate-limit script, version 1. Its keys live under `<prefix>rl:v1:`;
-- a change to what a key holds is a new file (limits_v2.lua) with new keys, so two
-- versions running side by side during a rollout never read each other's numbers. An
-- operation may be added (as `settle` and `sync` were), dropped (as `adjust` was, a
-- one-bucket `settle`) or take new arguments (as `check` and `settle` did, to take
-- several requests at once) without one: the keys mean what they meant, and each
-- gateway runs the script text it was built with.
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

-- Runs after ../redis_prelude.lua (KEYS, ARGV, redis, tonumber, pairs, ipairs, unpack,
-- concat as locals; `num`, `int`). Local too, for the loops below:
local max, min, ceil = math.max, math.min, math.ceil

local MAX_AHEAD_US = 2 ^ 51

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Milliseconds a key must live to outlast the moment `until_us`.
local function ms_until(until_us, now)
  return int(ceil((until_us - now) / 1000) + 1)
end

-- A bucket's TAT (`tat`) moved by `inc` µs: forward ('+', a charge after the fact) or
-- back ('-', a refund; unused allowance does not carry into the future).
local function moved(tat, sign, inc, now)
  if sign == '+' then
    return min(max(tat, now) + inc, now + MAX_AHEAD_US)
  end
  return max(tat - inc, now)
end

-- Move a bucket's TAT (`tat`, as read) and write it. Returns the new TAT.
local function adjust(key, tat, sign, inc, now)
  local new_tat = moved(tat, sign, inc, now)
  if new_tat > now then
    redis.call('SET', key, int(new_tat), 'PX', ms_until(new_tat, now))
  else
    redis.call('DEL', key)
  end
  return new_tat
end

local op = ARGV[1]

if op == 'check' or op == 'settle' then
  -- One or more requests' checks (or settlements), run one after the other exactly as
  -- separate calls would run back to back at one instant: the gateway sends the ones
  -- that arrive while its previous call is on its way together. Each bucket is read
  -- once and written once, each lease set added to (or released from) once: a
  -- redis.call costs more than the Lua around it, and concurrent requests mostly name
  -- the same buckets (a key's, a tier's, the total).
  -- KEYS: each job's keys, in job order: a check's penalty key (when it names one), then
  --   its bucket keys and lease keys; a settlement's bucket keys, then lease keys.
  -- ARGV: 'check' or 'settle', the job count, then per job:
  --   check: has_penalty ('1'/'0'), n, m, then (increment_us, period_us) per charge, then
  --          (max, ttl_us, lease id) per lease;
  --   settle: '+' or '-', n, m, then increment_us per bucket, then the lease id per lease.
  -- Returns one reply per job, in order: a check's {0, penalty, pttl_ms} when
  -- penalized, else the string '1 now_us refused tat...' (refused 0-based, -1 = none;
  -- the TAT each charge started from, 0 for one at or before now), numbers in decimal
  -- separated by one space: one reply value instead of 3 + n, which the gateway reads
  -- for less; a settlement's 1.
  local check = op == 'check'
  local now = now_us()
  local count = num(2)
  -- Every bucket once, in one MGET.
  local tats, stored, buckets = {}, {}, {}
  if count == 1 then
    local n = num(4)
    local k = (check and ARGV[3] == '1') and 2 or 1
    for i = k, k + n - 1 do
      buckets[#buckets + 1] = KEYS[i]
    end
  else
    local a, k = 3, 1
    for _ = 1, count do
      local n, m = num(a + 1), num(a + 2)
      if check then
        if ARGV[a] == '1' then
          k = k + 1
        end
        a = a + 3 + 2 * n + 3 * m
      else
        a = a + 3 + n + m
      end
      for i = k, k + n - 1 do
        local key = KEYS[i]
        if stored[key] == nil then
          stored[key] = 0
          buckets[#buckets + 1] = key
        end
      end
      k = k + n + m
    end
  end
  if #buckets > 0 then
    local read = redis.call('MGET', unpack(buckets))
    for i, key in ipairs(buckets) do
      local tat = tonumber(read[i]) or 0
      tats[key], stored[key] = tat, tat
    end
  end
  -- Per lease set: the members to add ({expiry, id, ...}, one ZADD at the end) and the
  -- latest expiry among them, or the ids to release (one ZREM).
  local members, last = {}, {}
  -- The lease sets this check found empty: Redis keeps no empty set, so the ZADD below
  -- makes a new one, with no TTL yet.
  local fresh = {}
  local out = {}
  local a, k = 3, 1
  if check then
    -- Leases held per set (expired ones dropped on first sight), penalties per key.
    local held, penalties = {}, {}
    local now_s = int(now)
    for _ = 1, count do
      local n, m = num(a + 1), num(a + 2)
      local penalty = false
      if ARGV[a] == '1' then
        local key = KEYS[k]
        k = k + 1
        penalty = penalties[key]
        if penalty == nil then
          local value = redis.call('GET', key)
          penalty = value and {0, value, redis.call('PTTL', key)} or false
          penalties[key] = penalty
        end
      end
      local charges, leases = a + 3, a + 3 + 2 * n
      local lease_keys = k + n
      if penalty then
        out[#out + 1] = penalty
      else
        local reply = {'1', now_s, '-1'}
        local refused = -1
        -- This check's own moves; several charges may name one bucket.
        local mine = {}
        for i = 0, n - 1 do
          local key = KEYS[k + i]
          local inc = num(charges + 2 * i)
          local period = num(charges + 2 * i + 1)
          local tat = mine[key] or tats[key]
          -- A TAT at or before now is an idle bucket, as 0 (a bucket never charged) is:
          -- the gateway charges from max(tat, now) either way, and '0' needs no
          -- string.format (~1.5k instructions a call; 9 % of Redis's under load).
          reply[#reply + 1] = tat > now and int(tat) or '0'
          local new_tat = max(tat, now) + inc
          if new_tat <= now + period then
            mine[key] = new_tat
          else
            mine[key] = tat
            if refused < 0 then
              refused = i
            end
          end
        end
        if refused < 0 then
          local taken = {}
          for j = 0, m - 1 do
            local key = KEYS[lease_keys + j]
            local c = held[key]
            if c == nil then
              redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
              c = redis.call('ZCARD', key)
              held[key] = c
              fresh[key] = c == 0
            end
            local t = taken[key] or 0
            if c + t >= num(leases + 3 * j) then
              refused = n + j
              break
            end
            taken[key] = t + 1
          end
        end
        reply[3] = int(refused)
        if refused < 0 then
          for key, tat in pairs(mine) do
            tats[key] = tat
          end
          for j = 0, m - 1 do
            local key = KEYS[lease_keys + j]
            local expiry = now + num(leases + 3 * j + 1)
            held[key] = held[key] + 1
            local list = members[key]
            if list == nil then
              list = {}
              members[key] = list
            end
            list[#list + 1] = int(expiry)
            list[#list + 1] = ARGV[leases + 3 * j + 2]
            last[key] = max(last[key] or 0, expiry)
          end
        end
        out[#out + 1] = concat(reply, ' ')
      end
      a = leases + 3 * m
      k = k + n + m
    end
  else
    for _ = 1, count do
      local sign, n, m = ARGV[a], num(a + 1), num(a + 2)
      for i = 0, n - 1 do
        local key = KEYS[k + i]
        tats[key] = moved(tats[key], sign, num(a + 3 + i), now)
      end
      for j = 0, m - 1 do
        local key = KEYS[k + n + j]
        local list = members[key]
        if list == nil then
          list = {}
          members[key] = list
        end
        list[#list + 1] = ARGV[a + 3 + n + j]
      end
      out[#out + 1] = 1
      a = a + 3 + n + m
      k = k + n + m
    end
  end
  for _, key in ipairs(buckets) do
    local tat = tats[key]
    if tat ~= stored[key] then
      if tat > now then
        redis.call('SET', key, int(tat), 'PX', ms_until(tat, now))
      elseif stored[key] > 0 then
        redis.call('DEL', key)
      end
    end
  end
  for key, list in pairs(members) do
    if check then
      redis.call('ZADD', key, unpack(list))
      -- The set outlives its longest lease: its TTL only grows (a new set has none,
      -- so it needs no PTTL to tell).
      local want = ms_until(last[key], now)
      if fresh[key] or redis.call('PTTL', key) < tonumber(want) then
        redis.call('PEXPIRE', key, want)
      end
    else
      redis.call('ZREM', key, unpack(list))
    end
  end
  return out
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
  local n, m, p = num(2), num(3), num(4)
  local me, ttl = ARGV[5], num(6)
  local out = {now}
  local read = n > 0 and redis.call('MGET', unpack(KEYS, 1, n)) or {}
  local tats = {}
  for i = 1, n do
    local key = KEYS[i]
    local tat = tats[key] or tonumber(read[i]) or 0
    local net = num(6 + i)
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
    local held = num(6 + n + j)
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
  if count >= num(3) and redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
    -- Counting starts afresh once the penalty is over.
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
return redis.error_reply('limits_v1: unknown operation')
