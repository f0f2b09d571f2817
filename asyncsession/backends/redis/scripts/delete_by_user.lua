-- KEYS: user index, expiry set
-- ARGV: keep ('' = none), now, session key prefix, site, batch size
-- At most `batch` sessions per call, from the front of the index; every member it
-- looks at (but `keep`) leaves the index, so the next call starts at the front
-- again. Returns {more (1: call again), id of each live session deleted...}.
local ikey, xkey = KEYS[1], KEYS[2]
local keep, now, sprefix, site = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local batch = tonumber(ARGV[5])
local ids = redis.call('ZRANGE', ikey, 0, batch)  -- batch + 1: one may be `keep`
local todo = {}
for _, id in ipairs(ids) do
  if id ~= keep and #todo < batch then todo[#todo + 1] = id end
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
if #todo == batch and redis.call('ZCARD', ikey) > (redis.call('ZSCORE', ikey, keep) and 1 or 0) then
  out[1] = 1
end
return out
