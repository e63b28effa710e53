-- The consumer's fetch (worker/runtime/transport.py): file what waits on the queue's kombu
-- lists into the traffic-class structures, then move the next message by priority, tenant
-- and age into this worker's inbox, all in one step (no message is ever only in a variable).
-- Names and policy: worker/keys.py TrafficKeys and docs/traffic-classes.md.
--
-- KEYS[1..n] the queue keys in kombu's order (every queue's plain list, then its priority
--            lists), KEYS[n+1..2n] their inboxes in the same order
-- ARGV[1] aging: seconds a priority waits unserved per level it gains (0: strict priority)
-- ARGV[2] tenant weights JSON ({"tenant": weight}; 1 when absent)
-- ARGV[3] the most messages filed from one kombu list per call
-- ARGV[3+i] the traffic base name (TrafficKeys.base) of the queue KEYS[i] belongs to
-- ARGV[3+n+1] the most messages to take (the consumer's free slots, bounded); 1 if absent
-- Returns {queue key, message, ...}: up to that many messages of one queue, in the order
-- served, now in that key's inbox; or false. An item that is no kombu envelope comes alone.
local n = #KEYS / 2
local most = tonumber(ARGV[3 + n + 1]) or 1
local aging = tonumber(ARGV[1]) or 0
local weights = cjson.decode(ARGV[2])
local limit = tonumber(ARGV[3]) or 100
local SEP = '\6\22'
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000

local function waiting(base, p, tenant) return base .. SEP .. 'q' .. SEP .. p .. SEP .. tenant end
local function turns(base, p) return base .. SEP .. 'turns' .. SEP .. p end
local function clock(base) return base .. SEP .. 'clock' end

-- A message's class from its headers (worker/broker.py traffic_headers); a message without
-- them (sent before traffic classes, or by another producer) is priority 5 without a tenant.
-- nil when the item is no kombu envelope: it is delivered as is, and dead-lettered.
local function class_of(item)
  local ok, envelope = pcall(cjson.decode, item)
  if not ok or type(envelope) ~= 'table' or type(envelope['headers']) ~= 'table' then
    return nil
  end
  local headers = envelope['headers']
  local p = tonumber(headers['llmw_priority'])
  if not p or p ~= math.floor(p) or p < 0 or p > 9 then p = 5 end
  local tenant = headers['llmw_tenant']
  if type(tenant) ~= 'string' or #tenant > 64 or not string.match(tenant, '^[%w_.%-]+$') then
    tenant = ''
  end
  return p, tenant
end

local function file(base, item, p, tenant)
  redis.call('LPUSH', waiting(base, p, tenant), item)
  -- A tenant that starts waiting starts at the priority's virtual time: no credit for idling.
  local v = redis.call('HGET', clock(base), 'v' .. p) or 0
  redis.call('ZADD', turns(base, p), 'NX', v, tenant)
  redis.call('HSETNX', clock(base), 'since' .. p, now)
end

-- The priority to serve: the highest once each has gained a level per `aging` seconds it
-- went unserved; a tie goes to the higher priority.
local function pick(base)
  local best, best_level
  for p = 9, 0, -1 do
    if redis.call('EXISTS', turns(base, p)) == 1 then
      local level = p
      if aging > 0 then
        local since = tonumber(redis.call('HGET', clock(base), 'since' .. p) or now)
        level = p + math.floor(math.max(0, now - since) / aging)
      end
      if not best or level > best_level then best, best_level = p, level end
    end
  end
  return best
end

-- The oldest message of the tenant due next at priority p, moved into `inbox`.
local function serve(base, p, inbox)
  local tk, c = turns(base, p), clock(base)
  while true do
    local top = redis.call('ZRANGE', tk, 0, 0, 'WITHSCORES')
    if #top == 0 then
      redis.call('HDEL', c, 'since' .. p)
      return nil
    end
    local tenant, start = top[1], tonumber(top[2])
    local list = waiting(base, p, tenant)
    local item = redis.call('RPOP', list)
    if item then
      redis.call('LPUSH', inbox, item)
      redis.call('HSET', c, 'v' .. p, start)
      if redis.call('LLEN', list) == 0 then
        redis.call('ZREM', tk, tenant)
      else
        local weight = tonumber(weights[tenant]) or 1
        if weight <= 0 then weight = 1 end
        redis.call('ZADD', tk, start + 1 / weight, tenant)
      end
      if redis.call('EXISTS', tk) == 1 then
        redis.call('HSET', c, 'since' .. p, now)
      else
        redis.call('HDEL', c, 'since' .. p)
      end
      return item
    end
    redis.call('ZREM', tk, tenant) -- its list was removed under us (a purge)
  end
end

for i = 1, n do
  for _ = 1, limit do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local p, tenant = class_of(item)
    if not p then
      redis.call('LPUSH', KEYS[n + i], item)
      return {KEYS[i], item}
    end
    file(ARGV[3 + i], item, p, tenant)
  end
end

local seen = {}
for i = 1, n do
  local base = ARGV[3 + i]
  if not seen[base] then -- a queue's first key is its plain list: its inbox takes the message
    seen[base] = true
    local out = {KEYS[i]}
    while #out <= most do -- each turn by priority, aging and fair share, as for one
      local p = pick(base)
      if not p then break end
      local item = serve(base, p, KEYS[n + i])
      if not item then break end
      out[#out + 1] = item
    end
    if #out > 1 then return out end
  end
end
return false
