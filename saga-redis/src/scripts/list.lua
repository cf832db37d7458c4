-- list.lua: one bounded slice of a listing of ONE partition: walks an index in id order
-- (lexicographic; ids are fixed-width lowercase UUIDs, so this is id order), after a cursor,
-- and returns the sagas that match the filters, until it has `want` rows or has examined
-- `budget` ids. Read-only. The client merges the partitions and calls again where a slice
-- stopped on its budget.
--
-- Key names: the saga hashes are NOT in KEYS; the script builds them from the partition's
-- key base (ARGV[1]) and each id. They share the partition's hash tag, so they are in the
-- same slot as KEYS by construction (Redis Cluster safe); the script checks that KEYS start
-- with that base. Ids whose saga is corrupt (key not a hash, type, status or updated_at
-- missing or malformed, a version that is not an unsigned 32-bit integer) are skipped: one bad saga never
-- breaks a listing. A saga stored before versions were kept has no `version` field: its
-- row says '' for it.
--
-- KEYS[1]  index zset         <prefix>:{pNN}:ids | :status:<status> | :type:<type key>
-- KEYS[2]  quarantine hash    <prefix>:{pNN}:quarantine
-- ARGV[1]  partition key base <prefix>:{pNN}:
-- ARGV[2]  cursor: list ids after this one ('' = from the start)
-- ARGV[3]  want: rows wanted
-- ARGV[4]  budget: ids to examine at most
-- ARGV[5]  status filter ('' = any)
-- ARGV[6]  type filter ('' = any)
--
-- Returns {'ok', exhausted (0|1), last examined id ('' = none), row count r,
--          then r rows of 6: id, type, status, updated_at, version ('' = not stored),
--          quarantine reason ('' = none),
--          then r flags: quarantined (0|1)}
--       | {'corrupt', problem} | {'invalid', message}

if #KEYS ~= 2 or #ARGV ~= 6 then
  return { 'invalid', 'list: expected 2 keys and 6 arguments' }
end
local base, cursor = ARGV[1], ARGV[2]
if string.sub(KEYS[1], 1, #base) ~= base or string.sub(KEYS[2], 1, #base) ~= base then
  return { 'invalid', 'list: the key base ' .. base .. ' is not the partition of the keys' }
end
if not is_uint(ARGV[3]) or not is_uint(ARGV[4]) then
  return { 'invalid', 'list: want and budget must be non-negative integers' }
end
local want, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local status_filter, type_filter = ARGV[5], ARGV[6]
local err = expect_type(KEYS[1], 'zset') or expect_type(KEYS[2], 'hash')
if err then
  return err
end

local rows, flags = {}, {}
local count, examined, last, exhausted = 0, 0, '', 0
local min = '-'
if cursor ~= '' then
  min = '(' .. cursor
end
while count < want and examined < budget do
  local chunk = math.min(budget - examined, 200)
  local ids = redis.call('ZRANGEBYLEX', KEYS[1], min, '+', 'LIMIT', 0, chunk)
  if #ids == 0 then
    exhausted = 1
    break
  end
  for _, id in ipairs(ids) do
    examined = examined + 1
    last = id
    local key = base .. 'saga:' .. id
    if key_type(key) == 'hash' then
      local v = redis.call('HMGET', key, 'type', 'status', 'updated_at', 'version')
      if v[1] and STATUS_INDEX[v[2]] and is_uint(v[3]) and (not v[4] or is_version(v[4]))
          and (status_filter == '' or v[2] == status_filter) and (type_filter == '' or v[1] == type_filter) then
        local reason = redis.call('HGET', KEYS[2], id)
        rows[#rows + 1] = id
        rows[#rows + 1] = v[1]
        rows[#rows + 1] = v[2]
        rows[#rows + 1] = v[3]
        rows[#rows + 1] = v[4] or ''
        rows[#rows + 1] = reason or ''
        flags[#flags + 1] = reason and 1 or 0
        count = count + 1
        if count >= want then
          break
        end
      end
    end
  end
  min = '(' .. last
  if #ids < chunk and count < want then
    exhausted = 1
    break
  end
end

local reply = { 'ok', exhausted, last, count }
for i = 1, #rows do
  reply[#reply + 1] = rows[i]
end
for i = 1, #flags do
  reply[#reply + 1] = flags[i]
end
return reply
