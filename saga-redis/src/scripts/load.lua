-- load.lua: reads one saga: its hash, due time and quarantine reason, with the server's
-- "now" (to tell a live lease from a lapsed one). Read-only.
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  due zset           <prefix>:{pNN}:due
-- KEYS[3]  quarantine hash    <prefix>:{pNN}:quarantine
-- ARGV[1]  saga id
--
-- Returns {'ok', now, due ('' when not due), quarantined (0|1), reason, field, value, ...}
--                                       every field of the saga hash follows, as pairs
--       | {'not_found'}
--       | {'corrupt', problem, quarantined (0|1), reason}   the saga key is not a hash (or an
--                                       index key has the wrong type)

if #KEYS ~= 3 or #ARGV ~= 1 then
  return { 'invalid', 'load: expected 3 keys and 1 argument' }
end
local id = ARGV[1]
local err = expect_type(KEYS[2], 'zset') or expect_type(KEYS[3], 'hash')
if err then
  table.insert(err, 0)
  table.insert(err, '')
  return err
end
local reason = redis.call('HGET', KEYS[3], id)
local quarantined = reason and 1 or 0
local t = key_type(KEYS[1])
if t == 'none' then
  return { 'not_found' }
end
if t ~= 'hash' then
  return { 'corrupt', 'key ' .. KEYS[1] .. ' has type ' .. t .. ', expected hash', quarantined, reason or '' }
end
local due = redis.call('ZSCORE', KEYS[2], id)
local reply = { 'ok', now_ms(), due or '', quarantined, reason or '' }
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields do
  reply[#reply + 1] = fields[i]
end
return reply
