-- Deletes a node's whole partition. With ARGV[1] = 'dead' it does so only
-- if the node's liveness key has expired, and answers -1 otherwise: several
-- surviving nodes may race to purge a dead one, and only the first finds
-- anything to delete. With 'leave' (a node shutting down) the liveness key
-- goes too, in the same step, unless another process holds the node id
-- now (ARGV[2], the leaving instance: a stale process never deletes the
-- partition of the live one). Either way the resume records of its
-- connections expire after the resume window (ARGV[3], ms): a dead or
-- drained node's clients resume elsewhere within it. Returns how many
-- connections were removed; with ARGV[4] non-empty (presence events, see
-- presence.lua: ARGV[4] base, ARGV[5] flags, ARGV[6] grace ms) or ARGV[7]
-- = '1' (close events of the removed connections wanted), returns
-- {removed, c, c times client_id, uid, session, transitions...} instead
-- (c = 0 unless ARGV[7] = '1').
local p = KEYS[1]
presence_init(ARGV[4], ARGV[5], ARGV[6])
if ARGV[1] == 'dead' and redis.call('EXISTS', p .. ':alive') == 1 then return -1 end
if ARGV[1] == 'leave' then
  local alive = redis.call('GET', p .. ':alive')
  if alive then
    local ok, info = pcall(cjson.decode, alive)
    if ok and type(info) == 'table' and info.instance and info.instance ~= ARGV[2] then
      return -1
    end
  end
end
for _, group in ipairs(redis.call('SMEMBERS', p .. ':groups')) do
  redis.call('DEL', p .. ':g:' .. group)
  presence_went('g', group)
end
for _, uid in ipairs(redis.call('SMEMBERS', p .. ':uids')) do
  redis.call('DEL', p .. ':u:' .. uid)
  presence_went('u', uid)
end
local closed = {}
if ARGV[7] == '1' then
  local sessions = redis.call('HGETALL', p .. ':clients')
  for k = 1, #sessions, 2 do
    closed[#closed + 1] = sessions[k]
    closed[#closed + 1] = redis.call('HGET', p .. ':uid', sessions[k]) or ''
    closed[#closed + 1] = sessions[k + 1]
  end
end
local resumes = redis.call('HGETALL', p .. ':rs')
for k = 2, #resumes, 2 do
  if resumes[k] ~= '' then redis.call('PEXPIRE', p .. ':r:' .. resumes[k], ARGV[3]) end
end
local removed = redis.call('HLEN', p .. ':clients')
redis.call('DEL', p .. ':groups', p .. ':uids', p .. ':clients', p .. ':uid', p .. ':cg', p .. ':rs')
if ARGV[1] == 'leave' then redis.call('DEL', p .. ':alive') end
if PRESENCE_BASE == '' and ARGV[7] ~= '1' then return removed end
local out = {removed, #closed / 3}
for _, v in ipairs(closed) do out[#out + 1] = v end
for _, v in ipairs(PRESENCE_OUT) do out[#out + 1] = v end
return out
