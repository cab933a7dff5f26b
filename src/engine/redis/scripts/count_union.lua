-- The size of the union of sets, without sending their members: the
-- distinct uids bound across every node's partition. Redis builds the
-- union in memory: O(total uids), like the query without the script, minus
-- the transfer.
-- KEYS: the sets
local n = 0
for _ in pairs(redis.call('SUNION', unpack(KEYS))) do n = n + 1 end
return n
