-- Hand a running job back to the queue (worker shutdown): drop the lease so that the next
-- delivery starts at once, and mark it queued again. Only the lease holder may do this.
-- KEYS[1] job hash   ARGV[1] lease token   ARGV[2] attempts to record, or '' (an attempt that
-- never reached the upstream, postponed by the rate limiter, does not count)
-- Returns 1 when released, 0 when this worker did not hold the lease.
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return 0
end
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('HDEL', KEYS[1], 'lease', 'lease_until', 'worker')
-- A hand-back is not a crash: it does not count towards the delivery limit.
redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
if state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'queued')
end
if ARGV[2] and ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'attempts', ARGV[2])
end
return 1
