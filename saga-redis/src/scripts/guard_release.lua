-- guard_release.lua: gives up a key claimed with `token` (the effect failed) so that a
-- retry can claim it. Does nothing when the token does not own an in-progress claim.
--
-- KEYS[1]  guard hash         <prefix>:{pNN}:guard:<UUID v5 of the user's key>
-- ARGV[1]  token from guard_claim
--
-- Returns {'ok', released (0|1)} | {'corrupt', problem} | {'invalid', message}

if #KEYS ~= 1 or #ARGV ~= 1 then
  return { 'invalid', 'guard_release: expected 1 key and 1 argument' }
end
local err = expect_type(KEYS[1], 'hash')
if err then
  return err
end
local r = redis.call('HMGET', KEYS[1], 'token', 'done')
if r[1] ~= ARGV[1] or r[2] ~= '0' then
  return { 'ok', 0 }
end

-- Validated; write.
redis.call('DEL', KEYS[1])
return { 'ok', 1 }
