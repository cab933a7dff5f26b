-- Rewrites connections in their node's partition from the node's memory:
-- each record says what the connection is now, the script removes what the
-- partition held before (the uid in ':uid', the groups in ':cg') and writes
-- the rest. Idempotent, so a batch that failed is simply written again.
-- Fenced by the writer's process instance: it writes only while the
-- partition's liveness key is its own. Returns 1 when written, 0 when the
-- key is gone (the node was purged, or Redis lost it: the node must
-- register again and write everything), -1 when another process holds the
-- node id (a stale writer from another life of the node writes nothing).
-- A connection that opted in to recovery has a resume record (':r:<id>',
-- named in ':rs'): rewritten with the connection, without expiry while it
-- lives; when the connection is gone it expires after the resume window.
-- A record consumed by a resume (':rs' holds '') is never written again.
-- With presence events on (ARGV[3] non-empty, see presence.lua), returns
-- {1, transitions...} instead of 1 when written.
-- KEYS[1] partition
-- ARGV[1] the writer's instance id, ARGV[2] the resume window (ms),
--       ARGV[3] the presence base ('' = off), ARGV[4] its flags, ARGV[5]
--       its grace (ms); then
--       records, each: client_id, present ('1' or '0' = gone), resume
--       record id ('' = none), digest of its secret, session JSON, uid
--       ('' = none), group count n, then n groups
local p = KEYS[1]
local alive = redis.call('GET', p .. ':alive')
if not alive then return 0 end
local ok, info = pcall(cjson.decode, alive)
if not ok or type(info) ~= 'table' or info.instance ~= ARGV[1] then return -1 end

presence_init(ARGV[3], ARGV[4], ARGV[5])

local function leave(set, index, name, id, kind)
  redis.call('SREM', set, id)
  if redis.call('SCARD', set) == 0 and redis.call('SREM', index, name) == 1 then
    presence_went(kind, name)
  end
end

local function resume_record(id, rid, digest, session, uid, groups)
  local current = redis.call('HGET', p .. ':rs', id)
  if not current then
    redis.call('HSET', p .. ':rs', id, rid)
    current = rid
  end
  if current ~= rid then return end
  local record = p .. ':r:' .. rid
  if redis.call('HEXISTS', record, 'used') == 1 then
    -- Consumed while this partition was gone (purged, Redis restarted).
    redis.call('HSET', p .. ':rs', id, '')
    return
  end
  local listed = '[]'
  if #groups > 0 then listed = cjson.encode(groups) end
  redis.call('HSET', record, 'd', digest, 'c', id, 'u', uid, 'g', listed, 's', session)
  redis.call('PERSIST', record)
end

local function resume_gone(id)
  local rid = redis.call('HGET', p .. ':rs', id)
  if not rid then return end
  if rid ~= '' then redis.call('PEXPIRE', p .. ':r:' .. rid, ARGV[2]) end
  redis.call('HDEL', p .. ':rs', id)
end

local i = 6
while i <= #ARGV do
  local id, present, rid, digest = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local session, uid = ARGV[i + 4], ARGV[i + 5]
  local n = tonumber(ARGV[i + 6])
  local groups, wanted = {}, {}
  if present == '1' then
    for j = 1, n do
      local g = ARGV[i + 6 + j]
      groups[#groups + 1] = g
      wanted[g] = true
    end
  else
    uid = ''
  end
  i = i + 7 + n

  local old_uid = redis.call('HGET', p .. ':uid', id)
  if old_uid and old_uid ~= uid then leave(p .. ':u:' .. old_uid, p .. ':uids', old_uid, id, 'u') end
  local old_groups = redis.call('HGET', p .. ':cg', id)
  if old_groups then
    for _, g in ipairs(cjson.decode(old_groups)) do
      if not wanted[g] then leave(p .. ':g:' .. g, p .. ':groups', g, id, 'g') end
    end
  end

  if present == '1' then
    redis.call('HSET', p .. ':clients', id, session)
    if uid ~= '' then
      redis.call('HSET', p .. ':uid', id, uid)
      redis.call('SADD', p .. ':u:' .. uid, id)
      if redis.call('SADD', p .. ':uids', uid) == 1 then presence_came('u', uid) end
    else
      redis.call('HDEL', p .. ':uid', id)
    end
    for _, g in ipairs(groups) do
      redis.call('SADD', p .. ':g:' .. g, id)
      if redis.call('SADD', p .. ':groups', g) == 1 then presence_came('g', g) end
    end
    if #groups > 0 then
      redis.call('HSET', p .. ':cg', id, cjson.encode(groups))
    else
      redis.call('HDEL', p .. ':cg', id)
    end
    if rid ~= '' then resume_record(id, rid, digest, session, uid, groups) end
  else
    redis.call('HDEL', p .. ':clients', id)
    redis.call('HDEL', p .. ':uid', id)
    redis.call('HDEL', p .. ':cg', id)
    resume_gone(id)
  end
end
if PRESENCE_BASE == '' then return 1 end
local out = {1}
for _, v in ipairs(PRESENCE_OUT) do out[#out + 1] = v end
return out
