-- Presence counters (--presence-events), prepended to the scripts that
-- write partitions. Per uid and group, outside the partitions, the hash
-- '<base>:u:<uid>' / '<base>:g:<group>': 'n' how many holders hold it, 's'
-- the seq of its last transition. A holder gaining a name counts up,
-- losing it counts down, in one atomic script, so the 0 -> 1 and 1 -> 0
-- transitions are decided once for the cluster. Going to 0 with a grace
-- puts the name in the sorted set '<base>:off' (due time, ms): coming back
-- before it is due cancels both (a page reload); presence_due announces
-- the due ones. The transitions found are appended to the table
-- PRESENCE_OUT as kind ('+u' online, '-u' offline, '+g', '-g'), name, seq.
--
-- On a single Redis (and Sentinel) the holders are the nodes' partitions,
-- counted by the partition scripts themselves (these keys are not
-- declared and span slots). On Redis Cluster a script reaches one slot
-- only: the flags then hold 'c' (collect), the partition scripts count
-- nothing and return what their partition gained ('>u', name, '') or lost
-- ('<u', name, ''), and the node hands those to presence_hold.lua, which
-- keeps every key of presence under one hash tag ('<prefix>:{pr}') and
-- counts per process instead (see there).
local PRESENCE_BASE, PRESENCE_FLAGS, PRESENCE_GRACE = '', '', 0
local PRESENCE_PREFIXES = {}
local PRESENCE_OUT = {}

-- flags: 'u' and / or 'g' (and 'c', collect), then the name prefixes
-- (--presence-prefixes), each after a newline: only names starting with
-- one of them count (none: every name).
local function presence_init(base, flags, grace)
  PRESENCE_BASE, PRESENCE_GRACE = base or '', tonumber(grace) or 0
  flags = flags or ''
  local cut = string.find(flags, '\n', 1, true)
  PRESENCE_FLAGS = flags
  if cut then
    PRESENCE_FLAGS = string.sub(flags, 1, cut - 1)
    for prefix in string.gmatch(string.sub(flags, cut + 1), '[^\n]+') do
      PRESENCE_PREFIXES[#PRESENCE_PREFIXES + 1] = prefix
    end
  end
end

local function presence_watches(name)
  if #PRESENCE_PREFIXES == 0 then return true end
  for _, prefix in ipairs(PRESENCE_PREFIXES) do
    if string.sub(name, 1, #prefix) == prefix then return true end
  end
  return false
end

local function presence_on(kind, name)
  return PRESENCE_BASE ~= '' and string.find(PRESENCE_FLAGS, kind, 1, true) ~= nil
    and presence_watches(name)
end

local function presence_collects()
  return string.find(PRESENCE_FLAGS, 'c', 1, true) ~= nil
end

local function presence_collect(sign, kind, name)
  local n = #PRESENCE_OUT
  PRESENCE_OUT[n + 1] = sign .. kind
  PRESENCE_OUT[n + 2] = name
  PRESENCE_OUT[n + 3] = ''
end

local function presence_seq(key)
  local t = redis.call('TIME')
  local s = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('HGET', key, 's') or '0') or 0
  if last >= s then s = last + 1 end
  s = string.format('%.0f', s)
  redis.call('HSET', key, 's', s)
  return s
end

local function presence_emit(sign, kind, name, key)
  local n = #PRESENCE_OUT
  PRESENCE_OUT[n + 1] = sign .. kind
  PRESENCE_OUT[n + 2] = name
  PRESENCE_OUT[n + 3] = presence_seq(key)
end

-- A partition now holds `name`.
local function presence_came(kind, name)
  if not presence_on(kind, name) then return end
  if presence_collects() then return presence_collect('>', kind, name) end
  local key = string.format('%s:%s:%s', PRESENCE_BASE, kind, name)
  if redis.call('HINCRBY', key, 'n', 1) ~= 1 then return end
  local pending = string.format('%s:off', PRESENCE_BASE)
  if redis.call('ZREM', pending, string.format('%s:%s', kind, name)) == 1 then return end
  presence_emit('+', kind, name, key)
end

-- A partition no longer holds `name`.
local function presence_went(kind, name)
  if not presence_on(kind, name) then return end
  if presence_collects() then return presence_collect('<', kind, name) end
  local key = string.format('%s:%s:%s', PRESENCE_BASE, kind, name)
  local n = redis.call('HINCRBY', key, 'n', -1)
  if n > 0 then return end
  if n < 0 then redis.call('HSET', key, 'n', 0) end
  if PRESENCE_GRACE > 0 then
    local t = redis.call('TIME')
    local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + PRESENCE_GRACE
    redis.call('ZADD', string.format('%s:off', PRESENCE_BASE), due, string.format('%s:%s', kind, name))
  else
    presence_emit('-', kind, name, key)
    redis.call('DEL', key)
  end
end


-- Announces the offline / vacated transitions whose grace is over: pops
-- up to `limit` due names from '<base>:off' and, for each still held by
-- nobody, deletes its counter and appends it to PRESENCE_OUT. Atomic, so
-- of the nodes that poll, exactly one announces each.
local function presence_due(limit)
  local pending = string.format('%s:off', PRESENCE_BASE)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local due = redis.call('ZRANGEBYSCORE', pending, '-inf', now, 'LIMIT', 0, limit)
  for _, m in ipairs(due) do
    redis.call('ZREM', pending, m)
    local key = string.format('%s:%s', PRESENCE_BASE, m)
    if (tonumber(redis.call('HGET', key, 'n') or '0') or 0) <= 0 then
      presence_emit('-', string.sub(m, 1, 1), string.sub(m, 3), key)
      redis.call('DEL', key)
    end
  end
end
