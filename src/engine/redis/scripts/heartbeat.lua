-- Refreshes a node's liveness key, unless another live process holds the
-- same node id (two hosts with one advertised IP and inner port would
-- otherwise write one partition). Returns 1 if the key still existed,
-- 0 if it was gone (expired, purged by another node, or lost by Redis: the
-- node must write its whole partition again), -1 if another instance's key
-- is alive.
-- A gone key is created again only when registering (ARGV[4] = '1'): a
-- plain heartbeat leaves it gone, so every heartbeat answers 0 until the
-- node has registered again, even if the answer of the first one was lost
-- (a connection cut without a reset delivers queued commands late, after
-- their caller gave up on them).
-- KEYS[1] partition; ARGV: info JSON (with "instance"), TTL in ms, instance
-- id, '1' when registering
local key = KEYS[1] .. ':alive'
local current = redis.call('GET', key)
if current then
  local ok, info = pcall(cjson.decode, current)
  if ok and type(info) == 'table' and info.instance and info.instance ~= ARGV[3] then
    return -1
  end
  redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  return 1
end
if ARGV[4] == '1' then redis.call('SET', key, ARGV[1], 'PX', ARGV[2]) end
return 0
