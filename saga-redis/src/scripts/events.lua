-- events.lua: the whole encoded event history of a saga, oldest first. Read-only. The
-- history is returned even when the saga hash itself is corrupt (it is the audit trail an
-- operator needs then).
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  events list        <prefix>:{pNN}:events:<id>
--
-- Returns {'ok', event, ...} | {'not_found'} | {'corrupt', problem}

if #KEYS ~= 2 or #ARGV ~= 0 then
  return { 'invalid', 'events: expected 2 keys and no arguments' }
end
if key_type(KEYS[1]) == 'none' then
  return { 'not_found' }
end
local err = expect_type(KEYS[2], 'list')
if err then
  return err
end
local reply = { 'ok' }
local events = redis.call('LRANGE', KEYS[2], 0, -1)
for i = 1, #events do
  reply[i + 1] = events[i]
end
return reply
