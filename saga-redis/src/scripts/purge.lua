-- purge.lua: deletes up to `limit` finished sagas of ONE partition last written at least
-- `older_than` ms ago (by the terminal index's scores), with their histories and index
-- entries and signal inboxes.
--
-- Key names: the saga hash, events list, signal inbox, signal keys hash and type index of
-- each saga are NOT in KEYS; the script builds them from the partition's key base (ARGV[1], e.g. 'saga:{p07}:'), the id and
-- the hash's type_key field. They share the partition's hash tag, so they are in the same
-- slot as KEYS by construction (Redis Cluster safe); the script checks that every KEYS entry
-- starts with that base.
--
-- A terminal-index entry whose saga is not a finished saga (wrong key type, corrupt or not
-- terminal) is not deleted: it is dropped from the terminal index, and a corrupt one is
-- quarantined with a reason, so it cannot block later purges.
--
-- KEYS[1]  terminal zset      <prefix>:{pNN}:terminal
-- KEYS[2]  all-ids zset       <prefix>:{pNN}:ids
-- KEYS[3]  due zset           <prefix>:{pNN}:due
-- KEYS[4]  quarantine hash    <prefix>:{pNN}:quarantine
-- KEYS[5..9] status indexes   <prefix>:{pNN}:status:<running|compensating|completed|compensated|failed>
-- ARGV[1]  partition key base <prefix>:{pNN}:
-- ARGV[2]  older_than, ms
-- ARGV[3]  limit
--
-- Returns {'ok', deleted count} | {'corrupt', problem} | {'invalid', message}

if #KEYS ~= 9 or #ARGV ~= 3 then
  return { 'invalid', 'purge: expected 9 keys and 3 arguments' }
end
local base = ARGV[1]
for i = 1, #KEYS do
  if string.sub(KEYS[i], 1, #base) ~= base then
    return { 'invalid', 'purge: the key base ' .. base .. ' is not the partition of the keys' }
  end
end
if not is_ms(ARGV[2]) or not is_uint(ARGV[3]) then
  return { 'invalid', 'purge: older_than and limit must be non-negative integers' }
end
local older_than, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local err = expect_type(KEYS[1], 'zset') or expect_type(KEYS[2], 'zset') or expect_type(KEYS[3], 'zset')
  or expect_type(KEYS[4], 'hash') or expect_types(KEYS, 5, 9, 'zset')
if err then
  return err
end
if limit == 0 then
  return { 'ok', 0 }
end

local cutoff = now_ms() - older_than
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(cutoff), 'LIMIT', 0, limit)
local deleted = 0
for _, id in ipairs(ids) do
  local key = base .. 'saga:' .. id
  local t = key_type(key)
  local f, problem = nil, nil
  if t == 'hash' then
    f, problem = read_saga(key)
  elseif t ~= 'none' then
    problem = 'key ' .. key .. ' has type ' .. t .. ', expected hash'
  end
  local type_index = f and (base .. 'type:' .. f.type_key)
  local events = base .. 'events:' .. id
  if problem then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HSET', KEYS[4], id, 'corrupt saga found by purge: ' .. problem)
  elseif f and not TERMINAL[f.status] then
    redis.call('ZREM', KEYS[1], id)
  elseif (f == nil or expect_type(type_index, 'zset') == nil) and expect_type(events, 'list') == nil then
    -- The signal keys go with the saga whatever their type: nothing reads them once it is gone.
    redis.call('DEL', key, events, base .. 'signals:' .. id, base .. 'signal_keys:' .. id)
    if type_index then
      redis.call('ZREM', type_index, id)
    end
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
    for i = 5, 9 do
      redis.call('ZREM', KEYS[i], id)
    end
    if t == 'hash' then
      deleted = deleted + 1
    end
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('HSET', KEYS[4], id, 'purge found an index key of the wrong type for this saga')
  end
end
return { 'ok', deleted }
