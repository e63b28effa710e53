-- A worker's sweep of one queue's outbox: unless another worker holds the sweep lock, take
-- it, and hand out the jobs whose message waited for the broker's confirmation longer than
-- the grace, moving each one's time forward so that the next sweep leaves it alone for
-- another grace (a sweeper that dies mid-publish delays them by no more than that).
-- KEYS[1] the sweep lock   KEYS[2] the outbox (sorted set: job id -> when published)
-- ARGV[1] lock token   ARGV[2] lock ttl ms   ARGV[3] grace seconds   ARGV[4] at most this many
-- Returns the job ids (empty when there are none, or another worker sweeps).
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]),
  'LIMIT', 0, tonumber(ARGV[4]))
for _, job_id in ipairs(due) do
  redis.call('ZADD', KEYS[2], 'XX', now, job_id)
end
return due
