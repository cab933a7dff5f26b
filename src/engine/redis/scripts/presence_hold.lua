-- Presence on Redis Cluster (see presence.lua, prepended). Every key here
-- is under one hash tag ('<prefix>:{pr}', the base), so each call is one
-- atomic script on one slot. The holders counted are the node processes
-- (instances): '<base>:h:<instance>' is the set of names ('u:<uid>',
-- 'g:<group>') an instance's partition holds, '<base>:in' a sorted set of
-- the live instances (last seen, ms). A name's count goes up when an
-- instance's set gains it and down when it loses it, so a report applied
-- twice counts once. An instance not seen for the liveness TTL (it died,
-- or lost Redis) is dropped: its names count down, as a purge of its
-- partition does on a single Redis; when it comes back it is told to
-- sync its whole set again.
-- KEYS[1] '<base>:in'
-- ARGV[1] base, ARGV[2] flags, ARGV[3] grace (ms), ARGV[4] the instance,
-- ARGV[5] the mode, ARGV[6] the TTL of an instance (ms), then:
--   'add':  op ('+' or '-'), name, ... in the order the partition changed;
--           answers {-1} when the instance is unknown (dropped): sync.
--   'sync': every name the instance's partition holds now.
--   'drop': nothing (the instance leaves).
--   'tick': most due names to announce (presence_due); refreshes the
--           instance, drops the stale ones. Answers {0, ...} when the
--           instance is unknown: sync.
-- Answers {status, transitions...} (see presence.lua for the triples).
presence_init(ARGV[1], ARGV[2], ARGV[3])
local inst, mode, ttl = ARGV[4], ARGV[5], tonumber(ARGV[6])
local live = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function held(i)
  return string.format('%s:h:%s', PRESENCE_BASE, i)
end

local function gain(i, m)
  if redis.call('SADD', held(i), m) == 1 then
    presence_came(string.sub(m, 1, 1), string.sub(m, 3))
  end
end

local function lose(i, m)
  if redis.call('SREM', held(i), m) == 1 then
    presence_went(string.sub(m, 1, 1), string.sub(m, 3))
  end
end

local function drop(i)
  for _, m in ipairs(redis.call('SMEMBERS', held(i))) do lose(i, m) end
  redis.call('DEL', held(i))
  redis.call('ZREM', live, i)
end

local status = 1
if mode == 'add' then
  if not redis.call('ZSCORE', live, inst) then return {-1} end
  for j = 7, #ARGV, 2 do
    if ARGV[j] == '+' then gain(inst, ARGV[j + 1]) else lose(inst, ARGV[j + 1]) end
  end
elseif mode == 'sync' then
  redis.call('ZADD', live, now, inst)
  local want = {}
  for j = 7, #ARGV do want[ARGV[j]] = true end
  for _, m in ipairs(redis.call('SMEMBERS', held(inst))) do
    if want[m] then want[m] = nil else lose(inst, m) end
  end
  for j = 7, #ARGV do
    if want[ARGV[j]] then
      want[ARGV[j]] = nil
      gain(inst, ARGV[j])
    end
  end
elseif mode == 'drop' then
  drop(inst)
elseif mode == 'tick' then
  if redis.call('ZSCORE', live, inst) then
    redis.call('ZADD', live, now, inst)
  else
    status = 0
  end
  for _, i in ipairs(redis.call('ZRANGEBYSCORE', live, '-inf', now - ttl)) do drop(i) end
  presence_due(tonumber(ARGV[7]))
end
local out = {status}
for _, v in ipairs(PRESENCE_OUT) do out[#out + 1] = v end
return out
