-- Shared prelude of every limiter script (the Python wrapper prepends it). The arithmetic
-- mirrors worker/ratelimit/slots.py and bucket.py: keep them in step.
-- The clock is the server's, so the hosts' clocks never matter; scripts replicate as
-- effects, so TIME is safe on replicas and in the AOF.
local server_time = redis.call('TIME')
local now = tonumber(server_time[1]) + tonumber(server_time[2]) / 1000000
local EPSILON_TOKENS = 1e-6

-- Lua's tostring keeps 14 digits, too few for epoch seconds with microseconds.
local function num(x)
  return string.format('%.17g', x)
end

-- Let a key vanish when it no longer matters, never sooner than it already would.
local function expire_after(key, seconds)
  local ms = math.ceil(seconds * 1000) + 1000
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

-- slots.wait_s: seconds until one more slot of the sorted set (score = expiry) is free.
local function slot_wait(key, limit)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now))
  local excess = redis.call('ZCARD', key) - limit
  if excess < 0 then
    return 0
  end
  local entry = redis.call('ZRANGE', key, excess, excess, 'WITHSCORES')
  return tonumber(entry[2]) - now
end

-- bucket.level_at: a missing bucket is full.
local function bucket_level(key, capacity, period)
  local state = redis.call('HMGET', key, 'level', 'updated_s')
  if not state[1] then
    return capacity
  end
  local elapsed = math.max(0, now - tonumber(state[2]))
  return math.min(capacity, tonumber(state[1]) + elapsed * capacity / period)
end

-- bucket.wait_s: a reservation beyond the capacity waits for a full bucket.
local function bucket_wait(level, capacity, period, amount)
  local need = math.min(amount, capacity)
  if level + EPSILON_TOKENS >= need then
    return 0
  end
  return (need - level) * period / capacity
end

-- Store a level, within one capacity of debt and never above full (bucket.bounded); the hash
-- expires once the bucket would be full again (missing = full).
local function bucket_store(key, capacity, period, level)
  level = math.max(-capacity, math.min(capacity, level))
  redis.call('HSET', key, 'level', num(level), 'updated_s', num(now))
  redis.call('PEXPIRE', key, math.ceil(math.max(0, capacity - level) * period / capacity * 1000) + 1000)
end
