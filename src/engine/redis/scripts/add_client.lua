-- Registers a connection in its node's partition.
-- KEYS[1] partition; ARGV: client_id, session JSON, uid ('' = none), groups...
local p, id, uid = KEYS[1], ARGV[1], ARGV[3]
redis.call('HSET', p .. ':clients', id, ARGV[2])
if uid ~= '' then
  redis.call('HSET', p .. ':uid', id, uid)
  redis.call('SADD', p .. ':u:' .. uid, id)
  redis.call('SADD', p .. ':uids', uid)
end
for i = 4, #ARGV do
  redis.call('SADD', p .. ':g:' .. ARGV[i], id)
  redis.call('SADD', p .. ':groups', ARGV[i])
end
return 1
