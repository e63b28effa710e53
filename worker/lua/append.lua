-- Append events to a running job's stream and channel, only while the writer holds its lease:
-- a worker that lost its lease without knowing (frozen past its TTL, another worker took the
-- job over) must not extend a job that another worker now runs.
-- KEYS[1] job hash   KEYS[2] events stream   KEYS[3] job channel
-- ARGV[1] lease token   ARGV[2] stream ttl seconds, or '' to leave it   ARGV[3] n, the number
-- of job hash fields to set; then n field/value pairs; then the events' JSON, in order.
-- Returns 1, or an error reply starting LEASE_LOST (so that the write fails as a whole).
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return redis.error_reply('LEASE_LOST another worker holds the lease of this job')
end
local pairs_n = tonumber(ARGV[3])
local first_event = 4 + 2 * pairs_n
for i = first_event, #ARGV do
  redis.call('XADD', KEYS[2], '*', 'data', ARGV[i])
  redis.call('PUBLISH', KEYS[3], ARGV[i])
end
if pairs_n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4, first_event - 1))
end
if ARGV[2] ~= '' then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
