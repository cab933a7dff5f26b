-- Removes every member of a group from one node's partition.
-- KEYS[1] partition; ARGV[1] group. Returns the members removed.
local p, group = KEYS[1], ARGV[1]
local key = p .. ':g:' .. group
local members = redis.call('SMEMBERS', key)
redis.call('DEL', key)
redis.call('SREM', p .. ':groups', group)
return members
