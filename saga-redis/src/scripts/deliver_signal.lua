-- deliver_signal.lua: stores a signal in a saga's inbox and appends its event, once per
-- (name, key). Needs no lease and works on a quarantined saga (the signal is kept for when
-- it is released). A saga nobody holds (and that is not quarantined) becomes due at once,
-- so a worker resumes the wait; a held one keeps its lease (the holder reads the inbox, and
-- a wait it commits with the 'await' schedule sees the signal: see commit.lua). Making a
-- saga due PUBLISHes 'signal <id>' on the prefix's wake channel (<prefix>:wake).
--
-- The inbox is a list whose entries are the signals encoded by the client (a JSON object
-- {"name", "key", "payload", "at"}); a signal's sequence number is its position plus one.
-- The keys hash maps '<byte length of name>:<name><key>' to the sequence number of the
-- first delivery; a repeat compares its payload with that delivery's.
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  events list        <prefix>:{pNN}:events:<id>
-- KEYS[3]  due zset           <prefix>:{pNN}:due
-- KEYS[4]  quarantine hash    <prefix>:{pNN}:quarantine
-- KEYS[5]  signal inbox list  <prefix>:{pNN}:signals:<id>
-- KEYS[6]  signal keys hash   <prefix>:{pNN}:signal_keys:<id>
-- ARGV[1]  saga id
-- ARGV[2]  signal name
-- ARGV[3]  signal key
-- ARGV[4]  encoded payload
-- ARGV[5]  encoded inbox entry (the same name, key and payload, and the sending time)
-- ARGV[6]  encoded event
-- ARGV[7]  max payload bytes
-- ARGV[8]  max signals per saga
--
-- Returns {'delivered', sequence, due (1 = made due now, 0 = held or quarantined)}
--       | {'duplicate', sequence of the first delivery}
--       | {'conflict'} (delivered before with another payload)
--       | {'finished', status} | {'not_found'} | {'corrupt', problem}
--       | {'inbox_full', limit} | {'too_large', what, size, limit} | {'invalid', message}

if #KEYS ~= 6 or #ARGV ~= 8 then
  return { 'invalid', 'deliver_signal: expected 6 keys and 8 arguments' }
end
local id, name, key, payload, entry, event = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if not is_uint(ARGV[7]) or not is_uint(ARGV[8]) then
  return { 'invalid', 'deliver_signal: max payload and max signals must be non-negative integers' }
end
local max, max_signals = tonumber(ARGV[7]), tonumber(ARGV[8])
local err = too_large('signal payload', payload, max) or too_large('event', event, max)
  or expect_type(KEYS[2], 'list') or expect_type(KEYS[3], 'zset') or expect_type(KEYS[4], 'hash')
  or expect_type(KEYS[5], 'list') or expect_type(KEYS[6], 'hash')
local f, refused = load_saga_or_reply(KEYS[1], err)
if refused then
  return refused
end
if TERMINAL[f.status] then
  return { 'finished', f.status }
end

local count = redis.call('LLEN', KEYS[5])
local field = #name .. ':' .. name .. key
local earlier = redis.call('HGET', KEYS[6], field)
if earlier then
  if not is_uint(earlier) or tonumber(earlier) < 1 or tonumber(earlier) > count then
    return { 'corrupt', 'field ' .. describe(field) .. ' of ' .. KEYS[6] .. ' is ' .. describe(earlier)
      .. ', expected a sequence number from 1 to ' .. count }
  end
  local stored = redis.call('LINDEX', KEYS[5], tonumber(earlier) - 1)
  local ok, decoded = pcall(cjson.decode, stored)
  if not ok or type(decoded) ~= 'table' or type(decoded.payload) ~= 'string' then
    return { 'corrupt', 'signal ' .. earlier .. ' of ' .. KEYS[5] .. ' is ' .. describe(stored)
      .. ', expected a JSON object with a payload' }
  end
  if decoded.payload ~= payload then
    return { 'conflict' }
  end
  return { 'duplicate', tonumber(earlier) }
end
-- The engine's own signals (names starting with saga_core::store::ENGINE_SIGNAL_PREFIX,
-- `saga.`: a child waking its parent) are not held back by the inbox limit.
if count >= max_signals and string.sub(name, 1, 5) ~= 'saga.' then
  return { 'inbox_full', max_signals }
end

-- Validated; write (the wake-up first: see publish_wake).
local now = now_ms()
local sequence = count + 1
local held = f.owner and f.lease_until > now
local due = 0
if not held and redis.call('HEXISTS', KEYS[4], id) == 0 then
  due = 1
  publish_wake(KEYS[1], 'signal', id)
end
redis.call('RPUSH', KEYS[5], entry)
redis.call('HSET', KEYS[6], field, int(sequence))
redis.call('HSET', KEYS[1], 'updated_at', int(now))
redis.call('RPUSH', KEYS[2], event)
if due == 1 then
  redis.call('ZADD', KEYS[3], int(now), id)
end
return { 'delivered', sequence, due }
