-- Apply one batch of pre-combined feature updates, exactly once.
--
-- KEYS[1]  the applied-offsets hash of the consumer group  (field "topic:partition" -> "offset:watermark")
-- KEYS[2]  the meta hash (observed_since)
-- KEYS[3..] entity hashes the ops refer to by index
--
-- ARGV: n_tp, then n_tp triples (tp, expected, new), then observed_since ("" = none), then the
-- ops as one JSON array of arrays (one argument instead of hundreds of thousands: packing and
-- parsing them one by one cost more than applying them). Each op is {code, KEYS index, field...};
-- see eventpulse/tables/batch.py for the encoder.
--
-- The expected values are a compare-and-set fence: if another worker (or this one before a crash)
-- already moved a partition on, nothing is written and the caller reloads and re-filters. Window
-- fields are "feature|window_end"; an event adds its contribution to every window it belongs to.

local offsets = KEYS[1]
local n_tp = tonumber(ARGV[1])
local i = 2
for _ = 1, n_tp do
  local tp, expected = ARGV[i], ARGV[i + 1]
  local current = redis.call('HGET', offsets, tp)
  if (expected == '' and current) or (expected ~= '' and current ~= expected) then
    return {'conflict', tp, current or ''}
  end
  i = i + 3
end
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
-- doc.n: window-name lists, shared by every entity of the batch: {feature, first_end, step,
-- field, field, ...}. Building field names in Lua costs ~1us each; these are built once in
-- Python and only looked up here.
local names = doc.n

local function fmt_int(n) return string.format('%d', n) end

-- call cmd(key, args...) in slices: Lua's unpack() has a stack limit
local function call_sliced(cmd, key, args)
  if #args <= 4000 then return redis.call(cmd, key, unpack(args)) end
  local out = {}
  for first = 1, #args, 4000 do
    local reply = redis.call(cmd, key, unpack(args, first, math.min(first + 3999, #args)))
    if type(reply) == 'table' then
      for _, v in ipairs(reply) do out[#out + 1] = v end
    end
  end
  return out
end

-- Each group is one entity hash: read every field its ops touch with one HMGET, compute, and
-- write them back with one HSET; two calls per key instead of one per window field. Values are
-- kept by position in the HMGET reply; `kind` says how to format a changed one.
for _, g in ipairs(doc.g) do
  local key, ttl, gops = KEYS[g[1]], g[2], g[3]
  local need, index = {}, {}
  for _, op in ipairs(gops) do
    local c = op[1]
    if c == 'T' then
      local fld = names[op[2]][4]
      if not index[fld] then need[#need + 1] = fld; index[fld] = #need end
    elseif c ~= 'H' and c ~= 'Q' then
      local list = names[op[2]]
      for j = 4, #list do
        local fld = list[j]
        if not index[fld] then need[#need + 1] = fld; index[fld] = #need end
      end
      if c == 'L' then
        list = names[op[3]]
        for j = 4, #list do
          local fld = list[j]
          if not index[fld] then need[#need + 1] = fld; index[fld] = #need end
        end
      end
    end
  end
  local vals = {}
  if #need > 0 then vals = call_sliced('HMGET', key, need) end
  -- changed values stay Lua numbers: redis.call turns them into exact shortest decimal strings
  -- in C, much faster than string.format here
  local touched, changed, nchanged, dels, low = {}, {}, 0, {}, {}
  for _, op in ipairs(gops) do
    local c = op[1]
    if c == 'T' then
      -- newest event time; windows that fell out of reach (end <= low) are deleted. Invariant:
      -- every end <= low(previous newest) is already gone, so only the ends between the two
      -- lows need deleting.
      local list = names[op[2]]
      local f, k = list[1], index[list[4]]
      local newest, size, step, lateness, suffixes = op[3], op[4], op[5], op[6], op[7]
      local prev = tonumber(vals[k])
      local top = newest
      if prev and prev > top then top = prev end
      local l = top - size - lateness
      l = l - (l % step)
      low[f] = l
      if not prev or newest > prev then
        vals[k] = newest
        if not touched[k] then touched[k] = true; nchanged = nchanged + 1; changed[nchanged] = k end
        if prev and suffixes ~= '-' then
          local lp = prev - size - lateness
          lp = lp - (lp % step)
          local hi = prev - (prev % step) + size
          if l < hi then hi = l end
          local e = lp + step
          while e <= hi do
            for sfx in string.gmatch(suffixes, '[^,]+') do
              if sfx == '.' then sfx = '' end
              dels[#dels + 1] = f .. '|' .. fmt_int(e) .. sfx
            end
            e = e + step
          end
        end
      end
    elseif c == 'H' or c == 'Q' then
      -- sketches live per step (bucket) in their own key and are merged when read
      local f, bucket, bttl, items = op[2], op[3], op[4], op[5]
      local bkey = key .. ((c == 'H') and ':hll:' or ':sk:') .. f .. ':' .. fmt_int(bucket)
      if c == 'H' then
        call_sliced('PFADD', bkey, items)
      else
        for b = 1, #items, 2 do redis.call('HINCRBY', bkey, items[b], items[b + 1]) end
      end
      redis.call('PEXPIRE', bkey, bttl)
    else
      local list = names[op[2]]
      local floor, e, step = low[list[1]], list[2], list[3]
      local stamps, arg, value = nil, op[3], nil
      if c == 'L' then stamps, arg, value = names[op[3]], op[4], op[5] end
      for j = 4, #list do
        if not floor or e > floor then
          local k = index[list[j]]
          local new = nil
          if c == 'I' or c == 'F' then
            new = (tonumber(vals[k]) or 0) + arg
          elseif c == 'L' then
            local kt = index[stamps[j]]
            local old = tonumber(vals[kt])
            if not old or arg >= old then
              vals[kt] = arg
              if not touched[kt] then touched[kt] = true; nchanged = nchanged + 1; changed[nchanged] = kt end
              new = value
            end
          else
            local old = tonumber(vals[k])
            if not old or (c == '<' and arg < old) or (c == '>' and arg > old) then new = arg end
          end
          if new ~= nil then
            vals[k] = new
            if not touched[k] then touched[k] = true; nchanged = nchanged + 1; changed[nchanged] = k end
          end
        end
        e = e + step
      end
    end
  end
  if nchanged > 0 then
    local flat, n = {}, 0
    for x = 1, nchanged do
      local k = changed[x]
      flat[n + 1] = need[k]
      flat[n + 2] = vals[k]
      n = n + 2
    end
    call_sliced('HSET', key, flat)
  end
  if #dels > 0 then call_sliced('HDEL', key, dels) end
  redis.call('PEXPIRE', key, ttl)
end

-- writes that ride along with the batch (alert states, outbox entries)
for _, w in ipairs(doc.w) do
  if w[1] == 'S' then
    redis.call('HSET', KEYS[w[2]], w[3], w[4])
  else
    redis.call('RPUSH', KEYS[w[2]], w[4])
  end
end
return {'ok'}
