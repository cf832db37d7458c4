-- signals.lua: a saga's signal inbox past a sequence number, oldest first. Read-only. The
-- entries are returned as stored (the client decodes them); a signal's sequence number is
-- its position in the list plus one.
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  signal inbox list  <prefix>:{pNN}:signals:<id>
-- ARGV[1]  after: the last sequence number not wanted (0 for the whole inbox)
--
-- Returns {'ok', sequence number of the first entry, entry, ...} | {'not_found'}
--       | {'corrupt', problem} | {'invalid', message}

if #KEYS ~= 2 or #ARGV ~= 1 then
  return { 'invalid', 'signals: expected 2 keys and 1 argument' }
end
if not is_uint(ARGV[1]) then
  return { 'invalid', 'signals: after must be a non-negative integer' }
end
if key_type(KEYS[1]) == 'none' then
  return { 'not_found' }
end
local err = expect_type(KEYS[2], 'list')
if err then
  return err
end
local after = tonumber(ARGV[1])
local reply = { 'ok', after + 1 }
local entries = redis.call('LRANGE', KEYS[2], int(after), -1)
for i = 1, #entries do
  reply[i + 2] = entries[i]
end
return reply
