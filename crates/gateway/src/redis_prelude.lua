-- The start of every Sluice Redis script: the gateway sends this file, then the
-- script's own (`limits/limits_v1.lua`, `usage/budgets_v1.lua`) as one text, since
-- scripts sent by EVAL cannot share code inside Redis.

-- Redis < 5 replicates scripts verbatim unless told otherwise, and TIME would then make
-- replicas diverge; from Redis 7 on this call does nothing.
if redis.replicate_commands then
  redis.replicate_commands()
end

-- A global is a table lookup every time a script names it, a local is a register: what
-- the scripts' loops use is made local here (the scripts add their own).
local KEYS, ARGV, redis = KEYS, ARGV, redis
local tonumber, pairs, ipairs, unpack = tonumber, pairs, ipairs, unpack

-- ARGV[i] as a number, each distinct string parsed once a call: most of a batch's
-- arguments repeat (every request names the same periods, increments, thresholds),
-- and a table lookup costs less than Lua's string-to-number parse. With both, a
-- combined check of 11 requests cost Redis 1.30M instructions instead of 1.56M, a
-- budget charge of 11 354k instead of 448k (callgrind; bench/RESULTS.md, Run 31).
local parsed = {}
local function num(i)
  local s = ARGV[i]
  local n = parsed[s]
  if n == nil then
    n = tonumber(s)
    if n ~= nil then
      parsed[s] = n
    end
  end
  return n
end

-- A whole number as Redis and the gateway read it: '%d' is exact below 2^53, where
-- Lua's own tostring keeps only 14 significant digits.
local format, concat = string.format, table.concat
local function int(n)
  return format('%d', n)
end
