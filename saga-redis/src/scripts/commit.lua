-- commit.lua: one atomic step transition of a saga, in one round trip: checks the fencing
-- token, applies the transition at most once (by commit id), appends the events, replaces
-- the state, moves the saga between the status indexes, applies the schedule to the lease
-- and the due set, and reports the cancel flag.
--
-- Idempotency: when the saga's current fence is the caller's and its last applied commit id
-- is ARGV[4], the commit was applied already (its reply was lost): the script answers 'ok'
-- again and writes nothing.
--
-- Schedules: 'continue' keeps the lease (it expires at now + ARGV[7] ms, and that is the due
-- time); 'wake' drops the lease and makes the saga due at now + ARGV[7] ms (a durable timer);
-- 'await' (a wait for a signal) drops the lease like 'wake', due at now + ARGV[7] ms (the
-- wait's timeout), or at now when the signal inbox holds more than ARGV[10] signals (one
-- arrived after the holder last read the inbox, so the wait must look again); 'finished'
-- drops the lease, removes the saga from the due set and enters it in the terminal index
-- (scored by this write's time, for purge).
--
-- Wake-ups: a 'finished' commit PUBLISHes 'finished <id>', a 'wake' commit with a zero delay
-- or an 'await' commit due at once 'due <id>', on the prefix's wake channel
-- (<prefix>:wake); other commits publish nothing.
--
-- KEYS[1]  saga hash          <prefix>:{pNN}:saga:<id>
-- KEYS[2]  events list        <prefix>:{pNN}:events:<id>
-- KEYS[3]  due zset           <prefix>:{pNN}:due
-- KEYS[4]  quarantine hash    <prefix>:{pNN}:quarantine
-- KEYS[5]  terminal zset      <prefix>:{pNN}:terminal
-- KEYS[6..10] status indexes  <prefix>:{pNN}:status:<running|compensating|completed|compensated|failed>
-- KEYS[11] signal inbox list  <prefix>:{pNN}:signals:<id> (read by 'await' only)
-- ARGV[1]  saga id
-- ARGV[2]  owner (of the lease; kept as the holder under 'continue')
-- ARGV[3]  fencing token
-- ARGV[4]  commit id
-- ARGV[5]  new status
-- ARGV[6]  schedule: 'continue' | 'wake' | 'await' | 'finished'
-- ARGV[7]  schedule duration, ms (lease ttl for 'continue', delay for 'wake', timeout for
--          'await', 0 otherwise)
-- ARGV[8]  max payload bytes
-- ARGV[9]  encoded new state
-- ARGV[10] signals seen: the highest sequence number the holder has read ('await'; 0 otherwise)
-- ARGV[11] event count n, then ARGV[12 .. 11+n] the encoded events
--
-- Returns {'ok', cancel (0|1), applied (1 = now, 0 = earlier)}
--       | {'fenced', current fence, current owner ('' for none)}
--       | {'not_writable', status} | {'not_found'} | {'corrupt', problem}
--       | {'too_large', what, size, limit} | {'invalid', message}

if #KEYS ~= 11 then
  return { 'invalid', 'commit: expected 11 keys, got ' .. #KEYS }
end
if #ARGV < 11 then
  return { 'invalid', 'commit: expected at least 11 arguments, got ' .. #ARGV }
end
local id, owner, commit_id, status, schedule, state = ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6], ARGV[9]
if not is_uint(ARGV[3]) or not is_ms(ARGV[7]) or not is_uint(ARGV[8]) or not is_uint(ARGV[10])
  or not is_uint(ARGV[11]) then
  return { 'invalid', 'commit: fence, duration, max payload, signals seen and event count must be non-negative integers' }
end
local fence, span, max, seen, n = tonumber(ARGV[3]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[10]), tonumber(ARGV[11])
if #ARGV ~= 11 + n then
  return { 'invalid', 'commit: expected ' .. (11 + n) .. ' arguments, got ' .. #ARGV }
end
if not STATUS_INDEX[status] then
  return { 'invalid', 'commit: unknown status ' .. describe(status) }
end
if schedule ~= 'continue' and schedule ~= 'wake' and schedule ~= 'await' and schedule ~= 'finished' then
  return { 'invalid', 'commit: unknown schedule ' .. describe(schedule) }
end
if (TERMINAL[status] ~= nil) ~= (schedule == 'finished') then
  return { 'invalid', 'status ' .. status .. ' does not go with schedule ' .. schedule }
end
local err = too_large('saga state', state, max) or too_large('owner', owner, max)
  or too_large('commit id', commit_id, max) or events_too_large(12, 11 + n, max) or expect_rewrite_keys()
  or expect_type(KEYS[11], 'list')
if err then
  return err
end

local refused, f = writable_saga(KEYS[1], KEYS[4], id, fence)
if f and f.fence == fence and f.last_commit == commit_id and commit_id ~= '' then
  -- Applied earlier (even if that commit finished or the saga was set aside since).
  return { 'ok', tonumber(f.cancel), 0 }
end
if refused then
  return refused
end

-- Validated; write (the wake-up first: see publish_wake).
if schedule == 'await' and redis.call('LLEN', KEYS[11]) > seen then
  span = 0
end
if schedule == 'finished' then
  publish_wake(KEYS[1], 'finished', id)
elseif (schedule == 'wake' or schedule == 'await') and span == 0 then
  publish_wake(KEYS[1], 'due', id)
end
local now = now_ms()
for i = 12, 11 + n do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
redis.call('HSET', KEYS[1], 'state', state, 'status', status, 'updated_at', int(now), 'last_commit', commit_id)
if f.status ~= status then
  redis.call('ZREM', status_key(KEYS, 6, f.status), id)
  redis.call('ZADD', status_key(KEYS, 6, status), 0, id)
end
if schedule == 'continue' then
  local until_ms = now + span
  redis.call('HSET', KEYS[1], 'owner', owner, 'lease_until', int(until_ms))
  redis.call('ZADD', KEYS[3], int(until_ms), id)
elseif schedule == 'wake' then
  redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
  redis.call('ZADD', KEYS[3], int(now + span), id)
elseif schedule == 'await' then
  redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
  redis.call('ZADD', KEYS[3], int(now + span), id)
else
  redis.call('HDEL', KEYS[1], 'owner', 'lease_until')
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[5], int(now), id)
end
return { 'ok', tonumber(f.cancel), 1 }
