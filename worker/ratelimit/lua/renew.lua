-- renew: push a live lease's expiry to lease_ttl_s from now.
-- KEYS[1] leases  ARGV[1] reservation id  ARGV[2] lease_ttl_s
-- Returns 1 when renewed, 0 when the lease had expired (it is then gone for good).
local ttl = tonumber(ARGV[2])
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', num(now + ttl), ARGV[1])
expire_after(KEYS[1], ttl)
return 1
