-- release: free the lease; give back unused tokens, or charge usage beyond the reservation.
-- KEYS[1] input bucket  KEYS[2] output bucket  KEYS[3] leases
-- ARGV[1] reservation id  ARGV[2] period_s  ARGV[3] input_tpm  ARGV[4] output_tpm (0 = no limit)
-- ARGV[5] input tokens to give back  ARGV[6] output tokens to give back (negative: charge)
-- Returns 1 when the lease was still held, else 0.
local period = tonumber(ARGV[2])
local input_tpm = tonumber(ARGV[3])
local output_tpm = tonumber(ARGV[4])
local input_delta = tonumber(ARGV[5])
local output_delta = tonumber(ARGV[6])

local held = redis.call('ZREM', KEYS[3], ARGV[1])
if input_tpm > 0 and input_delta ~= 0 then
  local level = bucket_level(KEYS[1], input_tpm, period)
  bucket_store(KEYS[1], input_tpm, period, level + input_delta)
end
if output_tpm > 0 and output_delta ~= 0 then
  local level = bucket_level(KEYS[2], output_tpm, period)
  bucket_store(KEYS[2], output_tpm, period, level + output_delta)
end
return held
