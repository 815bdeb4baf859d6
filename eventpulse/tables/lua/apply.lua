-- Apply one slice of a batch's pre-combined feature updates, exactly once.
--
-- A batch is written as several such scripts (eventpulse/tables/batch.py, docs/design.md): one
-- per fence shard and cost-bounded slice, plus the control slice (alert states, outbox,
-- observed_since). Each is fenced by its own shard's positions, so it applies exactly once
-- whatever happens between two of them.
--
-- KEYS[1]   the shard's fence hash ("topic:partition" -> "offset:watermark")
-- KEYS[2]   the meta hash (observed_since)
-- KEYS[3..] entity feature maps (ep:{entity:id}:f) and ride-along keys, referred to by index
--
-- ARGV: n_tp, then n_tp triples (tp, expected, new), then observed_since ("" = none), then one
-- msgpack document (one argument instead of hundreds of thousands: packing and parsing them one
-- by one cost more than applying them):
--   doc.f  features: {name, size, step, slots, stride, kind, ttl}
--   doc.g  per entity: {KEYS index, op, op, ...}; op = {feature index, newest event time,
--          bucket, partial..., bucket, partial..., ...} (stride + 1 numbers per bucket;
--          sketches: bucket, list)
--   doc.w  ride-along writes: {"S", KEYS index, field, value} = HSET, {"R", KEYS index, _, value}
--   doc.l  > 0: every key written lives this long (ms), whatever its entries' TTL, fences and
--          meta hash included (a training set's replay, which models the expiry on the
--          archive's time); 0: the entries' TTL, fences and meta hash for good
-- eventpulse/tables/batch.py encodes it; eventpulse/tables/ring.py and docs/redis-layout.md
-- describe the entry layout.
--
-- The expected values are a compare-and-set fence: if another worker (or this one before a crash)
-- already moved a partition on, nothing is written and the caller reloads and re-filters. A
-- slice whose every partition already stands at its new position was applied by an earlier
-- attempt of the same call (a reply lost to a timeout): it answers 'ok' and writes nothing.

local started = redis.call('TIME')  -- the reply carries the script's run time (cost model)
local offsets = KEYS[1]
local n_tp = tonumber(ARGV[1])
local i = 2
local conflict = nil
local again = n_tp > 0
for _ = 1, n_tp do
  local tp, expected, new = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local current = redis.call('HGET', offsets, tp)
  if current ~= new then again = false end
  if not conflict and ((expected == '' and current) or (expected ~= '' and current ~= expected)) then
    conflict = {'conflict', tp, current or ''}
  end
  i = i + 3
end
if again then return {'ok', 'again'} end
if conflict then return conflict end
i = 2
for _ = 1, n_tp do
  redis.call('HSET', offsets, ARGV[i], ARGV[i + 2])
  i = i + 3
end
i = 2 + 3 * n_tp
local observed = ARGV[i]
if observed ~= '' then
  local current = tonumber(redis.call('HGET', KEYS[2], 'observed_since'))
  if not current or tonumber(observed) < current then
    redis.call('HSET', KEYS[2], 'observed_since', observed)
  end
end
i = i + 1

local doc = cmsgpack.unpack(ARGV[i])
local feats = doc.f
local lease = doc.l
if lease > 0 then  -- the fences too: a writer that dies leaves nothing for longer
  redis.call('PEXPIRE', offsets, lease)
  redis.call('PEXPIRE', KEYS[2], lease)
end

local function fmt_int(n) return string.format('%d', n) end

-- call cmd(key, args...) in slices: Lua's unpack() has a stack limit
local function call_sliced(cmd, key, args)
  for first = 1, #args, 4000 do
    redis.call(cmd, key, unpack(args, first, math.min(first + 3999, #args)))
  end
end

-- An entry is one binary string (eventpulse/tables/ring.py): a header (HEADER: step, kind,
-- newest, head, ttl), then the window ring as little-endian doubles (`last`: a msgpack array, its
-- values can be strings). HEADER, HEADER_LEN and RULE (entry kind byte -> combine rule) are
-- prepended at load time from eventpulse/tables/kinds.py, the one table of the kinds.
local ring_formats = {}
local function ring_format(n)
  local f = ring_formats[n]
  if not f then
    f = '<' .. string.rep('d', n)
    ring_formats[n] = f
  end
  return f
end

local function zeros(n)
  local values = {}
  for j = 1, n do values[j] = 0 end
  return values
end

-- an entry's ring, newest event time and head; nil when it was written for another window
-- or aggregation
local function read_entry(raw, step, kind, total, is_last)
  local old_step, old_kind, newest, head = struct.unpack(HEADER, raw)
  if old_step ~= step or old_kind ~= kind then return nil end
  local values
  if is_last then
    values = cmsgpack.unpack(string.sub(raw, HEADER_LEN + 1))
  else
    if (#raw - HEADER_LEN) ~= 8 * total then return nil end
    if total == 0 then return {}, newest, head end
    values = {struct.unpack(ring_format(total), raw, HEADER_LEN + 1)}
    values[#values] = nil  -- struct.unpack also returns the next position
  end
  if #values ~= total then return nil end
  return values, newest, head
end

local function write_entry(newest, head, step, ttl, kind, values, is_last)
  local header = struct.pack(HEADER, step, kind, newest, head, ttl)
  if is_last then return header .. cmsgpack.pack(values) end
  if #values == 0 then return header end
  return header .. struct.pack(ring_format(#values), unpack(values))
end

-- move every slot `by` places older; slots pushed past the end are dropped, new ones are empty
local function shift(values, by, stride, total)
  local n = by * stride
  if n >= total then
    for j = 1, total do values[j] = 0 end
    return
  end
  for j = total, n + 1, -1 do values[j] = values[j - n] end
  for j = 1, n do values[j] = 0 end
end

-- add one bucket's partial to the ring slots first..last (newest window first), by the kind's
-- combine rule
local function fold(rule, values, first, last, a, b)
  if rule == 'add' then
    for s = first + 1, last + 1 do values[s] = values[s] + a end
  elseif rule == 'add2' then
    for s = 2 * first + 1, 2 * last + 1, 2 do
      values[s] = values[s] + a
      values[s + 1] = values[s + 1] + b
    end
  elseif rule == 'last' then  -- a: event time, b: value; the newest wins, ties go to the later
    for s = 2 * first + 1, 2 * last + 1, 2 do
      if values[s] == 0 or a >= values[s] then
        values[s] = a
        values[s + 1] = b
      end
    end
  elseif rule == 'min' or rule == 'max' then  -- a: events, b: their min or max
    for s = 2 * first + 1, 2 * last + 1, 2 do
      local old = values[s + 1]
      if values[s] == 0 or (rule == 'min' and b < old) or (rule == 'max' and b > old) then
        values[s + 1] = b
      end
      values[s] = values[s] + a
    end
  else
    error('apply.lua: no combine rule ' .. tostring(rule))
  end
end

for _, g in ipairs(doc.g) do
  local key = KEYS[g[1]]
  local raw = redis.call('GET', key)
  local entity = {}
  if raw then entity = cmsgpack.unpack(raw) end
  local top = 0
  -- newest event time and TTL of the entries written below (the pruning needs not unpack them)
  local written_newest, written_ttl = {}, {}
  for x = 2, #g do
    local op = g[x]
    local f = feats[op[1]]
    local name, size, step, nslots, stride, kind, ttl = f[1], f[2], f[3], f[4], f[5], f[6], f[7]
    local rule = RULE[kind]
    local is_last = rule == 'last'
    local newest = op[2]
    if newest > top then top = newest end
    local total = nslots * stride
    local values, old_newest, head = nil, 0, 0
    if entity[name] then
      values, old_newest, head = read_entry(entity[name], step, kind, total, is_last)
      if not values then old_newest, head = 0, 0 end
    end
    if stride == 0 then
      values = {}
      -- sketches live per step (bucket) in their own keys and are merged when read; their
      -- prefix is the entity's, the features key less its ':f' (eventpulse/tables/keys.py)
      local hll = rule == 'hll'  -- PFADD the values seen; 'bins': HINCRBY the counts
      if not hll and rule ~= 'bins' then error('apply.lua: no sketch rule for ' .. kind) end
      local prefix = string.sub(key, 1, -3) .. (hll and ':hll:' or ':sk:') .. name .. ':'
      for p = 3, #op, 2 do
        local bkey = prefix .. fmt_int(op[p])
        local items = op[p + 1]
        if hll then
          call_sliced('PFADD', bkey, items)
        else
          for b = 1, #items, 2 do redis.call('HINCRBY', bkey, items[b], items[b + 1]) end
        end
        redis.call('PEXPIRE', bkey, lease > 0 and lease or ttl)
      end
    else
      local new_head = newest - newest % step + size
      if not values then
        values, head = zeros(total), new_head
      elseif new_head > head then
        shift(values, (new_head - head) / step, stride, total)
        head = new_head
      end
      local reach = size / step - 1
      for p = 3, #op, stride + 1 do
        local bucket = op[p]
        -- the bucket's windows end at bucket + step .. bucket + size: slots first..first + reach
        local first = (head - bucket - size) / step
        local last = first + reach
        if last >= nslots then last = nslots - 1 end
        if first <= last then fold(rule, values, first, last, op[p + 1], op[p + 2]) end
      end
    end
    if old_newest > newest then newest = old_newest end
    entity[name] = write_entry(newest, head, step, ttl, kind, values, is_last)
    written_newest[name], written_ttl[name] = newest, ttl
  end
  -- entries of features nobody updated for longer than their TTL (in event time) are dropped;
  -- the key lives as long as the longest TTL of what remains
  local px = 0
  for name, e in pairs(entity) do
    local newest, ttl = written_newest[name], written_ttl[name]
    if not newest then _, _, newest, _, ttl = struct.unpack(HEADER, e) end
    if newest + ttl < top then
      entity[name] = nil
    elseif ttl > px then
      px = ttl
    end
  end
  if px > 0 and lease > 0 then px = lease end
  if px > 0 then redis.call('SET', key, cmsgpack.pack(entity), 'PX', px) end
end

-- writes that ride along with the batch (alert states, outbox entries)
for _, w in ipairs(doc.w) do
  if w[1] == 'S' then
    redis.call('HSET', KEYS[w[2]], w[3], w[4])
  else
    redis.call('RPUSH', KEYS[w[2]], w[4])
  end
end
local now = redis.call('TIME')
return {'ok', (now[1] - started[1]) * 1000000 + (now[2] - started[2])}
