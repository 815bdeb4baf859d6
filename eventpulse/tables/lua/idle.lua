-- Would the live worker's key of this entity have expired? The training set's replay asks
-- (eventpulse/offline/expiry.py): its own keys live for the build, the live ones expire.
-- apply.lua SETs an entity's key with PX the longest TTL of the entries it keeps, each time
-- it writes it; the replay knows when the worker wrote it only within margins (the time the
-- broker had the record, up to `settle` later).
--
-- KEYS[1]  the entity's features key (of the replay's namespace)
-- ARGV[1]  idle: ms from the earliest the last write can have been to the moment asked about
-- ARGV[2]  lower margin: the key surely lives while idle < its TTL - lower
-- ARGV[3]  upper margin: the key surely expired once idle >= its TTL + upper
-- ARGV[4]  1: the entity has features the replay does not write (records of other topics),
--          whose writes it cannot see: the live key never surely expired
-- ARGV[5]  1: delete a key that surely expired (before a write: the write starts afresh, as
--          the worker's did); 0: only say so (before a read: a later read at an earlier
--          moment, of the consistency report's earlier cut-offs, must still find it)
-- Returns {answer, TTL, newest}: answer 0: the live key surely lives (or the replay's has no
-- key: nothing to expire; TTL 0, newest -1); 1: it surely expired (deleted if asked); 2:
-- either may be (kept: the caller marks what it reads). TTL: the key's, as the replay knows it
-- (the longest TTL of its entries); newest: the newest event time of its entries (an entry no
-- newer was not written since).
local raw = redis.call('GET', KEYS[1])
if not raw then return {0, 0, -1} end
local px, top = 0, -1
for _, e in pairs(cmsgpack.unpack(raw)) do
  local _, _, newest, _, ttl = struct.unpack(HEADER, e)
  if ttl > px then px = ttl end
  if newest > top then top = newest end
end
local idle, lower, upper = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[4] == '0' and idle >= px + upper then
  if ARGV[5] == '1' then redis.call('DEL', KEYS[1]) end
  return {1, px, top}
end
if idle < px - lower then return {0, px, top} end
return {2, px, top}
