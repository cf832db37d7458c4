-- renew.lua: extends a held lease by ttl from now, if the caller's fencing token is the
-- saga's current one and the saga is neither finished nor quarantined. Reports the cancel
-- flag, so a holder learns of a cancel request without an extra round trip.
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  due zset           <prefix>:{pNN}:due
-- KEYS[3]  quarantine hash    <prefix>:{pNN}:quarantine
-- ARGV[1]  saga id
-- ARGV[2]  owner
-- ARGV[3]  fencing token
-- ARGV[4]  lease ttl, ms
-- ARGV[5]  max payload bytes (bounds the owner)
--
-- Returns {'ok', cancel (0|1), lease_until}
--       | {'fenced', current fence, current owner ('' for none)}
--       | {'not_writable', status} | {'not_found'} | {'corrupt', problem}
--       | {'too_large', ...} | {'invalid', message}

if #KEYS ~= 3 or #ARGV ~= 5 then
  return { 'invalid', 'renew: expected 3 keys and 5 arguments' }
end
local id, owner = ARGV[1], ARGV[2]
if not is_uint(ARGV[3]) or not is_ms(ARGV[4]) or not is_uint(ARGV[5]) then
  return { 'invalid', 'renew: fence, ttl and max payload must be non-negative integers' }
end
local fence, ttl, max = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local err = too_large('owner', owner, max) or expect_type(KEYS[2], 'zset') or expect_type(KEYS[3], 'hash')
if err then
  return err
end
local refused, f = writable_saga(KEYS[1], KEYS[3], id, fence)
if refused then
  return refused
end

-- Validated; write.
local until_ms = now_ms() + ttl
redis.call('HSET', KEYS[1], 'owner', owner, 'lease_until', int(until_ms))
redis.call('ZADD', KEYS[2], int(until_ms), id)
return { 'ok', tonumber(f.cancel), until_ms }
