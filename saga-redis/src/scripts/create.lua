-- create.lua: creates a saga unless one with the same id exists (create-if-absent; the id of
-- a saga started with an idempotency key is derived from the key, so this is also the
-- idempotency check). Optionally takes the lease for the creating owner.
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  events list        <prefix>:{pNN}:events:<id>
-- KEYS[3]  due zset           <prefix>:{pNN}:due
-- KEYS[4]  all-ids zset       <prefix>:{pNN}:ids
-- KEYS[5]  running index      <prefix>:{pNN}:status:running
-- KEYS[6]  type index         <prefix>:{pNN}:type:<type key>
-- ARGV[1]  saga id
-- ARGV[2]  saga type name (stored as a value, never in a key name)
-- ARGV[3]  type key (UUID v5 of the type name; names the type index)
-- ARGV[4]  fingerprint
-- ARGV[5]  idempotency key ('' for none)
-- ARGV[6]  encoded state
-- ARGV[7]  max payload bytes
-- ARGV[8]  claim owner ('' for no claim)
-- ARGV[9]  claim lease ttl, ms
-- ARGV[10] workflow version (an unsigned 32-bit integer; kept in the hash's `version` field)
-- ARGV[11] event count n (>= 1), then ARGV[12 .. 11+n] the encoded events
--
-- A saga created without a claim PUBLISHes 'created <id>' on the prefix's wake channel
-- (<prefix>:wake), so that a coordinator claims it; one claimed by its creator does not (its
-- creator runs it, and waking every coordinator for nothing would cost each a claim call).
--
-- Returns {'created', fence, now}     fence 1 when claimed (the lease expires at now + ttl),
--                                     0 otherwise (due at once)
--       | {'existing', status}        same id, same fingerprint
--       | {'conflict'}                same id, different fingerprint
--       | {'too_large', what, size, limit} | {'invalid', message} | {'corrupt', problem}

if #KEYS ~= 6 then
  return { 'invalid', 'create: expected 6 keys, got ' .. #KEYS }
end
if #ARGV < 12 then
  return { 'invalid', 'create: expected at least 12 arguments, got ' .. #ARGV }
end
local id, saga_type, type_key, fingerprint, idem, state = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local owner, version = ARGV[8], ARGV[10]
if not is_saga_id(id) or not is_saga_id(type_key) then
  return { 'invalid', 'create: saga id and type key must be UUIDs' }
end
if not is_uint(ARGV[7]) or not is_ms(ARGV[9]) or not is_uint(ARGV[11]) then
  return { 'invalid', 'create: max payload, ttl and event count must be non-negative integers' }
end
if not is_version(version) then
  return { 'invalid', 'create: the workflow version must be an unsigned 32-bit integer, got ' .. describe(version) }
end
local max, ttl, n = tonumber(ARGV[7]), tonumber(ARGV[9]), tonumber(ARGV[11])
if n < 1 then
  return { 'invalid', 'a new saga needs at least its SagaStarted event' }
end
if #ARGV ~= 11 + n then
  return { 'invalid', 'create: expected ' .. (11 + n) .. ' arguments, got ' .. #ARGV }
end
local err = too_large('saga state', state, max) or too_large('saga type name', saga_type, max)
  or too_large('fingerprint', fingerprint, max) or too_large('idempotency key', idem, max)
  or too_large('owner', owner, max) or events_too_large(12, 11 + n, max)
if err then
  return err
end
err = expect_type(KEYS[1], 'hash') or expect_type(KEYS[2], 'list') or expect_type(KEYS[3], 'zset')
  or expect_type(KEYS[4], 'zset') or expect_type(KEYS[5], 'zset') or expect_type(KEYS[6], 'zset')
if err then
  return err
end

if key_type(KEYS[1]) == 'hash' then
  local existing = redis.call('HMGET', KEYS[1], 'status', 'fingerprint')
  if not STATUS_INDEX[existing[1]] then
    return { 'corrupt', 'field status is ' .. describe(existing[1]) }
  end
  if existing[2] ~= fingerprint then
    return { 'conflict' }
  end
  return { 'existing', existing[1] }
end
if key_type(KEYS[2]) ~= 'none' then
  return { 'corrupt', 'key ' .. KEYS[2] .. ' exists without its saga hash' }
end

-- Validated; write (the wake-up first: see publish_wake).
if owner == '' then
  publish_wake(KEYS[1], 'created', id)
end
local now = now_ms()
local fence, due = 0, now
local fields = { 'type', saga_type, 'type_key', type_key, 'status', 'running', 'state', state,
  'fingerprint', fingerprint, 'cancel', '0', 'created_at', int(now), 'updated_at', int(now), 'last_commit', '',
  'version', version }
if idem ~= '' then
  table.insert(fields, 'idempotency_key')
  table.insert(fields, idem)
end
if owner ~= '' then
  fence = 1
  due = now + ttl
  table.insert(fields, 'owner')
  table.insert(fields, owner)
  table.insert(fields, 'lease_until')
  table.insert(fields, int(due))
end
table.insert(fields, 'fence')
table.insert(fields, int(fence))
redis.call('HSET', KEYS[1], unpack(fields))
for i = 12, 11 + n do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
redis.call('ZADD', KEYS[3], int(due), id)
redis.call('ZADD', KEYS[4], 0, id)
redis.call('ZADD', KEYS[5], 0, id)
redis.call('ZADD', KEYS[6], 0, id)
return { 'created', fence, now }
