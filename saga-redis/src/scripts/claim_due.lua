-- claim_due.lua: claims up to `limit` due sagas (due time <= now: a durable timer passed,
-- never started, released, cancel requested, or a lease expired) from one or more
-- partitions, oldest due time first over all of them, for one owner, in one round trip.
--
-- On a standalone server the client passes every partition that may have due work at once;
-- on a Redis Cluster it calls this once per partition (every key of one call must live in
-- one slot), concurrently, with the share of the batch that partition is to fill.
--
-- Key names: the saga hashes of the candidates are NOT in KEYS; this script builds them from
-- each partition's key base (ARGV[4 + i], e.g. 'saga:{p07}:') and the id. They share the
-- partition's hash tag, so on a Cluster they are in the same slot as that partition's KEYS
-- by construction; the script checks that each partition's KEYS start with its base.
--
-- One bad saga never blocks the others: a candidate whose saga key has the wrong type, or
-- whose hash has a missing or corrupt field, is quarantined here (reason recorded in the
-- quarantine hash, removed from the due set) and the script goes on with the next one. A
-- due entry without a saga (left over) is dropped. Each candidate is validated before the
-- writes that concern it, and nothing after validation can fail. Every candidate looked at
-- leaves the due window (claimed: due at its lease expiry; otherwise removed), so the
-- refill loop below always makes progress.
--
-- KEYS[2i-1]  due zset of partition i         <prefix>:{pNN}:due
-- KEYS[2i]    quarantine hash of partition i  <prefix>:{pNN}:quarantine
-- ARGV[1]     owner
-- ARGV[2]     lease ttl, ms
-- ARGV[3]     max payload bytes (bounds the owner)
-- ARGV[4]     limit: how many sagas to claim at most (1..1000)
-- ARGV[4+i]   key base of partition i         <prefix>:{pNN}:
--
-- Returns {'ok', now, claimed count c, id, fence, ... (c pairs, oldest due first),
--          quarantined count q, id, reason, ... (q pairs),
--          k, next due of partition 1, ..., next due of partition k}
--   where "next due" is the lowest score left in that partition's due set after the claims
--   ('' when it is empty): the client's hint of when the partition next has work.
--       | {'corrupt', problem} | {'too_large', ...} | {'invalid', message}

local k = #KEYS / 2
if #KEYS < 2 or #KEYS % 2 ~= 0 or #ARGV ~= 4 + k then
  return { 'invalid', 'claim_due: expected 2 keys per partition and 4 arguments plus one key base per partition' }
end
local owner = ARGV[1]
if not is_ms(ARGV[2]) or not is_uint(ARGV[3]) or not is_uint(ARGV[4]) then
  return { 'invalid', 'claim_due: ttl, max payload and limit must be non-negative integers' }
end
local ttl, max, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if ttl < 1 then
  return { 'invalid', 'claim_due: the lease ttl must be at least 1 ms' }
end
if limit < 1 or limit > 1000 then
  return { 'invalid', 'claim_due: limit must be between 1 and 1000, got ' .. ARGV[4] }
end
local err = too_large('owner', owner, max)
if err then
  return err
end
for i = 1, k do
  local base, due, quarantine = ARGV[4 + i], KEYS[2 * i - 1], KEYS[2 * i]
  if string.sub(due, 1, #base) ~= base or string.sub(quarantine, 1, #base) ~= base then
    return { 'invalid', 'claim_due: the key base ' .. base .. ' is not the partition of its keys' }
  end
  err = expect_type(due, 'zset') or expect_type(quarantine, 'hash')
  if err then
    return err
  end
end

local now = now_ms()
local until_ms = now + ttl
local claimed, quarantined = {}, {}

local function set_aside(i, id, reason)
  redis.call('HSET', KEYS[2 * i], id, reason)
  redis.call('ZREM', KEYS[2 * i - 1], id)
  quarantined[#quarantined + 1] = id
  quarantined[#quarantined + 1] = reason
end

-- Claims (or clears away) one due entry of partition i.
local function take(i, id)
  local due = KEYS[2 * i - 1]
  if not is_saga_id(id) then
    set_aside(i, id, 'the due set holds ' .. describe(id) .. ', which is not a saga id')
    return
  end
  local key = ARGV[4 + i] .. 'saga:' .. id
  local t = key_type(key)
  if t == 'none' then
    redis.call('ZREM', due, id)
    return
  end
  if t ~= 'hash' then
    set_aside(i, id, 'corrupt saga: key ' .. key .. ' has type ' .. t .. ', expected hash')
    return
  end
  local f, problem = read_saga(key)
  if not f then
    set_aside(i, id, 'corrupt saga: ' .. problem)
  elseif TERMINAL[f.status] or redis.call('HEXISTS', KEYS[2 * i], id) == 1 then
    -- Finished or set aside already: it should not be in the due set at all.
    redis.call('ZREM', due, id)
  else
    local fence = f.fence + 1
    redis.call('HSET', key, 'fence', int(fence), 'owner', owner, 'lease_until', int(until_ms))
    redis.call('ZADD', due, int(until_ms), id)
    claimed[#claimed + 1] = id
    claimed[#claimed + 1] = fence
  end
end

-- Each round merges the oldest due entries of every partition and takes them oldest first;
-- entries cleared away instead of claimed leave room that the next round refills. Bounded,
-- so that a due set full of leftovers cannot make one call run long.
for _ = 1, 4 do
  local want = limit - #claimed / 2
  if want <= 0 then
    break
  end
  local candidates = {}
  for i = 1, k do
    local head = redis.call('ZRANGEBYSCORE', KEYS[2 * i - 1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, want)
    for j = 1, #head, 2 do
      candidates[#candidates + 1] = { tonumber(head[j + 1]), i, head[j] }
    end
  end
  if #candidates == 0 then
    break
  end
  table.sort(candidates, function(a, b)
    if a[1] ~= b[1] then
      return a[1] < b[1]
    end
    if a[2] ~= b[2] then
      return a[2] < b[2]
    end
    return a[3] < b[3]
  end)
  for j = 1, math.min(want, #candidates) do
    take(candidates[j][2], candidates[j][3])
  end
end

local reply = { 'ok', now, #claimed / 2 }
for i = 1, #claimed do
  reply[#reply + 1] = claimed[i]
end
reply[#reply + 1] = #quarantined / 2
for i = 1, #quarantined do
  reply[#reply + 1] = quarantined[i]
end
reply[#reply + 1] = k
for i = 1, k do
  local first = redis.call('ZRANGE', KEYS[2 * i - 1], 0, 0, 'WITHSCORES')
  reply[#reply + 1] = first[2] or ''
end
return reply
