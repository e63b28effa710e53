-- A worker takes a delivered job: count the delivery, mark it running, and tell the worker
-- where the job's event sequence stands (so seq keeps rising across deliveries).
-- KEYS[1] job hash   KEYS[2] events stream
-- ARGV[1] now   ARGV[2] worker name   ARGV[3] model (for a job whose hash is missing)
-- ARGV[4] ttl seconds while running
-- Returns {state before, deliveries, attempts, last seq, cancel requested (0/1), deadline}.
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'completed' or state == 'failed' or state == 'cancelled' or state == 'expired' then
  return {state, 0, 0, 0, 0, ''}
end
if not state then
  -- The hash expired or the message was pushed by hand: keep a record of the job anyway.
  redis.call('HSET', KEYS[1], 'submitted_at', ARGV[1], 'model', ARGV[3], 'attempts', 0)
  state = 'missing'
end
local deliveries = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2])
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
local seq = 0
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if last[1] then
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'data' then
      seq = cjson.decode(fields[i + 1])['seq'] or 0
    end
  end
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested') and 1 or 0
return {state, deliveries, attempts, seq, cancel, redis.call('HGET', KEYS[1], 'deadline_at') or ''}
