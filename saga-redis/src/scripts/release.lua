-- release.lua: gives a held lease up; the saga is due again at once. Fenced like a commit.
-- PUBLISHes 'released <id>' on the prefix's wake channel (<prefix>:wake).
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  due zset           <prefix>:{pNN}:due
-- KEYS[3]  quarantine hash    <prefix>:{pNN}:quarantine
-- ARGV[1]  saga id
-- ARGV[2]  fencing token
--
-- Returns {'ok'}
--       | {'fenced', current fence, current owner ('' for none)}
--       | {'not_writable', status} | {'not_found'} | {'corrupt', problem} | {'invalid', message}

if #KEYS ~= 3 or #ARGV ~= 2 then
  return { 'invalid', 'release: expected 3 keys and 2 arguments' }
end
local id = ARGV[1]
if not is_uint(ARGV[2]) then
  return { 'invalid', 'release: the fence must be a non-negative integer' }
end
local err = expect_type(KEYS[2], 'zset') or expect_type(KEYS[3], 'hash')
if err then
  return err
end
local refused = writable_saga(KEYS[1], KEYS[3], id, tonumber(ARGV[2]))
if refused then
  return refused
end

-- Validated; write.
-- The wake-up first: see publish_wake.
publish_wake(KEYS[1], 'released', id)
redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
redis.call('ZADD', KEYS[2], int(now_ms()), id)
return { 'ok' }
