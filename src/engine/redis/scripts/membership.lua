-- One membership change of a registered connection. A connection that is
-- not registered (already gone) is left alone, so a late command never
-- brings back a closed connection's entries.
-- KEYS[1] partition; ARGV: op, client_id, value, previous uid ('' = none)
local p, op, id, value = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if redis.call('HEXISTS', p .. ':clients', id) == 0 then return 0 end

local function unbind(uid)
  redis.call('HDEL', p .. ':uid', id)
  local key = p .. ':u:' .. uid
  redis.call('SREM', key, id)
  if redis.call('SCARD', key) == 0 then redis.call('SREM', p .. ':uids', uid) end
end

if op == 'bind_uid' then
  if ARGV[4] ~= '' then unbind(ARGV[4]) end
  redis.call('HSET', p .. ':uid', id, value)
  redis.call('SADD', p .. ':u:' .. value, id)
  redis.call('SADD', p .. ':uids', value)
elseif op == 'unbind_uid' then
  unbind(value)
elseif op == 'join_group' then
  redis.call('SADD', p .. ':g:' .. value, id)
  redis.call('SADD', p .. ':groups', value)
elseif op == 'leave_group' then
  local key = p .. ':g:' .. value
  redis.call('SREM', key, id)
  if redis.call('SCARD', key) == 0 then redis.call('SREM', p .. ':groups', value) end
elseif op == 'set_session' then
  redis.call('HSET', p .. ':clients', id, value)
else
  return redis.error_reply('unknown membership op ' .. op)
end
return 1
