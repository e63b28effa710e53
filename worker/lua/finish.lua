-- Write a job's one terminal event and its final state as a single step. A job that has
-- ended already is left alone, so a redelivered or raced job still ends exactly once.
-- KEYS[1] job hash   KEYS[2] events stream   KEYS[3] job channel   KEYS[4] results channel
-- KEYS[5] result key   KEYS[6] dead-letter stream (written only with a dead-letter reason)
-- KEYS[7] the tenant's usage hash for the day, KEYS[8] its day spend, KEYS[9] its month
-- spend (absent when the end adds no usage: see ARGV[17..21])
-- ARGV[1] state   ARGV[2] event JSON   ARGV[3] final message JSON or ''   ARGV[4] ttl
-- ARGV[5] now   ARGV[6] usage JSON or ''   ARGV[7] error JSON or ''   ARGV[8] stop_reason or ''
-- ARGV[9] the writer's lease token, or '' for a writer that holds none (a job rejected
-- before it ran)   ARGV[10] the batch counts key prefix (see batch_end.lua)
-- ARGV[11] job id   ARGV[12] dead-letter reason, or '' for none   ARGV[13] dead-letter payload
-- ARGV[14] the dead-letter stream's length bound
-- ARGV[15] the model that answered, or ''   ARGV[16] the job's cost in USD (exact decimal), or ''
-- ARGV[17] model (usage field prefix)   ARGV[18] input tokens   ARGV[19] output tokens
-- ARGV[20] cost in pico-dollars (integer)   ARGV[21] the usage keys' TTL when new
-- ARGV[22] the job tenant's queued set, or '' (see tenant_end.lua)
-- A job whose message an outbox holds while the gateway runs it (claim.lua's held_in and
-- held_msg) leaves the outbox in the same step: no sweeper publishes a job that ended.
-- Returns 1 when this call ended the job, 0 when it had ended before, -1 when another worker
-- holds its lease now (this writer lost it without knowing: the job is not its to end).
-- The job's state, lease, batch and outbox entry in one read.
local job = redis.call('HMGET', KEYS[1], 'state', 'lease', 'batch', 'held_in', 'held_msg')
local state = job[1]
if state == 'completed' or state == 'failed' or state == 'cancelled' or state == 'expired' then
  return 0
end
if ARGV[9] ~= '' then
  local holder = job[2]
  if holder and holder ~= ARGV[9] then
    return -1
  end
end
redis.call('XADD', KEYS[2], '*', 'data', ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[2])
redis.call('PUBLISH', KEYS[4], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[5], ARGV[3], 'EX', ARGV[4])
end
-- The final state and whichever of usage, error, stop_reason, answered_by, cost_usd were
-- given, in one HSET.
local fields = {'state', ARGV[1], 'finished_at', ARGV[5]}
local function field(name, value)
  if value ~= '' then
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end
field('usage', ARGV[6])
field('error', ARGV[7])
field('stop_reason', ARGV[8])
field('answered_by', ARGV[15])
field('cost_usd', ARGV[16])
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HDEL', KEYS[1], 'worker', 'lease', 'lease_until', 'held_in', 'held_msg')
if job[4] then
  redis.call('ZREM', job[4], ARGV[11])
  redis.call('DEL', job[5])
end
count_batch_end(KEYS[1], ARGV[10], ARGV[1], ARGV[5], ARGV[4], job[3])
tenant_end(KEYS[1], ARGV[22])
if ARGV[12] ~= '' then
  -- In the same step as the end, so whoever sees the failure also finds its dead letter.
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[14], '*',
    'job_id', ARGV[11], 'reason', ARGV[12], 'payload', ARGV[13], 'ts', ARGV[5])
end
if KEYS[7] then
  -- In the same step as the end, so a job's usage and cost are counted exactly once.
  local model = ARGV[17]
  local jobs = redis.call('HINCRBY', KEYS[7], model .. '|jobs', 1)
  redis.call('HINCRBY', KEYS[7], model .. '|input_tokens', ARGV[18])
  redis.call('HINCRBY', KEYS[7], model .. '|output_tokens', ARGV[19])
  redis.call('HINCRBY', KEYS[7], model .. '|cost_pusd', ARGV[20])
  redis.call('HINCRBYFLOAT', KEYS[7], model .. '|cost_usd', ARGV[16])
  local day = redis.call('INCRBY', KEYS[8], ARGV[20])
  local month = redis.call('INCRBY', KEYS[9], ARGV[20])
  -- A key this step created has no TTL yet. Only this script writes these keys, so one whose
  -- counter did not start here (the model's first job of the day, a spend equal to this
  -- job's cost, as it always is for a job that costs nothing) got its TTL when it was
  -- created: the TTL is looked at only for the others (3 commands per paid job saved).
  local created = {jobs == 1, day == tonumber(ARGV[20]), month == tonumber(ARGV[20])}
  for i = 7, 9 do
    if created[i - 6] and redis.call('TTL', KEYS[i]) == -1 then
      redis.call('EXPIRE', KEYS[i], ARGV[21])
    end
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
