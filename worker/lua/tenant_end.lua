-- Shared prelude of the scripts that end a job (finish.lua, cancel.lua; the Python side
-- prepends it, with batch_end.lua): a tenant's job gives back its place in its tenant's
-- queued set (the quota: see submit.lua) in the very step that ends it. claim.lua gives it
-- back too, when a worker takes the job; removing twice is harmless.
-- The set's name is passed by the caller (it knows the tenant from the job id), as an
-- argument, not in KEYS: like batch_end.lua, single-Redis only.
local function tenant_end(job_key, queued_key)
  if queued_key and queued_key ~= '' then
    redis.call('ZREM', queued_key, job_key)
  end
end
