-- set_cooldown: refuse a key until now + cooldown_s, never shortening a longer cooldown.
-- KEYS[1] cooldown  ARGV[1] cooldown_s
-- Returns the seconds left of the cooldown in force, as a string.
local seconds = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if seconds > 0 and now + seconds > current then
  current = now + seconds
  redis.call('SET', KEYS[1], num(current), 'PX', math.ceil(seconds * 1000) + 1000)
end
return num(math.max(0, current - now))
