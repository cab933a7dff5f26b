-- Deletes a node's whole partition. With ARGV[1] = 'dead' it does so only
-- if the node's liveness key has expired, and answers -1 otherwise: several
-- surviving nodes may race to purge a dead one, and only the first finds
-- anything to delete. With 'leave' (a node shutting down) the liveness key
-- goes too, in the same step, unless another process holds the node id
-- now (ARGV[2], the leaving instance: a stale process never deletes the
-- partition of the live one). Either way the resume records of its
-- connections expire after the resume window (ARGV[3], ms): a dead or
-- drained node's clients resume elsewhere within it. Returns how many
-- connections were removed.
local p = KEYS[1]
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
end
for _, uid in ipairs(redis.call('SMEMBERS', p .. ':uids')) do
  redis.call('DEL', p .. ':u:' .. uid)
end
local resumes = redis.call('HGETALL', p .. ':rs')
for k = 2, #resumes, 2 do
  if resumes[k] ~= '' then redis.call('PEXPIRE', p .. ':r:' .. resumes[k], ARGV[3]) end
end
local removed = redis.call('HLEN', p .. ':clients')
redis.call('DEL', p .. ':groups', p .. ':uids', p .. ':clients', p .. ':uid', p .. ':cg', p .. ':rs')
if ARGV[1] == 'leave' then redis.call('DEL', p .. ':alive') end
return removed
