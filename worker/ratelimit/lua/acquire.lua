-- try_acquire: check every limit of a key, then take from all of them or from none.
-- KEYS[1] cooldown  KEYS[2] requests  KEYS[3] input bucket  KEYS[4] output bucket  KEYS[5] leases
-- KEYS[6] requests over the burst window (pacing)
-- ARGV[1] reservation id  ARGV[2] period_s  ARGV[3] lease_ttl_s  ARGV[4] in_flight_poll_s
-- ARGV[5] rpm  ARGV[6] input_tpm  ARGV[7] output_tpm  ARGV[8] max_in_flight (0 = no limit)
-- ARGV[9] input tokens  ARGV[10] output tokens  ARGV[11] requests per burst window (0 = no
-- pacing, slots.burst_limit)  ARGV[12] burst window seconds
-- Returns {1, '0', ''} granted, or {0, retry_in_s, reason}.
local id = ARGV[1]
local period = tonumber(ARGV[2])
local lease_ttl = tonumber(ARGV[3])
local poll = tonumber(ARGV[4])
local rpm = tonumber(ARGV[5])
local input_tpm = tonumber(ARGV[6])
local output_tpm = tonumber(ARGV[7])
local max_in_flight = tonumber(ARGV[8])
local input_cost = tonumber(ARGV[9])
local output_cost = tonumber(ARGV[10])
local burst = tonumber(ARGV[11] or '0')
local burst_s = tonumber(ARGV[12] or '0')

-- The longest refusal wins: all limits must pass at once, so nothing sooner can succeed.
local wait, reason = 0, ''
local function refuse(seconds, why)
  if seconds > wait then
    wait, reason = seconds, why
  end
end

local cooldown_until = tonumber(redis.call('GET', KEYS[1]) or '0')
if cooldown_until > now then
  refuse(cooldown_until - now, 'cooldown')
end
if rpm > 0 then
  refuse(slot_wait(KEYS[2], rpm), 'rpm')
  if burst > 0 then
    refuse(slot_wait(KEYS[6], burst), 'rpm')
  end
end
local input_level, output_level = 0, 0
if input_tpm > 0 then
  input_level = bucket_level(KEYS[3], input_tpm, period)
  refuse(bucket_wait(input_level, input_tpm, period, input_cost), 'input_tpm')
end
if output_tpm > 0 then
  output_level = bucket_level(KEYS[4], output_tpm, period)
  refuse(bucket_wait(output_level, output_tpm, period, output_cost), 'output_tpm')
end
if max_in_flight > 0 then
  local lease_wait = slot_wait(KEYS[5], max_in_flight)
  if lease_wait > 0 then
    -- A lease ends when its call does; its expiry is only the latest that can happen.
    refuse(math.min(lease_wait, poll), 'in_flight')
  end
end
if reason ~= '' then
  return {0, num(wait), reason}
end

if rpm > 0 then
  redis.call('ZADD', KEYS[2], num(now + period), id)
  expire_after(KEYS[2], period)
  if burst > 0 then
    redis.call('ZADD', KEYS[6], num(now + burst_s), id)
    expire_after(KEYS[6], burst_s)
  end
end
if input_tpm > 0 then
  bucket_store(KEYS[3], input_tpm, period, input_level - input_cost)
end
if output_tpm > 0 then
  bucket_store(KEYS[4], output_tpm, period, output_level - output_cost)
end
if max_in_flight > 0 then
  redis.call('ZADD', KEYS[5], num(now + lease_ttl), id)
  expire_after(KEYS[5], lease_ttl)
end
return {1, '0', ''}
