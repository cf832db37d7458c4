-- meta.lua: records the deployment's partition count and key layout version on first use,
-- and returns what is recorded, so that a store configured differently refuses to start
-- (its sagas would be looked up in the wrong partitions).
--
-- KEYS[1]  meta hash          <prefix>:meta
-- ARGV[1]  partition count
-- ARGV[2]  key layout version
--
-- Returns {'ok', recorded partition count, recorded layout version}
--       | {'corrupt', problem} | {'invalid', message}

if #KEYS ~= 1 or #ARGV ~= 2 then
  return { 'invalid', 'meta: expected 1 key and 2 arguments' }
end
if not is_uint(ARGV[1]) or not is_uint(ARGV[2]) then
  return { 'invalid', 'meta: partition count and layout version must be integers' }
end
local err = expect_type(KEYS[1], 'hash')
if err then
  return err
end
if key_type(KEYS[1]) == 'none' then
  redis.call('HSET', KEYS[1], 'partitions', ARGV[1], 'layout', ARGV[2], 'created_at', int(now_ms()))
end
local r = redis.call('HMGET', KEYS[1], 'partitions', 'layout')
if not is_uint(r[1]) or not is_uint(r[2]) then
  return { 'corrupt', 'meta key ' .. KEYS[1] .. ' has partitions ' .. describe(r[1]) .. ' and layout ' .. describe(r[2]) }
end
return { 'ok', tonumber(r[1]), tonumber(r[2]) }
