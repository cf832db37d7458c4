-- claim.lua: takes the lease of one saga for an owner. Succeeds when nobody holds an
-- unexpired lease or the holder is the same owner; the fencing token is incremented either
-- way. The saga's due time becomes the lease expiry (so it is due again if the owner dies).
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  due zset           <prefix>:{pNN}:due
-- KEYS[3]  quarantine hash    <prefix>:{pNN}:quarantine
-- ARGV[1]  saga id
-- ARGV[2]  owner
-- ARGV[3]  lease ttl, ms
-- ARGV[4]  max payload bytes (bounds the owner)
--
-- Returns {'claimed', fence, lease_until}
--       | {'busy', holder, lease_until}
--       | {'not_runnable', status, quarantined (0|1), reason}
--       | {'not_found'} | {'corrupt', problem} | {'too_large', ...} | {'invalid', message}

if #KEYS ~= 3 or #ARGV ~= 4 then
  return { 'invalid', 'claim: expected 3 keys and 4 arguments' }
end
local id, owner = ARGV[1], ARGV[2]
if not is_ms(ARGV[3]) or not is_uint(ARGV[4]) then
  return { 'invalid', 'claim: ttl and max payload must be non-negative integers' }
end
local ttl, max = tonumber(ARGV[3]), tonumber(ARGV[4])
local err = too_large('owner', owner, max) or expect_type(KEYS[2], 'zset') or expect_type(KEYS[3], 'hash')
local f, refused = load_saga_or_reply(KEYS[1], err)
if refused then
  return refused
end
local reason = redis.call('HGET', KEYS[3], id)
if reason or TERMINAL[f.status] then
  return { 'not_runnable', f.status, reason and 1 or 0, reason or '' }
end
local now = now_ms()
if f.owner and f.owner ~= owner and f.lease_until > now then
  return { 'busy', f.owner, f.lease_until }
end

-- Validated; write.
local fence = f.fence + 1
local until_ms = now + ttl
redis.call('HSET', KEYS[1], 'fence', int(fence), 'owner', owner, 'lease_until', int(until_ms))
redis.call('ZADD', KEYS[2], int(until_ms), id)
return { 'claimed', fence, until_ms }
