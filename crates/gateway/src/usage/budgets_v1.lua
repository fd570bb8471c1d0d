-- budgets_v1: Sluice's budget counters, version 1. Keys live under `<prefix>budget:v1:`;
-- a change to what a key holds is a new file (budgets_v2.lua) with new keys, so two
-- versions running side by side during a rollout never read each other's numbers. A new
-- way to call it (as `each` was added) keeps the keys' meaning and needs none.
--
-- Each key holds one counter's spend (one rule, one period, one key / owner / end user /
-- feature) in integer nano-dollars. Keys are created only by the gateway, with
-- `SET key <spend from the request log> NX PXAT <period end + grace>`, so that two
-- instances initialising one counter at once agree on its start; this script never
-- creates one.
--
-- charge: KEYS = the counters one request counts against.
--   ARGV[1] = amount (nano-dollars, > 0), then per key: expire_at_ms, n, then n
--   thresholds (absolute nano-dollars, ascending).
--   Or ARGV[1] = 'each', then per key: its own amount (> 0), expire_at_ms, n, then n
--   thresholds: several requests' charges summed per counter (`[redis] sync`).
--   A missing key charges nothing anywhere: returns {0, i, ...} with the 1-based index
--   of every missing key, so the caller initialises them and calls again.
--   Otherwise returns {1, spend_1, crossed_1, spend_2, crossed_2, ...}: each counter's
--   spend after the charge and a bit mask of the thresholds this charge crossed
--   (bit j-1 for threshold j, when old < t_j <= new). INCRBY is atomic, so across any
--   number of instances exactly one charge crosses each threshold of a period.
--
-- Precision: INCRBY works on 64-bit integers; Lua numbers are doubles, exact below 2^53
-- nano-dollars (about $9 million per counter and period). Past that the comparisons
-- are off by at most a few nano-dollars, far below any threshold's meaning.

if redis.replicate_commands then
  redis.replicate_commands()
end

local each = ARGV[1] == 'each'

local missing = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    missing[#missing + 1] = i
  end
end
if #missing > 0 then
  local reply = {0}
  for _, i in ipairs(missing) do
    reply[#reply + 1] = i
  end
  return reply
end

local reply = {1}
local a = 2
for _, key in ipairs(KEYS) do
  -- The amount goes to INCRBY as the caller wrote it: a Lua number would be formatted
  -- with 14 significant digits.
  local amount = ARGV[1]
  if each then
    amount = ARGV[a]
    a = a + 1
  end
  local expire_at = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  local new = redis.call('INCRBY', key, amount)
  local old = new - tonumber(amount)
  local mask = 0
  for j = 1, n do
    local t = tonumber(ARGV[a + 1 + j])
    if old < t and t <= new then
      mask = mask + 2 ^ (j - 1)
    end
  end
  -- Set when the key was made; this only repairs a key that lost its expiry.
  if redis.call('PTTL', key) == -1 then
    redis.call('PEXPIREAT', key, expire_at)
  end
  reply[#reply + 1] = new
  reply[#reply + 1] = mask
  a = a + 2 + n
end
return reply
