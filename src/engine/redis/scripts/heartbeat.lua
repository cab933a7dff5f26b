-- Refreshes a node's liveness key. Returns 1 if it still existed, 0 if it
-- had expired or Redis lost it: then the node must register its
-- connections again.
-- KEYS[1] partition; ARGV: info JSON, TTL in ms
local key = KEYS[1] .. ':alive'
local existed = redis.call('EXISTS', key)
redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
return existed
