-- prelude.lua: helpers shared by every script. src/scripts/call.rs prepends this file to
-- each script's body before hashing and loading it, so every script is self-contained on the
-- server. It defines functions and constants only; it reads and writes no key.
--
-- Conventions of every script:
--   * "now" is always the server's clock (TIME), in milliseconds since the Unix epoch;
--   * everything is validated (argument count and format, key types with TYPE, fields,
--     fencing token, status, sizes) BEFORE the first write: Redis does not roll back a
--     script that fails halfway, so a script that writes must not fail;
--   * the reply is an array whose first element names the outcome ('ok', 'not_found',
--     'fenced', 'corrupt', 'too_large', 'invalid', ...); see each script's header.

local STATUS_NAMES = { 'running', 'compensating', 'completed', 'compensated', 'failed' }
local STATUS_INDEX = { running = 1, compensating = 2, completed = 3, compensated = 4, failed = 5 }
local TERMINAL = { completed = true, compensated = true, failed = true }
-- The hash fields every saga has, checked by read_saga.
local SAGA_FIELDS = { 'type', 'type_key', 'status', 'fingerprint', 'fence', 'owner',
  'lease_until', 'cancel', 'updated_at', 'last_commit' }

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- An integer as a decimal string (Lua's default number formatting switches to exponent
-- notation past 14 digits).
local function int(x)
  return string.format('%d', x)
end

local function key_type(key)
  return redis.call('TYPE', key)['ok']
end

-- nil when `key` is absent or of type `want`; otherwise a 'corrupt' reply naming it.
local function expect_type(key, want)
  local t = key_type(key)
  if t ~= 'none' and t ~= want then
    return { 'corrupt', 'key ' .. key .. ' has type ' .. t .. ', expected ' .. want }
  end
  return nil
end

-- A non-negative integer of at most 15 digits (exact as a Lua number).
local function is_uint(s)
  return type(s) == 'string' and string.match(s, '^%d+$') ~= nil and #s <= 15
end

-- A workflow version: an unsigned 32-bit integer.
local function is_version(s)
  return is_uint(s) and tonumber(s) <= 4294967295
end

-- A duration in milliseconds: at most 14 digits (about 3000 years), so that now + duration
-- still passes is_uint. The client clamps longer durations.
local function is_ms(s)
  return is_uint(s) and #s <= 14
end

local function describe(v)
  if v == false or v == nil then
    return 'missing'
  end
  if #v > 40 then
    v = string.sub(v, 1, 40) .. '...'
  end
  return string.format('%q', v)
end

-- A saga id: a hyphenated lowercase UUID.
local function is_saga_id(s)
  return type(s) == 'string' and #s == 36
    and string.match(s, '^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$') ~= nil
    and string.match(s, '%u') == nil
end

