-- Refreshes a node's liveness key, unless another live process holds the
-- same node id (two hosts with one advertised IP and inner port would
-- otherwise write one partition). Returns 1 if the key still existed,
-- 0 if it had expired or Redis lost it (the node must register its
-- connections again), -1 if another instance's key is alive.
-- KEYS[1] partition; ARGV: info JSON (with "instance"), TTL in ms, instance id
local key = KEYS[1] .. ':alive'
local current = redis.call('GET', key)
if current then
  local ok, info = pcall(cjson.decode, current)
  if ok and type(info) == 'table' and info.instance and info.instance ~= ARGV[3] then
    return -1
  end
end
redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
if current then return 1 end
return 0
