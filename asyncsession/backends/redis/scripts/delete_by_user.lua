-- KEYS: user index, expiry set
-- ARGV: keep ('' = none), now, session key prefix, site, batch size, only ('' = all)
-- At most `batch` sessions per call, from the front of the index; every member it
-- looks at (but `keep`) leaves the index, so the next call starts at the front
-- again. Returns {more (1: call again), id of each live session deleted...}, or
-- {-1} with nothing deleted when `keep` is not a live session in the index (a login
-- or a delete took it out: the user's newer session must stay). A member of the
-- index is one of the user's sessions, so on a cluster its key is in this slot.
local ikey, xkey = KEYS[1], KEYS[2]
local keep, now, sprefix, site = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local batch = tonumber(ARGV[5])
if keep ~= '' then
  if not redis.call('ZSCORE', ikey, keep) then return {-1} end
  local k = fields(key_of(sprefix, keep), 's', 'e', 'i')
  if not (k and k[1] == site and k[3] == ikey and k[2] and live(k[2], now)) then
    return {-1}
  end
end
local only = ARGV[6] or ''
local todo = {}
if only ~= '' then  -- that one session alone, if it is in the index: one call
  if only ~= keep and redis.call('ZSCORE', ikey, only) then todo[1] = only end
else
  local ids = redis.call('ZRANGE', ikey, 0, batch)  -- batch + 1: one may be `keep`
  for _, id in ipairs(ids) do
    if id ~= keep and #todo < batch then todo[#todo + 1] = id end
  end
end
local found = {}
for j, id in ipairs(todo) do found[j] = fields(key_of(sprefix, id), 's', 'e', 'i') or false end
local out = {0}
for j, id in ipairs(todo) do
  local f = found[j]
  if f and f[1] == site and f[3] == ikey then
    redis.call('DEL', key_of(sprefix, id))
    redis.call('ZREM', xkey, id)
    if f[2] and live(f[2], now) then out[#out + 1] = id end
  end
  redis.call('ZREM', ikey, id)
end
if only == '' and #todo == batch
    and redis.call('ZCARD', ikey) > (redis.call('ZSCORE', ikey, keep) and 1 or 0) then
  out[1] = 1
end
return out
