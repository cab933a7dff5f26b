-- Members of a set in a node's partition with one hash field each, in one
-- round trip: group sessions (hash 'clients') or group uids (hash 'uid').
-- KEYS[1] partition; ARGV: set suffix, hash suffix.
-- Returns a flat list: member, value, member, value... (nil if no value)
local p = KEYS[1]
local members = redis.call('SMEMBERS', p .. ARGV[1])
local out = {}
-- HMGET in chunks: Lua's unpack() takes at most a few thousand values.
for first = 1, #members, 1000 do
  local last = math.min(first + 999, #members)
  local values = redis.call('HMGET', p .. ARGV[2], unpack(members, first, last))
  for i = first, last do
    out[#out + 1] = members[i]
    out[#out + 1] = values[i - first + 1]
  end
end
return out
