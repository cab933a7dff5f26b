-- Consumes a resume record, once: a second call finds it used. Refuses,
-- consuming nothing, a wrong secret, or (client auth on) a uid other than
-- the JWT's sub. A consumed record is marked used (by the attempt that
-- consumed it, ARGV[6]) and expires after the resume window; the
-- connection it belonged to is marked in ':rs' so that its node never
-- writes the record again. The same attempt asking again (its first answer
-- was lost in a timeout) gets the record again: a consume whose answer
-- went missing does not spend the token for nothing.
-- KEYS[1] partition of the node the token names
-- ARGV: record id, digest of the token's secret, resume window (ms),
--       '1' when the uid must equal ARGV[5], the uid, the attempt's id
-- Returns {'ok', client_id, uid, groups JSON, session JSON} or {reason}
-- with reason 'unknown', 'used', 'forged' or 'sub_mismatch'.
local p = KEYS[1]
local record = p .. ':r:' .. ARGV[1]
local r = redis.call('HMGET', record, 'd', 'c', 'u', 'g', 's', 'used')
if not r[1] then
  if r[6] then return {'used'} end
  return {'unknown'}
end
if r[1] ~= ARGV[2] then return {'forged'} end
if r[6] then
  if r[6] == ARGV[6] then return {'ok', r[2] or '', r[3] or '', r[4] or '[]', r[5] or '{}'} end
  return {'used'}
end
if ARGV[4] == '1' and (r[3] or '') ~= ARGV[5] then return {'sub_mismatch'} end
redis.call('HSET', record, 'used', ARGV[6])
redis.call('PEXPIRE', record, ARGV[3])
if r[2] and redis.call('HGET', p .. ':rs', r[2]) == ARGV[1] then
  redis.call('HSET', p .. ':rs', r[2], '')
end
return {'ok', r[2] or '', r[3] or '', r[4] or '[]', r[5] or '{}'}
