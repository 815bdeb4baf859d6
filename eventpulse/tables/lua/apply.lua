-- Apply one batch of pre-combined feature updates, exactly once.
--
-- KEYS[1]  the applied-offsets hash of the consumer group  (field "topic:partition" -> "offset:watermark")
-- KEYS[2]  the meta hash (observed_since)
-- KEYS[3..] entity hashes the ops refer to by index
--
-- ARGV: n_tp, then n_tp triples (tp, expected, new), then observed_since ("" = none), then ops.
-- Each op starts with a code and a KEYS index; see eventpulse/tables/store.py for the encoder.
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

local n = #ARGV
while i <= n do
  local code = ARGV[i]
  local key = KEYS[tonumber(ARGV[i + 1])]
  local f = ARGV[i + 2]
  if code == 'S' then
    redis.call('HSET', key, f, ARGV[i + 3])
    i = i + 4
  elseif code == 'R' then
    redis.call('RPUSH', key, ARGV[i + 3])
    i = i + 4
  elseif code == 'T' then
    -- newest event time, expiry and pruning of windows that can no longer be read or written
    local newest, size, step, lateness, ttl = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]),
      tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
    local suffixes = ARGV[i + 8]
    i = i + 9
    local tf = f .. '|t'
    local prev = tonumber(redis.call('HGET', key, tf))
    local cur = newest
    if prev and prev > cur then cur = prev end
    if cur ~= prev then redis.call('HSET', key, tf, cur) end
    local low = cur - size - lateness
    low = low - (low % step)
    local pf = f .. '|p'
    local pruned = tonumber(redis.call('HGET', key, pf))
    if not pruned then
      redis.call('HSET', key, pf, low)
    elseif low > pruned then
      local hi = low
      if prev then
        local cap = prev - (prev % step) + size
        if cap < hi then hi = cap end
      end
      local e = pruned + step
      while e <= hi do
        for s in string.gmatch(suffixes, '[^,]*') do
          redis.call('HDEL', key, f .. '|' .. e .. s)
        end
        e = e + step
      end
      redis.call('HSET', key, pf, low)
    end
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  else
    local bucket, step, nwin = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
    if code == 'I' or code == 'F' then
      local suffix, delta = ARGV[i + 6], ARGV[i + 7]
      i = i + 8
      local cmd = (code == 'I') and 'HINCRBY' or 'HINCRBYFLOAT'
      for j = 1, nwin do
        redis.call(cmd, key, f .. '|' .. (bucket + j * step) .. suffix, delta)
      end
    elseif code == '<' or code == '>' then
      local v = tonumber(ARGV[i + 6])
      local raw = ARGV[i + 6]
      i = i + 7
      for j = 1, nwin do
        local fld = f .. '|' .. (bucket + j * step)
        local cur = tonumber(redis.call('HGET', key, fld))
        if not cur or (code == '<' and v < cur) or (code == '>' and v > cur) then
          redis.call('HSET', key, fld, raw)
        end
      end
    elseif code == 'L' then
      local ts, value = tonumber(ARGV[i + 6]), ARGV[i + 7]
      i = i + 8
      for j = 1, nwin do
        local fld = f .. '|' .. (bucket + j * step)
        local cur = tonumber(redis.call('HGET', key, fld .. '|t'))
        if not cur or ts >= cur then
          redis.call('HSET', key, fld, value, fld .. '|t', ts)
        end
      end
    elseif code == 'H' or code == 'Q' then
      -- members of a HyperLogLog, or (bin, count) pairs of a percentile sketch, per window key
      local ttl, count = tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
      local first = i + 8
      i = first + count
      local kind = (code == 'H') and ':hll:' or ':sk:'
      for j = 1, nwin do
        local wkey = key .. kind .. f .. ':' .. (bucket + j * step)
        if code == 'H' then
          redis.call('PFADD', wkey, unpack(ARGV, first, i - 1))
        else
          for b = first, i - 1, 2 do
            redis.call('HINCRBY', wkey, ARGV[b], ARGV[b + 1])
          end
        end
        redis.call('PEXPIRE', wkey, ttl)
      end
    else
      return redis.error_reply('eventpulse apply: unknown op ' .. tostring(code))
    end
  end
end
return {'ok'}
