-- A worker takes a delivered job: unless another live worker holds its lease, take the lease,
-- count the delivery, mark it running, and tell the worker where the job's event sequence
-- stands (so seq keeps rising across deliveries).
-- KEYS[1] job hash   KEYS[2] events stream   KEYS[3] events channel
-- ARGV[1] now (client clock, for timestamps only)   ARGV[2] worker name
-- ARGV[3] model (for a job whose hash is missing)   ARGV[4] ttl seconds while running
-- ARGV[5] lease token   ARGV[6] lease ttl ms   ARGV[7] delivery limit
-- ARGV[8] '1': also start the next attempt when nothing stands in its way (no cancel, deadline
--         not passed, not taken over from a dead worker): write its `started` event, as
--         the worker would have in its next round trip   ARGV[9] job id   ARGV[10] result ttl s
-- ARGV[11] the message's submission time, ARGV[12] its deadline (epoch seconds, or '' when
--          the message predates them): a job whose record is gone is judged by its message
-- ARGV[13] the queued set of the job's tenant (its quota, see submit.lua), or '': a delivered
--          job is no longer queued, whatever comes next
-- ARGV[14] an outbox key, or '': take only a queued job whose message that outbox holds
--          (the gateway's fast path sends its claim with the submit; a job the submit queued,
--          or one another request claimed first, answers 'not_held' and is left alone)
-- ARGV[15] with ARGV[14]: the job's outbox message key; both are kept in the job hash
--          (held_in, held_msg), so that the job's end (finish.lua) takes the message out of
--          the outbox in the same step
-- Returns {state before, deliveries, attempts, last seq, cancel requested (0/1), deadline,
--          lease wait ms, first start (1 when no worker had started the job before),
--          type of the job's last event, started (1 when this call started an attempt; the
--          attempts and last seq returned then include it), the stream id of that
--          `started` event ('' when none was written)}. State before is queued, running
-- (taken over from a worker that died or let its lease lapse), missing, a terminal state,
-- 'leased' (a live worker runs it: wait lease wait ms and ask again) or 'poison' (delivered
-- more than the limit allows).
-- The same call again with the same token (its reply was lost and the client retried it)
-- answers what the first call did, without counting a second delivery.
-- The seq and type of the job's last event (0, '' when it has none).
local function last_event()
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if last[1] then
    local fields = last[1][2]
    for i = 1, #fields, 2 do
      if fields[i] == 'data' then
        local event = cjson.decode(fields[i + 1])
        return event['seq'] or 0, event['type'] or ''
      end
    end
  end
  return 0, ''
end

if ARGV[14] and ARGV[14] ~= '' then
  if not redis.call('ZSCORE', ARGV[14], ARGV[9])
      or redis.call('HGET', KEYS[1], 'state') ~= 'queued' then
    return {'not_held', 0, 0, 0, 0, '', 0}
  end
end
if ARGV[13] and ARGV[13] ~= '' then
  redis.call('ZREM', ARGV[13], KEYS[1])
end
-- Every field this step reads, in one command (one per field cost 7 of a job's commands).
local job = redis.call('HMGET', KEYS[1], 'state', 'lease', 'lease_until', 'deliveries',
  'attempts', 'cancel_requested', 'deadline_at', 'started_at',
  'claim_before', 'claim_first', 'claim_started', 'claim_started_id')
local state = job[1]
if state == 'completed' or state == 'failed' or state == 'cancelled' or state == 'expired' then
  return {state, 0, 0, 0, 0, '', 0}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder = job[2]
if holder and holder == ARGV[5] and state == 'running' then
  local seq, last_type = last_event()
  return {job[9] or 'running', tonumber(job[4] or '0'), tonumber(job[5] or '0'), seq,
    job[6] and 1 or 0, job[7] or '', 0, tonumber(job[10] or '0'), last_type,
    tonumber(job[11] or '0'), job[12] or ''}
end
if holder and holder ~= ARGV[5] then
  local until_ms = tonumber(job[3] or '0')
  if until_ms > now_ms then
    return {'leased', 0, 0, 0, 0, '', until_ms - now_ms}
  end
end
local attempts = tonumber(job[5] or '0')
local deadline = job[7] or ''
if not state then
  -- The record is gone (expired, lost with a Redis that kept nothing, or a message pushed by
  -- hand): keep one, judged by what the message says. A message past its deadline ends
  -- expired; it never reaches the upstream.
  local submitted = ARGV[11] ~= '' and ARGV[11] or ARGV[1]
  redis.call('HSET', KEYS[1], 'submitted_at', submitted, 'model', ARGV[3], 'attempts', 0)
  attempts = 0
  if ARGV[12] and ARGV[12] ~= '' then
    redis.call('HSET', KEYS[1], 'deadline_at', ARGV[12])
    deadline = ARGV[12]
  end
  state = 'missing'
end
local deliveries = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
local cancel = job[6] and 1 or 0
if deliveries > tonumber(ARGV[7]) then
  return {'poison', deliveries, attempts, 0, cancel, deadline, 0}
end
-- The job's fields this claim sets, written in one HSET at the end.
local fields = {'state', 'running', 'worker', ARGV[2],
  'lease', ARGV[5], 'lease_until', now_ms + tonumber(ARGV[6])}
if ARGV[14] and ARGV[14] ~= '' then
  fields[#fields + 1] = 'held_in'
  fields[#fields + 1] = ARGV[14]
  fields[#fields + 1] = 'held_msg'
  fields[#fields + 1] = ARGV[15]
end
local first = 0
if not job[8] then
  fields[#fields + 1] = 'started_at'
  fields[#fields + 1] = ARGV[1]
  first = 1
end
local seq, last_type = last_event()
local fresh = state == 'queued' or state == 'missing' or (state == 'running' and attempts == 0)
local now = tonumber(ARGV[1])
local deadline_at = tonumber(deadline)
local started = 0
local started_id = ''
if ARGV[8] == '1' and fresh and cancel == 0 and (not deadline_at or now < deadline_at) then
  attempts = attempts + 1
  seq = seq + 1
  -- The same bytes the worker's events.make_event + orjson would write.
  local data = '{"job_id":' .. cjson.encode(ARGV[9]) .. ',"seq":' .. seq .. ',"attempt":'
    .. attempts .. ',"type":"started","ts":' .. ARGV[1] .. '}'
  started_id = redis.call('XADD', KEYS[2], '*', 'data', data)
  redis.call('PUBLISH', KEYS[3], data)
  fields[#fields + 1] = 'attempts'
  fields[#fields + 1] = attempts
  -- Until the job ends, its stream lives as long as the job could, plus the result TTL.
  local ttl = tonumber(ARGV[4])
  if deadline_at then
    ttl = math.max(1, math.ceil(deadline_at - now) + tonumber(ARGV[10]))
  end
  redis.call('EXPIRE', KEYS[2], ttl)
  started = 1
  last_type = 'started'
end
-- With what this claim answered, for the same call retried after a lost reply.
fields[#fields + 1] = 'claim_before'
fields[#fields + 1] = state
fields[#fields + 1] = 'claim_first'
fields[#fields + 1] = first
fields[#fields + 1] = 'claim_started'
fields[#fields + 1] = started
fields[#fields + 1] = 'claim_started_id'
fields[#fields + 1] = started_id
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {state, deliveries, attempts, seq, cancel, deadline, 0, first, last_type, started,
  started_id}
