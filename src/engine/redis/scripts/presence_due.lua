-- Announces the offline / vacated transitions whose grace is over (see
-- presence.lua): pops up to ARGV[2] due names from '<base>:off' and, for
-- each still held by no partition, deletes its counter and returns it as
-- '-u' / '-g', name, seq. Atomic, so of the nodes that poll, exactly one
-- announces each.
-- ARGV[1] the presence base ('<prefix>:pr'), ARGV[2] most names per call.
local base = ARGV[1]
local pending = string.format('%s:off', base)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', pending, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, m in ipairs(due) do
  redis.call('ZREM', pending, m)
  local key = string.format('%s:%s', base, m)
  if (tonumber(redis.call('HGET', key, 'n') or '0') or 0) <= 0 then
    local s = tonumber(t[1]) * 1000000 + tonumber(t[2])
    local last = tonumber(redis.call('HGET', key, 's') or '0') or 0
    if last >= s then s = last + 1 end
    out[#out + 1] = '-' .. string.sub(m, 1, 1)
    out[#out + 1] = string.sub(m, 3)
    out[#out + 1] = string.format('%.0f', s)
    redis.call('DEL', key)
  end
end
return out
