-- guard_complete.lua: records an effect's encoded result under a key claimed with `token`,
-- kept for `ttl`. Refused when the token no longer owns the key (the claim lapsed, was
-- released or was taken over) or the record is completed already.
--
-- KEYS[1]  guard hash         <prefix>:{pNN}:guard:<UUID v5 of the user's key>
-- ARGV[1]  token from guard_claim
-- ARGV[2]  encoded result
-- ARGV[3]  result ttl, ms
-- ARGV[4]  max payload bytes
--
-- Returns {'ok'} | {'lost'} | {'corrupt', problem} | {'too_large', ...} | {'invalid', message}

if #KEYS ~= 1 or #ARGV ~= 4 then
  return { 'invalid', 'guard_complete: expected 1 key and 4 arguments' }
end
local token, result = ARGV[1], ARGV[2]
if not is_ms(ARGV[3]) or not is_uint(ARGV[4]) then
  return { 'invalid', 'guard_complete: ttl and max payload must be non-negative integers' }
end
local err = too_large('idempotency result', result, tonumber(ARGV[4])) or expect_type(KEYS[1], 'hash')
if err then
  return err
end
local r = redis.call('HMGET', KEYS[1], 'token', 'done')
if r[1] ~= token or r[2] ~= '0' then
  return { 'lost' }
end

-- Validated; write.
redis.call('HSET', KEYS[1], 'done', '1', 'result', result)
redis.call('HDEL', KEYS[1], 'token')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return { 'ok' }
