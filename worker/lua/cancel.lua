-- Cancel a job. A queued job ends `cancelled` here and now, so it never reaches the upstream
-- (the worker that later takes its message finds it ended). A running job is flagged; its
-- worker closes the upstream stream and ends it. An ended job is left alone.
-- KEYS[1] job hash   KEYS[2] events stream   KEYS[3] job channel   KEYS[4] results channel
-- KEYS[5] cancels channel (every worker process listens; the one running the job acts)
-- ARGV[1] now   ARGV[2] job id   ARGV[3] ttl seconds
-- ARGV[4] the batch counts key prefix (see batch_end.lua)
-- ARGV[5] the job tenant's queued set, or '' (see tenant_end.lua)
-- Returns the outcome: 'cancelled', 'requested', 'missing', or 'ended:<state>'.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'missing'
end
if state == 'completed' or state == 'failed' or state == 'cancelled' or state == 'expired' then
  return 'ended:' .. state
end
redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[1])
if state == 'running' then
  redis.call('PUBLISH', KEYS[5], ARGV[2])
  return 'requested'
end
local seq = 0
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if last[1] then
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'data' then seq = cjson.decode(fields[i + 1])['seq'] or 0 end
  end
end
local event = cjson.encode({job_id = ARGV[2], seq = seq + 1,
  attempt = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0'),
  type = 'cancelled', ts = tonumber(ARGV[1])})
redis.call('XADD', KEYS[2], '*', 'data', event)
redis.call('PUBLISH', KEYS[3], event)
redis.call('PUBLISH', KEYS[4], event)
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
count_batch_end(KEYS[1], ARGV[4], 'cancelled', ARGV[1], ARGV[3])
tenant_end(KEYS[1], ARGV[5])
-- The record is the job's tombstone: its message still waits in the queue, and a worker that
-- takes it must find the job ended. So never shorten its life (set at submission to outlive
-- the deadline, past which any delivery ends the job without a call), only extend it.
for i = 1, 2 do
  if redis.call('TTL', KEYS[i]) < tonumber(ARGV[3]) then
    redis.call('EXPIRE', KEYS[i], ARGV[3])
  end
end
return 'cancelled'
