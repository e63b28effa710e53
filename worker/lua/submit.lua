-- Create a job if its id is new, and enqueue its Celery message in the same step, so that a
-- job exists if and only if it was enqueued. An existing id is left alone.
-- KEYS[1] job hash   KEYS[2] broker queue list, or absent when the broker is elsewhere
-- ARGV[1] request sha256   ARGV[2] now   ARGV[3] model   ARGV[4] metadata JSON
-- ARGV[5] ttl seconds while queued   ARGV[6] Celery message JSON (when KEYS[2] given)
-- ARGV[7] deadline (epoch seconds)   ARGV[8] the id of the gateway Message Batch the job
-- belongs to (its end adds to that batch's counts: see batch_end.lua), '' or absent
-- ARGV[9] priority (0-9)   ARGV[10] tenant, or ''   ARGV[11] fallback models JSON, or ''
-- Returns {1} when created, or {0, existing sha, existing state}.
local existing = redis.call('HGET', KEYS[1], 'request_sha')
if existing then
  return {0, existing, redis.call('HGET', KEYS[1], 'state') or ''}
end
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
if KEYS[2] then
  redis.call('LPUSH', KEYS[2], ARGV[6])
end
return {1}
