-- quarantine.lua: sets a saga aside with a reason: it leaves the due set, its lease is
-- dropped, and no worker claims it again until an operator acts. Needs no lease, and works
-- on a saga whose hash is corrupt or whose key has the WRONG TYPE: the reason is kept in the
-- partition's quarantine hash, not in the saga hash.
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  due zset           <prefix>:{pNN}:due
-- KEYS[3]  quarantine hash    <prefix>:{pNN}:quarantine
-- KEYS[4]  terminal zset      <prefix>:{pNN}:terminal
-- ARGV[1]  saga id
-- ARGV[2]  reason
-- ARGV[3]  max payload bytes (bounds the reason)
--
-- Returns {'ok'} | {'not_found'} | {'corrupt', problem} (an index key has the wrong type)
--       | {'too_large', ...} | {'invalid', message}

if #KEYS ~= 4 or #ARGV ~= 3 then
  return { 'invalid', 'quarantine: expected 4 keys and 3 arguments' }
end
local id, reason = ARGV[1], ARGV[2]
if not is_uint(ARGV[3]) then
  return { 'invalid', 'quarantine: max payload must be a non-negative integer' }
end
local err = too_large('quarantine reason', reason, tonumber(ARGV[3])) or expect_type(KEYS[2], 'zset')
  or expect_type(KEYS[3], 'hash') or expect_type(KEYS[4], 'zset')
if err then
  return err
end
local t = key_type(KEYS[1])
if t == 'none' then
  return { 'not_found' }
end

-- Validated; write.
redis.call('HSET', KEYS[3], id, reason)
redis.call('ZREM', KEYS[2], id)
if t == 'hash' then
  local now = now_ms()
  redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
  redis.call('HSET', KEYS[1], 'updated_at', int(now))
  if TERMINAL[redis.call('HGET', KEYS[1], 'status')] then
    redis.call('ZADD', KEYS[4], int(now), id)
  end
end
return { 'ok' }
