-- office_apply.lua: applies one back-office effect exactly once per idempotency key, together
-- with its recorded result and its ledger entry. A key that already has a result gets that
-- result back and counts one duplicate; nothing else changes. Otherwise the change (a
-- ledger::BookChange, see examples/src/ledger.rs) is applied to the one record it names with
-- the semantics of BookChange::apply: the tests compare both offices change by change.
--
-- This script is the whole concurrency control of the Redis office: it runs atomically, so
-- the "already has a result" check and the write cannot be separated by another writer
-- (two coordinators running the same step apply it once), and effects on different records
-- touch different hash fields, so no writer ever waits for a lock.
--
-- Everything (arguments, key types, the records read, the business rules) is validated
-- BEFORE the first write: Redis does not roll back a script that fails halfway.
--
-- KEYS[1]  results hash        {<prefix>:office}:results       idempotency key -> result JSON
-- KEYS[2]  entries list        {<prefix>:office}:entries       ledger entries (JSON), oldest first
-- KEYS[3]  duplicates counter  {<prefix>:office}:duplicates    repeated keys answered
-- KEYS[4]  deal records hash   {<prefix>:office}:deal_records  record key -> [score, version]
-- KEYS[5]  CRM hash            {<prefix>:office}:crm_deals     deal id -> [company id, amount]
-- KEYS[6]  portfolio hash      {<prefix>:office}:portfolio     company id -> amount (a number)
-- KEYS[7]  committee list      {<prefix>:office}:committee     messages, oldest first
-- KEYS[8]  partners list       {<prefix>:office}:partners      messages, oldest first
-- KEYS[9]  audit hash          {<prefix>:office}:audit         audit id -> [text, voided]
-- ARGV[1]  idempotency key
-- ARGV[2]  the change: JSON of BookChange, {"op": "<variant in snake_case>", <fields>}
-- ARGV[3]  the ledger entry, with seq and summary still to fill in:
--          JSON {"seq", "saga", "position", "step", "phase", "key", "summary"}
--
-- Returns {'applied', result JSON} | {'duplicate', result JSON}
--       | {'rejected', reason}   (a business rule refused the change; nothing written)
--       | {'invalid', problem}   (bad arguments; nothing written)
--       | {'corrupt', problem}   (a key or record of the office is unreadable; nothing written)

if #KEYS ~= 9 or #ARGV ~= 3 then
  return { 'invalid', 'office_apply: expected 9 keys and 3 arguments' }
end
local RESULTS, ENTRIES, DUPLICATES = KEYS[1], KEYS[2], KEYS[3]
local DEAL_RECORDS, CRM, PORTFOLIO = KEYS[4], KEYS[5], KEYS[6]
local COMMITTEE, PARTNERS, AUDIT = KEYS[7], KEYS[8], KEYS[9]
local key = ARGV[1]

-- A position this close to zero is closed (ledger::CLOSED_POSITION_MUSD).
local CLOSED_POSITION_MUSD = 1e-9
local U32_MAX = 4294967295

-- Validation failures unwind to the top (before any write) as {kind, problem} tables.
local function fail(kind, problem)
  error({ office_failure = { kind, problem } }, 0)
end

local function describe(value)
  if type(value) == 'string' then
    if #value > 40 then
      value = string.sub(value, 1, 40) .. '...'
    end
    return string.format('%q', value)
  end
  return tostring(value)
end

local function decode(text, what, kind)
  local ok, value = pcall(cjson.decode, text)
  if not ok or type(value) ~= 'table' then
    fail(kind, what .. ' is not a JSON object or array: ' .. describe(text))
  end
  return value
end

-- Redis keeps Lua numbers as doubles; %d keeps integers out of exponent notation.
local function int(x)
  return string.format('%d', x)
end

local function is_finite(x)
  return type(x) == 'number' and x == x and x ~= math.huge and x ~= -math.huge
end

local function is_u32(x)
  return type(x) == 'number' and x >= 0 and x <= U32_MAX and x == math.floor(x)
end

-- A double as JSON that reads back as the same double, and as a float: serde_json reads `12`
-- as an integer and `12.0` as a float, and the two are unequal as JSON values, while Rust
-- writes every f64 with a fraction or an exponent.
local function float_json(x)
  local text
  for digits = 15, 17 do
    text = string.format('%.' .. digits .. 'g', x)
    if tonumber(text) == x then
      break
    end
  end
  if not string.find(text, '[%.e]') then
    text = text .. '.0'
  end
  return text
end

local function expect_type(k, want)
  local t = redis.call('TYPE', k)['ok']
  if t ~= 'none' and t ~= want then
    fail('corrupt', 'key ' .. k .. ' has type ' .. t .. ', expected ' .. want)
  end
end

