-- count_versions.lua: one bounded slice of the count of ONE partition's active sagas by type
-- and workflow version: walks one status index ('running' or 'compensating') in id order
-- after a cursor, examines at most `budget` ids, and tallies the sagas whose hash has that
-- status by their `type` and `version` fields. Read-only. The client adds the slices up and
-- calls again where a slice stopped on its budget, so one call never runs long however many
-- sagas the partition holds.
--
-- Key names: the saga hashes are NOT in KEYS; the script builds them from the partition's
-- key base (ARGV[1]) and each id. They share the partition's hash tag, so they are in the
-- same slot as KEYS[1] by construction (Redis Cluster safe); the script checks that KEYS[1]
-- starts with that base. Ids whose saga is corrupt (key not a hash, type or status missing
-- or malformed, a version that is not an unsigned 32-bit integer) are skipped, as list.lua skips them. A
-- saga stored before versions were kept has no `version` field: it is tallied under ''.
--
-- KEYS[1]  status index zset  <prefix>:{pNN}:status:<running|compensating>
-- ARGV[1]  partition key base <prefix>:{pNN}:
-- ARGV[2]  the index's status: 'running' | 'compensating'
-- ARGV[3]  cursor: examine ids after this one ('' = from the start)
-- ARGV[4]  budget: ids to examine at most (>= 1)
--
-- Returns {'ok', exhausted (0|1), last examined id ('' = none), group count g,
--          then g groups of 3: type, version ('' = not stored), count}
--       | {'corrupt', problem} | {'invalid', message}

if #KEYS ~= 1 or #ARGV ~= 4 then
  return { 'invalid', 'count_versions: expected 1 key and 4 arguments' }
end
local base, status, cursor = ARGV[1], ARGV[2], ARGV[3]
if string.sub(KEYS[1], 1, #base) ~= base then
  return { 'invalid', 'count_versions: the key base ' .. base .. ' is not the partition of the key' }
end
if status ~= 'running' and status ~= 'compensating' then
  return { 'invalid', 'count_versions: the status must be running or compensating, got ' .. describe(status) }
end
if not is_uint(ARGV[4]) or tonumber(ARGV[4]) < 1 then
  return { 'invalid', 'count_versions: the budget must be a positive integer' }
end
local budget = tonumber(ARGV[4])
local err = expect_type(KEYS[1], 'zset')
if err then
  return err
end

-- groups[type][version] = count; order keeps the groups in the order first seen.
local groups, order = {}, {}
local examined, last, exhausted = 0, '', 0
local min = '-'
if cursor ~= '' then
  min = '(' .. cursor
end
while examined < budget do
  local chunk = math.min(budget - examined, 200)
  local ids = redis.call('ZRANGEBYLEX', KEYS[1], min, '+', 'LIMIT', 0, chunk)
  for _, id in ipairs(ids) do
    examined = examined + 1
    last = id
    local key = base .. 'saga:' .. id
    if key_type(key) == 'hash' then
      local v = redis.call('HMGET', key, 'type', 'status', 'version')
      if v[1] and v[2] == status and (not v[3] or is_version(v[3])) then
        local version = v[3] or ''
        local by_version = groups[v[1]]
        if not by_version then
          by_version = {}
          groups[v[1]] = by_version
        end
        if not by_version[version] then
          by_version[version] = 0
          order[#order + 1] = { v[1], version }
        end
        by_version[version] = by_version[version] + 1
      end
    end
  end
  if #ids < chunk then
    exhausted = 1
    break
  end
  min = '(' .. last
end

local reply = { 'ok', exhausted, last, #order }
for _, group in ipairs(order) do
  reply[#reply + 1] = group[1]
  reply[#reply + 1] = group[2]
  reply[#reply + 1] = groups[group[1]][group[2]]
end
return reply
