-- operator_transition.lua: an operator's transition of a saga (retry, abandon), outside any
-- lease. Takes the saga from whoever holds it: the fencing token is incremented and the lease
-- dropped, so a running holder is fenced out and writes nothing more. Checks that the saga's
-- status is one of the expected ones (terminal statuses included, to reopen a failed saga),
-- then appends the events, replaces the state, moves the saga between the status indexes and
-- applies the schedule. Applied at most once per commit id.
--
-- Idempotency: when the saga's last applied commit id is ARGV[2], the transition was applied
-- already (its reply was lost): the script answers 'ok' again and writes nothing (no fence
-- increment, no status check: the status is the transition's own by then).
--
-- Schedules: 'wake' (non-terminal status only) makes the saga due at now + ARGV[5] ms with no
-- lease, takes it out of the quarantine hash and out of the terminal index (a reopened saga is
-- no longer finished, so purge must not take it); 'finished' (terminal status only) removes it
-- from the due set and enters it in the terminal index, scored by this write's time. A
-- quarantined saga that is finished stays in the quarantine hash (with its reason).
--
-- Every applied transition PUBLISHes 'operator <id>' on the prefix's wake channel
-- (<prefix>:wake); PUBLISH takes no key, so this is cluster-safe.
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  events list        <prefix>:{pNN}:events:<id>
-- KEYS[3]  due zset           <prefix>:{pNN}:due
-- KEYS[4]  quarantine hash    <prefix>:{pNN}:quarantine
-- KEYS[5]  terminal zset      <prefix>:{pNN}:terminal
-- KEYS[6..10] status indexes  <prefix>:{pNN}:status:<running|compensating|completed|compensated|failed>
-- ARGV[1]  saga id
-- ARGV[2]  commit id ('' never matches an earlier one)
-- ARGV[3]  new status
-- ARGV[4]  schedule: 'wake' | 'finished'
-- ARGV[5]  delay, ms ('wake'; 0 for 'finished')
-- ARGV[6]  max payload bytes
-- ARGV[7]  encoded new state
-- ARGV[8]  expected statuses, comma-separated ('' for none: every status is refused)
-- ARGV[9]  event count n, then ARGV[10 .. 9+n] the encoded events
--
-- Returns {'ok', cancel (0|1), applied (1 = now, 0 = earlier)}
--       | {'not_writable', status}   the status is not one of the expected ones
--       | {'not_found'} | {'corrupt', problem}
--       | {'too_large', what, size, limit} | {'invalid', message}

if #KEYS ~= 10 then
  return { 'invalid', 'operator_transition: expected 10 keys, got ' .. #KEYS }
end
if #ARGV < 9 then
  return { 'invalid', 'operator_transition: expected at least 9 arguments, got ' .. #ARGV }
end
local id, commit_id, status, schedule, state = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[7]
if not is_saga_id(id) then
  return { 'invalid', 'operator_transition: the saga id must be a UUID' }
end
if not is_ms(ARGV[5]) or not is_uint(ARGV[6]) or not is_uint(ARGV[9]) then
  return { 'invalid', 'operator_transition: delay, max payload and event count must be non-negative integers' }
end
local delay, max, n = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[9])
if #ARGV ~= 9 + n then
  return { 'invalid', 'operator_transition: expected ' .. (9 + n) .. ' arguments, got ' .. #ARGV }
end
if not STATUS_INDEX[status] then
  return { 'invalid', 'operator_transition: unknown status ' .. describe(status) }
end
if schedule ~= 'wake' and schedule ~= 'finished' then
  return { 'invalid', 'an operator transition cannot use schedule ' .. describe(schedule) }
end
if (TERMINAL[status] ~= nil) ~= (schedule == 'finished') then
  return { 'invalid', 'an operator transition to ' .. status .. ' cannot use schedule ' .. schedule }
end
local expected = {}
for name in string.gmatch(ARGV[8], '[^,]+') do
  if not STATUS_INDEX[name] then
    return { 'invalid', 'operator_transition: unknown expected status ' .. describe(name) }
  end
  expected[name] = true
end
local err = too_large('saga state', state, max) or too_large('commit id', commit_id, max)
  or events_too_large(10, 9 + n, max) or expect_rewrite_keys()
local f, refused = load_saga_or_reply(KEYS[1], err)
if refused then
  return refused
end
if commit_id ~= '' and f.last_commit == commit_id then
  -- Applied earlier (its reply was lost).
  return { 'ok', tonumber(f.cancel), 0 }
end
if not expected[f.status] then
  return { 'not_writable', f.status }
end

-- Validated; write.
-- The wake-up first: see publish_wake.
publish_wake(KEYS[1], 'operator', id)
local now = now_ms()
for i = 10, 9 + n do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
redis.call('HSET', KEYS[1], 'fence', int(f.fence + 1), 'state', state, 'status', status,
  'updated_at', int(now), 'last_commit', commit_id)
if f.status ~= status then
  redis.call('ZREM', status_key(KEYS, 6, f.status), id)
  redis.call('ZADD', status_key(KEYS, 6, status), 0, id)
end
if schedule == 'wake' then
  redis.call('ZADD', KEYS[3], int(now + delay), id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('ZREM', KEYS[5], id)
else
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[5], int(now), id)
end
return { 'ok', tonumber(f.cancel), 1 }
