-- Renew the leases a worker process holds, and tell it which of its jobs to stop.
-- KEYS[i] job hash of the i-th job   ARGV[1] lease ttl ms   ARGV[1 + i] the i-th lease token
-- Returns, per job: 1 renewed, 2 renewed but cancellation was requested, 0 lost (another
-- worker holds the lease, or the job ended).
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'lease') == ARGV[i + 1] then
    redis.call('HSET', key, 'lease_until', until_ms)
    out[i] = redis.call('HEXISTS', key, 'cancel_requested') == 1 and 2 or 1
  else
    out[i] = 0
  end
end
return out
