-- Shared prelude of the scripts that end a job (finish.lua, cancel.lua; the Python side
-- prepends it). A job of a gateway Message Batch (its hash has `batch`, set by submit.lua)
-- adds its end to the batch's counts in the very step that ends it, so the counts never drift
-- from the jobs and reading them costs the same for 1 request as for 100,000.
--
-- The counts key is built here, from the job's `batch` field behind the prefix the caller
-- passes (Keys.batch_counts('')), not declared in KEYS: the caller does not know the batch
-- and would need one more round trip per job end to learn it. Redis allows undeclared keys
-- outside Cluster; Redis Cluster does not (a script may touch only its KEYS, in one slot).
-- The job scripts are single-Redis already: a job's own keys are in different slots.
-- `batch`: the job's `batch` field when the caller read it already (false: none), or nil.
local function count_batch_end(job_key, counts_prefix, state, now, ttl, batch)
  if batch == nil then
    batch = redis.call('HGET', job_key, 'batch')
  end
  if not batch then
    return
  end
  local counts = counts_prefix .. batch
  redis.call('HINCRBY', counts, state, 1)
  if tonumber(now) > tonumber(redis.call('HGET', counts, 'ended_at') or '0') then
    redis.call('HSET', counts, 'ended_at', now)
  end
  -- The gateway gives the hash its batch's TTL; one created here (the batch not recorded yet,
  -- or gone already) lives until the gateway sets that, or the job's results' TTL at most.
  if redis.call('TTL', counts) == -1 then
    redis.call('EXPIRE', counts, ttl)
  end
end
