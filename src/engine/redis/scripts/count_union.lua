-- The size of the union of sets, without sending their members: the
-- distinct uids bound across every node's partition. Read-only (SUNION
-- and count), so it runs on replicas too.
-- KEYS: the sets
local n = 0
for _ in pairs(redis.call('SUNION', unpack(KEYS))) do n = n + 1 end
return n
