-- budgets_v1: Sluice's budget counters, version 1. Keys live under `<prefix>budget:v1:`;
-- a change to what a key holds is a new file (budgets_v2.lua) with new keys, so two
-- versions running side by side during a rollout never read each other's numbers. A new
-- way to call it (as `each` and `batch` were added, and a one-request form dropped for
-- `batch`) keeps the keys' meaning and needs none.
--
-- Each key holds one counter's spend (one rule, one period, one key / owner / end user /
-- feature) in integer nano-dollars. Keys are created only by the gateway, with
-- `SET key <spend from the request log> NX PXAT <period end + grace>`, so that two
-- instances initialising one counter at once agree on its start; this script never
-- creates one.
--
-- Two ways to call it, each with KEYS = the counters charged, each once:
--   ARGV[1] = 'batch': several requests' charges, run as separate calls back to back
--   would run (the gateway sends the charges that arrive while one call is on its way
--   together). Then per key: the sum charged to it (> 0), expire_at_ms, n, then n
--   thresholds (absolute nano-dollars, ascending); then the number of charges, then per
--   charge: its amount (> 0), c, then the 1-based indices of its c keys.
--   Returns {1, charge_1, charge_2, ...}, each charge the string 'spend_1 crossed_1
--   spend_2 crossed_2 ...' (decimal, one space apart; one reply value, not two a key,
--   which the gateway reads for less) for its keys in its order: the counter's spend
--   after that charge and a bit mask of the thresholds that charge crossed (bit j-1
--   for threshold j, when old < t_j <= new).
--   ARGV[1] = 'each': charges already summed per counter (`[redis] sync`). Then per key:
--   its amount (> 0), expire_at_ms, n, then n thresholds. Returns {1, spend_1,
--   crossed_1, spend_2, crossed_2, ...} for the sums.
--   Either way, a missing key charges nothing anywhere: returns {0, i, ...} with the
--   1-based index of every missing key, so the caller initialises them and calls
--   again. INCRBY is atomic, so across any number of instances exactly one charge
--   crosses each threshold of a period.
--
-- Precision: INCRBY works on 64-bit integers; Lua numbers are doubles, exact below 2^53
-- nano-dollars (about $9 million per counter and period). Past that the comparisons
-- are off by at most a few nano-dollars, far below any threshold's meaning.

-- Runs after ../redis_prelude.lua (KEYS, ARGV, redis, tonumber, ipairs, concat as
-- locals; `num`, ARGV[i] as a number, each distinct string parsed once a call: a
-- batch's thresholds are read once per charge of each key; `int`).

-- One PTTL a key says all the charge needs: -2, the key is missing; -1, it lost its
-- expiry (set when the key was made; only something outside Sluice removes it), which
-- the charge below repairs. (An EXISTS first and a PTTL after the INCRBY was a call a
-- key more.)
local missing, persistent = {}, {}
for i, key in ipairs(KEYS) do
  local ttl = redis.call('PTTL', key)
  if ttl == -2 then
    missing[#missing + 1] = i
  elseif ttl == -1 then
    persistent[i] = true
  end
end
if #missing > 0 then
  local reply = {0}
  for _, i in ipairs(missing) do
    reply[#reply + 1] = i
  end
  return reply
end

-- Add `amount` (as the caller wrote it: a Lua number would be formatted with 14
-- significant digits) to KEYS[i]; repair a lost expiry. Returns the spend before.
local function add(i, amount, expire_at)
  local new = redis.call('INCRBY', KEYS[i], amount)
  if persistent[i] then
    redis.call('PEXPIREAT', KEYS[i], expire_at)
  end
  return new - tonumber(amount)
end

-- The thresholds (ARGV[a + 1 .. a + n]) a move from `old` to `new` crossed, as a mask.
local function crossed(a, n, old, new)
  local mask = 0
  for j = 1, n do
    local t = num(a + j)
    if old < t and t <= new then
      mask = mask + 2 ^ (j - 1)
    end
  end
  return mask
end

local reply = {1}
local a = 2
if ARGV[1] == 'batch' then
  -- Per key: the spend before this batch, and where its thresholds are in ARGV.
  local spend, at, count = {}, {}, {}
  for i = 1, #KEYS do
    local n = num(a + 2)
    spend[i] = add(i, ARGV[a], ARGV[a + 1])
    at[i], count[i] = a + 2, n
    a = a + 3 + n
  end
  local charges = num(a)
  a = a + 1
  for _ = 1, charges do
    local amount, c = num(a), num(a + 1)
    local one = {}
    for x = 1, c do
      local i = num(a + 1 + x)
      local old = spend[i]
      spend[i] = old + amount
      one[#one + 1] = int(spend[i])
      one[#one + 1] = int(crossed(at[i], count[i], old, spend[i]))
    end
    reply[#reply + 1] = concat(one, ' ')
    a = a + 2 + c
  end
  return reply
end

if ARGV[1] ~= 'each' then
  return redis.error_reply('budgets_v1: unknown operation')
end
for i = 1, #KEYS do
  local amount, expire_at, n = ARGV[a], ARGV[a + 1], num(a + 2)
  local old = add(i, amount, expire_at)
  local new = old + tonumber(amount)
  reply[#reply + 1] = new
  reply[#reply + 1] = crossed(a + 2, n, old, new)
  a = a + 3 + n
end
return reply
