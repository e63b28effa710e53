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
--
-- This runs with every poll of every worker, so it asks Redis for as little as it can (one
-- job cost 24 commands here, 10 of them looking at every priority level for each message):
-- a queue's clock hash is read once and written back once; which priority levels have
-- waiting tenants is looked up once and then kept in step with what this call changes; a
-- kombu list is read and trimmed in two commands, and its messages pushed onto their class
-- lists in one LPUSH per list. The script is atomic, so what it keeps in variables is what
-- Redis holds; every order and clock value is the same as with one command per step.
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

-- A queue's clock hash (v<p>, since<p>): read on first use, changes written by save_clocks.
-- Numbers go to Redis as exact decimals and read back equal, so a value kept here is the
-- value a later HGET would have returned.
local clocks = {}
local function clock_of(base)
  local c = clocks[base]
  if not c then
    c = {fields = {}, changed = {}}
    local flat = redis.call('HGETALL', clock(base))
    for i = 1, #flat, 2 do c.fields[flat[i]] = flat[i + 1] end
    clocks[base] = c
  end
  return c
end
local function clock_get(base, field) return clock_of(base).fields[field] end
local function clock_set(base, field, value) -- value nil: the field goes
  local c = clock_of(base)
  c.fields[field] = value
  c.changed[field] = true
end
local function save_clocks()
  for base, c in pairs(clocks) do
    local set, gone = {}, {}
    for field in pairs(c.changed) do
      local value = c.fields[field]
      if value == nil then
        gone[#gone + 1] = field
      else
        set[#set + 1] = field
        set[#set + 1] = value
      end
    end
    if #set > 0 then redis.call('HSET', clock(base), unpack(set)) end
    if #gone > 0 then redis.call('HDEL', clock(base), unpack(gone)) end
  end
end

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

-- Filing: messages bound for each class list, in arrival order, pushed by push_filed.
local filed, filed_order = {}, {}
local function file(base, item, p, tenant)
  local list = waiting(base, p, tenant)
  local items = filed[list]
  if not items then
    items = {}
    filed[list] = items
    filed_order[#filed_order + 1] = list
    -- A tenant that starts waiting starts at the priority's virtual time: no credit for
    -- idling. (NX: one already waiting keeps its place; once per list is enough.)
    redis.call('ZADD', turns(base, p), 'NX', clock_get(base, 'v' .. p) or 0, tenant)
    if not clock_get(base, 'since' .. p) then clock_set(base, 'since' .. p, now) end
  end
  items[#items + 1] = item
end
local function push_filed()
  -- (At most ARGV[3] items per kombu list are filed per call: unpack stays within Lua's stack.)
  for _, list in ipairs(filed_order) do
    redis.call('LPUSH', list, unpack(filed[list])) -- the first filed ends up first served
  end
  filed, filed_order = {}, {}
end

-- The priority levels of a queue that have waiting tenants (a turns set), looked up on
-- first use (one EXISTS for all when none has), then kept in step by serve.
local levels = {}
local function levels_of(base)
  local found = levels[base]
  if not found then
    found = {}
    local names = {}
    for p = 0, 9 do names[p + 1] = turns(base, p) end
    if redis.call('EXISTS', unpack(names)) > 0 then
      for p = 0, 9 do
        if redis.call('EXISTS', names[p + 1]) == 1 then found[p] = true end
      end
    end
    levels[base] = found
  end
  return found
end

-- The priority to serve: the highest once each has gained a level per `aging` seconds it
-- went unserved; a tie goes to the higher priority.
local function pick(base)
  local best, best_level
  local found = levels_of(base)
  for p = 9, 0, -1 do
    if found[p] then
      local level = p
      if aging > 0 then
        local since = tonumber(clock_get(base, 'since' .. p) or now)
        level = p + math.floor(math.max(0, now - since) / aging)
      end
      if not best or level > best_level then best, best_level = p, level end
    end
  end
  return best
end

-- The oldest message of the tenant due next at priority p, moved into `inbox`.
local function serve(base, p, inbox)
  local tk, found = turns(base, p), levels_of(base)
  while true do
    local top = redis.call('ZRANGE', tk, 0, 0, 'WITHSCORES')
    if #top == 0 then
      found[p] = nil
      clock_set(base, 'since' .. p, nil)
      return nil
    end
    local tenant, start = top[1], tonumber(top[2])
    local list = waiting(base, p, tenant)
    local item = redis.call('RPOPLPUSH', list, inbox)
    if item then
      clock_set(base, 'v' .. p, start)
      if redis.call('LLEN', list) == 0 then
        redis.call('ZREM', tk, tenant)
        if redis.call('EXISTS', tk) == 0 then found[p] = nil end
      else
        local weight = tonumber(weights[tenant]) or 1
        if weight <= 0 then weight = 1 end
        redis.call('ZADD', tk, start + 1 / weight, tenant)
      end
      clock_set(base, 'since' .. p, found[p] and now or nil)
      return item
    end
    redis.call('ZREM', tk, tenant) -- its list was removed under us (a purge)
  end
end

-- File up to `limit` messages of each kombu list, from its consuming (right) end as RPOP
-- would take them: one LRANGE reads them, one LTRIM takes them off.
for i = 1, n do
  local items = limit > 0 and redis.call('LRANGE', KEYS[i], -limit, -1) or {}
  local taken = 0
  for j = #items, 1, -1 do
    local item = items[j]
    taken = taken + 1
    local p, tenant = class_of(item)
    if not p then
      redis.call('LTRIM', KEYS[i], 0, -(taken + 1))
      push_filed()
      save_clocks()
      redis.call('LPUSH', KEYS[n + i], item)
      return {KEYS[i], item}
    end
    file(ARGV[3 + i], item, p, tenant)
  end
  if taken > 0 then redis.call('LTRIM', KEYS[i], 0, -(taken + 1)) end
end
push_filed()

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
    if #out > 1 then
      save_clocks()
      return out
    end
  end
end
save_clocks()
return false
