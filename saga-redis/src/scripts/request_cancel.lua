-- request_cancel.lua: sets a saga's cancel flag and appends the cancel event, once. Needs no
-- lease: the holder sees the flag in its next commit or renewal. A saga nobody holds (and
-- that is not quarantined) becomes due at once, so a worker picks it up to compensate. The
-- first request PUBLISHes 'cancel <id>' on the prefix's wake channel (<prefix>:wake).
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  events list        <prefix>:{pNN}:events:<id>
-- KEYS[3]  due zset           <prefix>:{pNN}:due
-- KEYS[4]  quarantine hash    <prefix>:{pNN}:quarantine
-- ARGV[1]  saga id
-- ARGV[2]  encoded cancel event
-- ARGV[3]  max payload bytes
--
-- Returns {'requested', appended (1 = now, 0 = requested earlier)}
--       | {'finished', status} | {'not_found'} | {'corrupt', problem}
--       | {'too_large', ...} | {'invalid', message}

if #KEYS ~= 4 or #ARGV ~= 3 then
  return { 'invalid', 'request_cancel: expected 4 keys and 3 arguments' }
end
local id, event = ARGV[1], ARGV[2]
if not is_uint(ARGV[3]) then
  return { 'invalid', 'request_cancel: max payload must be a non-negative integer' }
end
local err = too_large('event', event, tonumber(ARGV[3])) or expect_type(KEYS[2], 'list')
  or expect_type(KEYS[3], 'zset') or expect_type(KEYS[4], 'hash')
local f, refused = load_saga_or_reply(KEYS[1], err)
if refused then
  return refused
end
if TERMINAL[f.status] then
  return { 'finished', f.status }
end
if f.cancel == '1' then
  return { 'requested', 0 }
end

-- Validated; write.
-- The wake-up first: see publish_wake.
publish_wake(KEYS[1], 'cancel', id)
local now = now_ms()
redis.call('HSET', KEYS[1], 'cancel', '1', 'updated_at', int(now))
redis.call('RPUSH', KEYS[2], event)
local held = f.owner and f.lease_until > now
if not held and redis.call('HEXISTS', KEYS[4], id) == 0 then
  redis.call('ZADD', KEYS[3], int(now), id)
end
return { 'requested', 1 }
