-- guard_claim.lua: claims an idempotency record for running an effect (the step guard).
-- The record is a hash with a TTL: while in progress it expires after the in-progress ttl
-- (so a dead holder blocks others only that long); once completed, after the result ttl.
-- This is SET NX PX with a fingerprint check: a free (or expired) key is created with the
-- caller's token; an existing one is reported.
--
-- KEYS[1]  guard hash         <prefix>:{pNN}:guard:<UUID v5 of the user's key>
-- ARGV[1]  request fingerprint
-- ARGV[2]  new token (random, from the client)
-- ARGV[3]  in-progress ttl, ms
-- ARGV[4]  max payload bytes (bounds the fingerprint)
--
-- Returns {'claimed'}                  ARGV[2] now owns the key
--       | {'completed', result}        same fingerprint, the effect ran: its encoded result
--       | {'in_progress'}              same fingerprint, another holder runs it now
--       | {'conflict'}                 another fingerprint
--       | {'corrupt', problem} | {'too_large', ...} | {'invalid', message}

if #KEYS ~= 1 or #ARGV ~= 4 then
  return { 'invalid', 'guard_claim: expected 1 key and 4 arguments' }
end
local fingerprint, token = ARGV[1], ARGV[2]
if not is_ms(ARGV[3]) or not is_uint(ARGV[4]) or token == '' then
  return { 'invalid', 'guard_claim: ttl and max payload must be non-negative integers, the token non-empty' }
end
local err = too_large('fingerprint', fingerprint, tonumber(ARGV[4])) or expect_type(KEYS[1], 'hash')
if err then
  return err
end
if key_type(KEYS[1]) == 'hash' then
  local r = redis.call('HMGET', KEYS[1], 'fingerprint', 'done', 'result')
  if not r[1] or (r[2] ~= '0' and r[2] ~= '1') or (r[2] == '1' and not r[3]) then
    return { 'corrupt', 'idempotency record ' .. KEYS[1] .. ' lacks its fingerprint, done flag or result' }
  end
  if r[1] ~= fingerprint then
    return { 'conflict' }
  end
  if r[2] == '1' then
    return { 'completed', r[3] }
  end
  return { 'in_progress' }
end

-- Validated; write.
redis.call('HSET', KEYS[1], 'fingerprint', fingerprint, 'token', token, 'done', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return { 'claimed' }
