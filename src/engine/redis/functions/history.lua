-- gatecast's history Functions (docs/publishing.md, docs/redis.md). The
-- node loads this library at every (re)connection with the values below
-- filled in from its options; a backend calls the push function exactly
-- like PUBLISH: FCALL <prefix>_push 1 <channel> <envelope>.
local PREFIX = __PREFIX__
local SIZE = __SIZE__
local TTL = __TTL__
local META_TTL = __META_TTL__
local SHARDED = __SHARDED__
local DEDUP_TTL = __DEDUP_TTL__

-- The stream of a uid, group or all channel.
local function stream_of(channel)
  local p = PREFIX .. ':'
  if string.sub(channel, 1, #p) ~= p then return nil end
  local rest = string.sub(channel, #p + 1)
  if rest == 'all' then return 'all' end
  if string.sub(rest, 1, 4) == 'uid:' and #rest > 4 then return 'u:' .. string.sub(rest, 5) end
  if string.sub(rest, 1, 6) == 'group:' and #rest > 6 then return 'g:' .. string.sub(rest, 7) end
  return nil
end

-- A channel's meta HASH and entries LIST, in the channel's Cluster slot:
-- the channel's own hash tag when it has one, else the whole channel as
-- the tag.
local function keys_of(channel)
  local open = string.find(channel, '{', 1, true)
  local part = '{' .. channel .. '}'
  if open then
    local close = string.find(channel, '}', open + 1, true)
    if close and close > open + 1 then part = channel end
  end
  return PREFIX .. ':hm:' .. part, PREFIX .. ':h:' .. part
end

-- The envelope (a MessagePack map) with n more fields appended.
local function with_fields(env, fields, n)
  local b = string.byte(env, 1)
  if b and b >= 0x80 and b <= 0x8f then
    local count = b - 0x80 + n
    if count <= 15 then return string.char(0x80 + count) .. string.sub(env, 2) .. fields end
    return string.char(0xde, 0, count) .. string.sub(env, 2) .. fields
  elseif b == 0xde then
    local count = string.byte(env, 2) * 256 + string.byte(env, 3) + n
    return string.char(0xde, math.floor(count / 256), count % 256) .. string.sub(env, 4) .. fields
  end
  return nil
end

local function push(keys, args)
  local channel = keys[1]
  local env = args[1]
  local stream = channel and stream_of(channel)
  if not stream then
    return redis.error_reply('ERR gatecast: not a uid, group or all channel of prefix ' .. PREFIX)
  end
  local b = env and string.byte(env, 1)
  if not b or not ((b >= 0x80 and b <= 0x8f) or b == 0xde) then
    return redis.error_reply('ERR gatecast: the envelope must be a MessagePack map')
  end
  local meta, list = keys_of(channel)
  if args[2] then
    -- A push every node got (GatewayWorker's inner port): the first node
    -- to bring this id keeps and publishes it, the others do nothing.
    if not redis.call('SET', list .. ':d:' .. args[2], '1', 'NX', 'EX', DEDUP_TTL) then
      return {false, 0, 0}
    end
  end
  local epoch = redis.call('HGET', meta, 'e')
  local t = redis.call('TIME')
  if not epoch then
    -- A new epoch whenever the meta is missing (never kept, expired, or
    -- Redis lost it): a client's older position is then "not recovered".
    epoch = string.sub(redis.sha1hex(channel .. ':' .. t[1] .. ':' .. t[2]), 1, 16)
    redis.call('DEL', list)
    redis.call('HSET', meta, 'e', epoch)
  end
  local offset = redis.call('HINCRBY', meta, 'o', 1)
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local fields = cmsgpack.pack('s') .. cmsgpack.pack(stream)
    .. cmsgpack.pack('e') .. cmsgpack.pack(epoch)
    .. cmsgpack.pack('o') .. cmsgpack.pack(offset)
    .. cmsgpack.pack('t') .. cmsgpack.pack(ms)
  local entry = with_fields(env, fields, 4)
  redis.call('RPUSH', list, entry)
  redis.call('LTRIM', list, -SIZE, -1)
  redis.call('EXPIRE', list, TTL)
  redis.call('EXPIRE', meta, META_TTL)
  local receivers
  if SHARDED then
    receivers = redis.call('SPUBLISH', channel, entry)
  else
    receivers = redis.call('PUBLISH', channel, entry)
  end
  return {epoch, offset, receivers}
end

-- {epoch, top, entries after ARGV[1]}; epoch is nil when the stream keeps
-- nothing.
local function since(keys, args)
  local channel = keys[1]
  local offset = tonumber(args[1]) or 0
  local meta, list = keys_of(channel)
  local m = redis.call('HMGET', meta, 'e', 'o')
  if not m[1] then return {false, 0, {}} end
  local top = tonumber(m[2]) or 0
  local entries = {}
  if offset < top then
    local len = redis.call('LLEN', list)
    local first = top - len + 1
    local from = offset + 1 - first
    if from < 0 then from = 0 end
    entries = redis.call('LRANGE', list, from, -1)
  end
  return {m[1], top, entries}
end

-- A new epoch for a stream whose history went back (Redis lost its last
-- pushes: a failover to a replica without them, a restart from an older
-- copy) and gives their offsets out again, if it is still at ARGV[1]: a
-- node that delivered the lost pushes saw it. The entries go with the old
-- epoch, as when the meta is missing. 1 if renewed, 0 if not (another node
-- did it, or the stream moved on).
local function new_epoch(keys, args)
  local channel = keys[1]
  if not (channel and stream_of(channel)) then
    return redis.error_reply('ERR gatecast: not a uid, group or all channel of prefix ' .. PREFIX)
  end
  local meta, list = keys_of(channel)
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch or epoch ~= args[1] then return 0 end
  local t = redis.call('TIME')
  local fresh = string.sub(redis.sha1hex(channel .. ':' .. epoch .. ':' .. t[1] .. ':' .. t[2]), 1, 16)
  redis.call('DEL', list)
  redis.call('HSET', meta, 'e', fresh, 'o', 0)
  redis.call('EXPIRE', meta, META_TTL)
  return 1
end

redis.register_function(__PUSH_NAME__, push)
redis.register_function(__NEW_EPOCH_NAME__, new_epoch)
redis.register_function{function_name = __SINCE_NAME__, callback = since, flags = {'no-writes'}}
