-- claim_due.lua: claims the given candidate sagas of ONE partition that are still due
-- (due time <= now: a durable timer passed, never started, or a lease expired), for one
-- owner. The client picks the candidates (the oldest due entries over all partitions) and
-- calls this once per partition.
--
-- Key names: the saga hashes of the candidates are NOT in KEYS; this script builds them from
-- the partition's key base (ARGV[1], e.g. 'saga:{p07}:') and each id. They share the
-- partition's hash tag, so they are in the same slot as KEYS by construction (Redis Cluster
-- safe); the script checks that KEYS[1] starts with that base.
--
-- One bad saga never blocks the others: a candidate whose saga key has the wrong type, or
-- whose hash has a missing or corrupt field, is quarantined here (reason recorded in the
-- quarantine hash, removed from the due set) and the script goes on with the next one. A
-- due entry without a saga (left over) is dropped. Each candidate is validated before the
-- writes that concern it, and nothing after validation can fail.
--
-- KEYS[1]  due zset           <prefix>:{pNN}:due
-- KEYS[2]  quarantine hash    <prefix>:{pNN}:quarantine
-- ARGV[1]  partition key base <prefix>:{pNN}:
-- ARGV[2]  owner
-- ARGV[3]  lease ttl, ms
-- ARGV[4]  max payload bytes (bounds the owner)
-- ARGV[5..] candidate saga ids
--
-- Returns {'ok', now, claimed count c, id, fence, ... (c pairs),
--          quarantined count q, id, reason, ... (q pairs)}
--       | {'corrupt', problem} | {'too_large', ...} | {'invalid', message}

if #KEYS ~= 2 or #ARGV < 4 then
  return { 'invalid', 'claim_due: expected 2 keys and at least 4 arguments' }
end
local base, owner = ARGV[1], ARGV[2]
if string.sub(KEYS[1], 1, #base) ~= base or string.sub(KEYS[2], 1, #base) ~= base then
  return { 'invalid', 'claim_due: the key base ' .. base .. ' is not the partition of the keys' }
end
if not is_ms(ARGV[3]) or not is_uint(ARGV[4]) then
  return { 'invalid', 'claim_due: ttl and max payload must be non-negative integers' }
end
local ttl, max = tonumber(ARGV[3]), tonumber(ARGV[4])
local err = too_large('owner', owner, max) or expect_type(KEYS[1], 'zset') or expect_type(KEYS[2], 'hash')
if err then
  return err
end

local now = now_ms()
local until_ms = now + ttl
local claimed, quarantined = {}, {}

local function set_aside(id, reason)
  redis.call('HSET', KEYS[2], id, reason)
  redis.call('ZREM', KEYS[1], id)
  quarantined[#quarantined + 1] = id
  quarantined[#quarantined + 1] = reason
end

for i = 5, #ARGV do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= now then
    if not is_saga_id(id) then
      set_aside(id, 'the due set holds ' .. describe(id) .. ', which is not a saga id')
    else
      local key = base .. 'saga:' .. id
      local t = key_type(key)
      if t == 'none' then
        redis.call('ZREM', KEYS[1], id)
      elseif t ~= 'hash' then
        set_aside(id, 'corrupt saga: key ' .. key .. ' has type ' .. t .. ', expected hash')
      else
        local f, problem = read_saga(key)
        if not f then
          set_aside(id, 'corrupt saga: ' .. problem)
        elseif TERMINAL[f.status] or redis.call('HEXISTS', KEYS[2], id) == 1 then
          -- Finished or set aside already: it should not be in the due set at all.
          redis.call('ZREM', KEYS[1], id)
        else
          local fence = f.fence + 1
          redis.call('HSET', key, 'fence', int(fence), 'owner', owner, 'lease_until', int(until_ms))
          redis.call('ZADD', KEYS[1], int(until_ms), id)
          claimed[#claimed + 1] = id
          claimed[#claimed + 1] = fence
        end
      end
    end
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
return reply
