-- Forgets a connection: its uid, its groups and its session, in one step.
-- KEYS[1] partition; ARGV: client_id, uid ('' = none), groups...
local p, id, uid = KEYS[1], ARGV[1], ARGV[2]
redis.call('HDEL', p .. ':clients', id)
if uid ~= '' then
  redis.call('HDEL', p .. ':uid', id)
  local key = p .. ':u:' .. uid
  redis.call('SREM', key, id)
  if redis.call('SCARD', key) == 0 then redis.call('SREM', p .. ':uids', uid) end
end
for i = 3, #ARGV do
  local key = p .. ':g:' .. ARGV[i]
  redis.call('SREM', key, id)
  if redis.call('SCARD', key) == 0 then redis.call('SREM', p .. ':groups', ARGV[i]) end
end
return 1
