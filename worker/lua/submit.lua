-- Create a job if its id is new, and enqueue its Celery message in the same step, so that a
-- job exists if and only if it was enqueued. An existing id is left alone.
-- Three forms, told apart by the number of keys:
--   the broker is this Redis: KEYS[1] job hash, KEYS[2] broker queue list; ARGV[6] is the
--   Celery message, pushed onto the queue.
--   the gateway's fast path (worker/gateway/fast_path.py), the broker being this Redis:
--   KEYS[1] job hash, KEYS[2] broker queue list, KEYS[3] the queue's outbox, KEYS[4] the
--   job's outbox message; ARGV[6] the Celery message, ARGV[15] the outbox message, ARGV[16]
--   the queue's traffic base (TrafficKeys.base). When nothing of priority ARGV[9] or higher
--   waits (the kombu list is empty: nothing unfiled; no filed tenant at such a priority),
--   the message is kept in the outbox, as for a broker elsewhere, and the gateway runs the
--   job itself (a worker's sweeper publishes it should the gateway die); else it is pushed
--   onto the queue as in the first form.
--   the broker is elsewhere (the outbox): KEYS[1] job hash, KEYS[2] the queue's outbox
--   (sorted set), KEYS[3] the job's outbox message; ARGV[6] is that message, kept until the
--   producer (or a worker's sweeper) has the broker's confirmation.
-- ARGV[1] request sha256   ARGV[2] now   ARGV[3] model   ARGV[4] metadata JSON
-- ARGV[5] ttl seconds while queued   ARGV[7] deadline (epoch seconds)   ARGV[8] the id of the
-- gateway Message Batch the job belongs to (its end adds to that batch's counts: see
-- batch_end.lua), '' or absent
-- ARGV[9] priority (0-9)   ARGV[10] tenant, or ''   ARGV[11] fallback models JSON, or ''
-- ARGV[12] the job id (the outbox's member)
-- ARGV[13] the tenant's queued-jobs set (Keys.tenant_queued), or '' (no quota)
-- ARGV[14] the tenant's quota of queued jobs (with ARGV[13])
-- ARGV[15], ARGV[16] the fast-path form's (see above; '' in the others)
-- ARGV[17] the queue's submitted-jobs hash (Keys.submitted_counts), ARGV[18] the job's field
--   in it (client.core.submitted_field): a created job counts there in the same step
-- Returns {1} when created ({1, 1} in the fast-path form when the message was kept for the
-- gateway, {1, 0} when it was queued), {0, existing sha, existing state, outbox message} (the last is
-- the message of a job still queued and unconfirmed, '' otherwise, to be published again),
-- or {-1, queued} when the tenant's quota is full (nothing written).
local fast = #KEYS == 4
local outbox = #KEYS == 3
local existing = redis.call('HGET', KEYS[1], 'request_sha')
if existing then
  local state = redis.call('HGET', KEYS[1], 'state') or ''
  local pending = ''
  if outbox and state == 'queued' and redis.call('ZSCORE', KEYS[2], ARGV[12]) then
    pending = redis.call('GET', KEYS[3]) or ''
  end
  return {0, existing, state, pending}
end
-- [tenant quota] A tenant may have ARGV[14] queued jobs at most. The set's scores are when
-- each queued record expires, so a record lost that way stops counting by itself.
if ARGV[13] and ARGV[13] ~= '' then
  redis.call('ZREMRANGEBYSCORE', ARGV[13], '-inf', ARGV[2])
  local queued = redis.call('ZCARD', ARGV[13])
  if queued >= tonumber(ARGV[14]) then
    return {-1, queued}
  end
  redis.call('ZADD', ARGV[13], tonumber(ARGV[2]) + tonumber(ARGV[5]), KEYS[1])
  if redis.call('TTL', ARGV[13]) < tonumber(ARGV[5]) then
    redis.call('EXPIRE', ARGV[13], ARGV[5])
  end
end
-- [end tenant quota]
redis.call('HSET', KEYS[1],
  'state', 'queued', 'request_sha', ARGV[1], 'submitted_at', ARGV[2], 'model', ARGV[3],
  'metadata', ARGV[4], 'attempts', 0, 'deliveries', 0, 'deadline_at', ARGV[7],
  'priority', ARGV[9] or '5')
if ARGV[8] and ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'batch', ARGV[8])
end
if ARGV[10] and ARGV[10] ~= '' then
  redis.call('HSET', KEYS[1], 'tenant', ARGV[10])
end
if ARGV[11] and ARGV[11] ~= '' then
  redis.call('HSET', KEYS[1], 'fallback_models', ARGV[11])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
if ARGV[17] and ARGV[17] ~= '' then
  redis.call('HINCRBY', ARGV[17], ARGV[18], 1)
end
if fast then
  local SEP = '\6\22'
  local waiting = redis.call('LLEN', KEYS[2]) > 0
  for p = tonumber(ARGV[9] or '5'), 9 do
    if waiting then break end
    waiting = redis.call('EXISTS', ARGV[16] .. SEP .. 'turns' .. SEP .. p) == 1
  end
  if waiting then
    redis.call('LPUSH', KEYS[2], ARGV[6])
    return {1, 0}
  end
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[3], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[12])
  redis.call('SET', KEYS[4], ARGV[15], 'EX', ARGV[5])
  return {1, 1}
end
if outbox then
  -- Server time: every sweeper compares against the same clock.
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[12])
  redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[5])
elseif KEYS[2] then
  redis.call('LPUSH', KEYS[2], ARGV[6])
end
return {1}