-- nil when `value` fits in `max` bytes; otherwise a 'too_large' reply.
local function too_large(what, value, max)
  if #value > max then
    return { 'too_large', what, #value, max }
  end
  return nil
end

-- Reads the saga hash at `key` (which must be a hash) and validates its fields.
-- Returns the fields (fence and lease_until as numbers, lease_until 0 when unleased,
-- has_state) or nil and the problem.
local function read_saga(key)
  local v = redis.call('HMGET', key, unpack(SAGA_FIELDS))
  local f = {}
  for i, name in ipairs(SAGA_FIELDS) do
    f[name] = v[i]
  end
  if not STATUS_INDEX[f.status] then
    return nil, 'field status is ' .. describe(f.status) .. ', expected one of ' .. table.concat(STATUS_NAMES, ', ')
  end
  if not is_uint(f.fence) then
    return nil, 'field fence is ' .. describe(f.fence) .. ', expected a non-negative integer'
  end
  if f.lease_until and not is_uint(f.lease_until) then
    return nil, 'field lease_until is ' .. describe(f.lease_until) .. ', expected milliseconds'
  end
  if not is_uint(f.updated_at) then
    return nil, 'field updated_at is ' .. describe(f.updated_at) .. ', expected milliseconds'
  end
  if f.cancel ~= '0' and f.cancel ~= '1' then
    return nil, 'field cancel is ' .. describe(f.cancel) .. ', expected 0 or 1'
  end
  if not f.type or not f.fingerprint or not f.last_commit then
    return nil, 'field type, fingerprint or last_commit is missing'
  end
  if not f.type_key or not is_saga_id(f.type_key) then
    return nil, 'field type_key is ' .. describe(f.type_key) .. ', expected a UUID'
  end
  if redis.call('HEXISTS', key, 'state') == 0 then
    return nil, 'field state is missing'
  end
  f.fence = tonumber(f.fence)
  f.lease_until = f.lease_until and tonumber(f.lease_until) or 0
  return f, nil
end

-- Reads the saga at `key`: its fields (as read_saga returns them) and nil, or nil and the
-- reply that refuses the operation: `earlier` when it is not nil (a refusal the script's
-- earlier checks found, so that they keep their order; the saga is not read then),
-- {'not_found'} when the key is absent, {'corrupt', problem} when it is not a hash or a
-- field is missing or malformed. Never writes.
local function load_saga_or_reply(key, earlier)
  if earlier then
    return nil, earlier
  end
  local t = key_type(key)
  if t == 'none' then
    return nil, { 'not_found' }
  end
  if t ~= 'hash' then
    return nil, { 'corrupt', 'key ' .. key .. ' has type ' .. t .. ', expected hash' }
  end
  local f, problem = read_saga(key)
  if not f then
    return nil, { 'corrupt', problem }
  end
  return f, nil
end

-- The first non-nil reply of check(first) .. check(last), or nil.
local function first_refusal(first, last, check)
  for i = first, last do
    local err = check(i)
    if err then
      return err
    end
  end
  return nil
end

-- nil when every key of keys[first .. last] is absent or of type `want`; otherwise the
-- 'corrupt' reply naming the first that is not.
local function expect_types(keys, first, last, want)
  return first_refusal(first, last, function(i) return expect_type(keys[i], want) end)
end

-- nil when every event of ARGV[first .. last] fits in `max` bytes; otherwise the
-- 'too_large' reply for the first that does not.
local function events_too_large(first, last, max)
  return first_refusal(first, last, function(i) return too_large('event', ARGV[i], max) end)
end

-- nil when the index KEYS of a saga rewrite (commit, operator_transition: KEYS[2] events
-- list, KEYS[3] due zset, KEYS[4] quarantine hash, KEYS[5] terminal zset, KEYS[6..10]
-- status zsets) are absent or of their types; otherwise the 'corrupt' reply.
local function expect_rewrite_keys()
  return expect_type(KEYS[2], 'list') or expect_type(KEYS[3], 'zset') or expect_type(KEYS[4], 'hash')
    or expect_type(KEYS[5], 'zset') or expect_types(KEYS, 6, 10, 'zset')
end

-- Reads the saga at `key` for a fenced write: nil and the fields when `fence` may write,
-- otherwise the reply that refuses it. Never writes.
local function writable_saga(key, quarantine, id, fence)
  local f, refused = load_saga_or_reply(key)
  if refused then
    return refused, nil
  end
  if f.fence ~= fence then
    return { 'fenced', f.fence, f.owner or '' }, f
  end
  if TERMINAL[f.status] or redis.call('HEXISTS', quarantine, id) == 1 then
    return { 'not_writable', f.status }, f
  end
  return nil, f
end

-- The status index key among `keys` (five keys in STATUS_NAMES order starting at `first`).
local function status_key(keys, first, status)
  return keys[first + STATUS_INDEX[status] - 1]
end

-- Tells the prefix's subscribers that work may be waiting: PUBLISHes '<what> <id>' on
-- '<prefix>:wake', the prefix being what precedes the partition tag in `saga_key`
-- ('<prefix>:{pNN}:saga:<id>'; a prefix never contains braces). PUBLISH takes no key, so it
-- is cluster-safe, and a cluster delivers it to subscribers on every node. Call it after
-- the checks and BEFORE the first write: PUBLISH is the one command of a write half the
-- server may still refuse (an ACL user without permission on the channel; Redis 7 gives new
-- users `resetchannels`), and a refusal after a write would leave the writes applied with
-- the caller told the call failed. Publishing first is safe: a subscriber acts on the
-- message with commands of its own, which run after this script; and a message whose
-- writes are then refused (OOM at the first write) is a spurious wake-up, which callers
-- allow.
local function publish_wake(saga_key, what, id)
  local cut = string.find(saga_key, ':{p', 1, true)
  if cut then
    redis.call('PUBLISH', string.sub(saga_key, 1, cut - 1) .. ':wake', what .. ' ' .. id)
  end
end
