-- office_snapshot.lua: reads every key of the back office in one atomic step, so that the
-- books and the ledger of a snapshot agree even while effects are being applied. Read only.
--
-- KEYS[1..9]  the keys of office_apply.lua, in its order: results, entries, duplicates,
--             deal records, CRM, portfolio, committee, partners, audit
-- ARGV        none
--
-- Returns {'ok', results, entries, duplicates, deal records, CRM, portfolio, committee,
--          partners, audit}: hashes as flat field/value arrays, lists oldest first,
--          duplicates as the counter's text or nil
--       | {'invalid', problem} (wrong argument count) | {'corrupt', problem} (a key has the
--          wrong type)

if #KEYS ~= 9 or #ARGV ~= 0 then
  return { 'invalid', 'office_snapshot: expected 9 keys and no arguments' }
end
local TYPES = { 'hash', 'list', 'string', 'hash', 'hash', 'hash', 'list', 'list', 'hash' }
for i, want in ipairs(TYPES) do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= want then
    return { 'corrupt', 'key ' .. KEYS[i] .. ' has type ' .. t .. ', expected ' .. want }
  end
end
local function read(i)
  if TYPES[i] == 'hash' then
    return redis.call('HGETALL', KEYS[i])
  elseif TYPES[i] == 'list' then
    return redis.call('LRANGE', KEYS[i], 0, -1)
  end
  return redis.call('GET', KEYS[i])
end
local reply = { 'ok' }
for i = 1, #TYPES do
  reply[i + 1] = read(i)
end
return reply