local function run()
  local change = decode(ARGV[2], 'the change', 'invalid')
  local entry = decode(ARGV[3], 'the ledger entry', 'invalid')
  if entry.key ~= key or type(entry.saga) ~= 'string' or type(entry.step) ~= 'string'
    or not is_u32(entry.position)
    or (entry.phase ~= 'forward' and entry.phase ~= 'compensate') then
    fail('invalid', 'the ledger entry does not describe a call with this key')
  end

  -- The fields of the change, checked as they are read.
  local function text(field)
    local value = change[field]
    if type(value) ~= 'string' then
      fail('invalid', change.op .. ': `' .. field .. '` is not a string: ' .. describe(value))
    end
    return value
  end
  local function amount(field)
    local value = change[field]
    if not is_finite(value) then
      fail('invalid', change.op .. ': `' .. field .. '` is not a finite number: ' .. describe(value))
    end
    return value
  end
  local function u32(field)
    local value = change[field]
    if not is_u32(value) then
      fail('invalid', change.op .. ': `' .. field .. '` is not a u32: ' .. describe(value))
    end
    return value
  end
  local function flag(field)
    local value = change[field]
    if type(value) ~= 'boolean' then
      fail('invalid', change.op .. ': `' .. field .. '` is not a boolean: ' .. describe(value))
    end
    return value
  end

  -- Stored records, checked as they are read.
  local function stored_amount(raw, what)
    local value = tonumber(raw)
    if not is_finite(value) then
      fail('corrupt', what .. ' is not a finite number: ' .. describe(raw))
    end
    return value
  end
  local function stored_record(raw, what)
    local record = decode(raw, what, 'corrupt')
    -- A version of U32_MAX has no next version.
    if not is_u32(record[1]) or not is_u32(record[2]) or record[2] >= U32_MAX then
      fail('corrupt', what .. ' is not [score, version]: ' .. describe(raw))
    end
    return record
  end

  -- Each plan reads and validates, then returns the result JSON, the ledger summary and the
  -- record write (run only once everything is validated), or {rejected = reason}.
  local plans = {}

  plans.create_deal = function()
    local deal_id, company_id = text('deal_id'), text('company_id')
    local amount_musd, result, summary = amount('amount_musd'), text('result'), text('summary')
    if not pcall(cjson.decode, result) then
      fail('invalid', 'create_deal: `result` is not JSON: ' .. describe(result))
    end
    expect_type(CRM, 'hash')
    local record = '[' .. cjson.encode(company_id) .. ',' .. float_json(amount_musd) .. ']'
    return { result = result, summary = summary, write = function()
      redis.call('HSET', CRM, deal_id, record)
    end }
  end

  plans.delete_deal = function()
    local deal_id, summary = text('deal_id'), text('summary')
    expect_type(CRM, 'hash')
    return { result = 'null', summary = summary, write = function()
      redis.call('HDEL', CRM, deal_id)
    end }
  end

  local function position(company_id)
    expect_type(PORTFOLIO, 'hash')
    local raw = redis.call('HGET', PORTFOLIO, company_id)
    if not raw then
      return 0
    end
    return stored_amount(raw, 'portfolio position ' .. company_id)
  end

  plans.add_to_portfolio = function()
    local company_id, amount_musd, summary = text('company_id'), amount('amount_musd'), text('summary')
    local before = position(company_id)
    local after = before + amount_musd
    local result = '{"before_musd":' .. float_json(before) .. ',"after_musd":' .. float_json(after) .. '}'
    return { result = result, summary = summary, write = function()
      redis.call('HSET', PORTFOLIO, company_id, float_json(after))
    end }
  end

  plans.take_from_portfolio = function()
    local company_id, amount_musd, summary = text('company_id'), amount('amount_musd'), text('summary')
    local after = position(company_id) - amount_musd
    return { result = 'null', summary = summary, write = function()
      if math.abs(after) < CLOSED_POSITION_MUSD then
        redis.call('HDEL', PORTFOLIO, company_id)
      else
        redis.call('HSET', PORTFOLIO, company_id, float_json(after))
      end
    end }
  end

  plans.notify_committee = function()
    local message = text('text')
    expect_type(COMMITTEE, 'list')
    -- The notice's index is the list's length before it is appended (atomically: no other
    -- message can come in between).
    local index = redis.call('LLEN', COMMITTEE)
    return { result = int(index), summary = message, write = function()
      redis.call('RPUSH', COMMITTEE, message)
    end }
  end

  plans.retract_committee_notice = function()
    local message = text('text')
    expect_type(COMMITTEE, 'list')
    return { result = 'null', summary = message, write = function()
      redis.call('RPUSH', COMMITTEE, message)
    end }
  end

  plans.write_audit_entry = function()
    local deal_id, company_name, watchlisted = text('deal_id'), text('company_name'), flag('watchlisted')
    if watchlisted then
      return { rejected = 'compliance hold on ' .. company_name .. ': audit trail refuses the deal' }
    end
    expect_type(AUDIT, 'hash')
    -- Audit entries are voided, never deleted, so the count names the next one uniquely.
    local audit_id = 'audit-' .. int(redis.call('HLEN', AUDIT) + 1)
    local record = cjson.encode({ 'deal ' .. deal_id .. ' booked', false })
    return {
      result = cjson.encode(audit_id),
      summary = 'audit entry ' .. audit_id .. ' for deal ' .. deal_id,
      write = function()
        redis.call('HSET', AUDIT, audit_id, record)
      end,
    }
  end

  plans.void_audit_entry = function()
    local audit_id, summary = text('audit_id'), text('summary')
    expect_type(AUDIT, 'hash')
    local raw = redis.call('HGET', AUDIT, audit_id)
    if not raw then
      return { result = 'null', summary = summary, write = function() end }
    end
    local record = decode(raw, 'audit entry ' .. audit_id, 'corrupt')
    if type(record[1]) ~= 'string' or type(record[2]) ~= 'boolean' then
      fail('corrupt', 'audit entry ' .. audit_id .. ' is not [text, voided]: ' .. describe(raw))
    end
    local voided = cjson.encode({ record[1], true })
    return { result = 'null', summary = summary, write = function()
      redis.call('HSET', AUDIT, audit_id, voided)
    end }
  end

  plans.upsert_deal_record = function()
    local record_key, company_id, score = text('record_key'), text('company_id'), u32('score')
    expect_type(DEAL_RECORDS, 'hash')
    local raw = redis.call('HGET', DEAL_RECORDS, record_key)
    local previous, version = 'null', 1
    if raw then
      local record = stored_record(raw, 'deal record ' .. record_key)
      previous = '[' .. int(record[1]) .. ',' .. int(record[2]) .. ']'
      version = record[2] + 1
    end
    return {
      result = '{"record_key":' .. cjson.encode(record_key) .. ',"previous":' .. previous .. '}',
      summary = 'deal record ' .. company_id .. ' score ' .. int(score) .. ' (v' .. int(version) .. ')',
      write = function()
        redis.call('HSET', DEAL_RECORDS, record_key, '[' .. int(score) .. ',' .. int(version) .. ']')
      end,
    }
  end

  plans.restore_deal_record = function()
    local record_key, summary = text('record_key'), text('summary')
    local previous = change.previous
    expect_type(DEAL_RECORDS, 'hash')
    if previous == cjson.null then
      return { result = 'null', summary = summary, write = function()
        redis.call('HDEL', DEAL_RECORDS, record_key)
      end }
    end
    if type(previous) ~= 'table' or not is_u32(previous[1]) or not is_u32(previous[2]) then
      fail('invalid', 'restore_deal_record: `previous` is not null or [score, version]')
    end
    local record = '[' .. int(previous[1]) .. ',' .. int(previous[2]) .. ']'
    return { result = 'null', summary = summary, write = function()
      redis.call('HSET', DEAL_RECORDS, record_key, record)
    end }
  end

  plans.message_partners = function()
    local message = text('text')
    expect_type(PARTNERS, 'list')
    return { result = 'null', summary = message, write = function()
      redis.call('RPUSH', PARTNERS, message)
    end }
  end

  local plan_of = type(change.op) == 'string' and plans[change.op]
  if not plan_of then
    fail('invalid', 'unknown change ' .. describe(change.op))
  end

  expect_type(RESULTS, 'hash')
  local previous = redis.call('HGET', RESULTS, key)
  if previous then
    expect_type(DUPLICATES, 'string')
    local count = redis.call('GET', DUPLICATES)
    if count and not string.match(count, '^%d+$') then
      fail('corrupt', 'key ' .. DUPLICATES .. ' is not a counter: ' .. describe(count))
    end
    redis.call('INCR', DUPLICATES)
    return { 'duplicate', previous }
  end

  local plan = plan_of()
  if plan.rejected then
    return { 'rejected', plan.rejected }
  end
  expect_type(ENTRIES, 'list')
  entry.seq = redis.call('LLEN', ENTRIES)
  entry.summary = plan.summary
  local encoded_entry = cjson.encode(entry)

  -- Everything is validated: the writes.
  plan.write()
  redis.call('HSET', RESULTS, key, plan.result)
  redis.call('RPUSH', ENTRIES, encoded_entry)
  return { 'applied', plan.result }
end

local ok, reply = pcall(run)
if ok then
  return reply
end
if type(reply) == 'table' and reply.office_failure then
  return reply.office_failure
end
-- A Redis error (out of memory, ...) raised before any write: pass it on as it is.
error(reply, 0)
