-- KEYS: old session, old expiry set, rotation record, new session, new expiry set,
--       [new user index]
-- ARGV: site, now, old id, expected version ('' = any), record value ('' = none),
--       record PXAT, then INSERT's ARGV (as sent: record, prefix, the list)
-- The old session leaves the new user's index before the insert (so it is not
-- counted for the limit) and comes back if the insert refuses; then it is deleted.
local okey, oxkey, rkey = KEYS[1], KEYS[2], KEYS[3]
local site, oid = ARGV[1], ARGV[3]
local f = fields(okey, 's', 'i', 'e', 'n')
if not f or not f[1] or not f[3] then return {'missing'} end
if f[1] ~= site then return {'other_site'} end
if not live(f[3], tonumber(ARGV[2])) then return {'expired'} end
if ARGV[4] ~= '' and f[4] ~= ARGV[4] then return {'conflict'} end
if redis.call('EXISTS', KEYS[4]) == 1 then return {'exists'} end
if ARGV[5] ~= '' then here(rkey) end
if f[2] then here(f[2]) end
local ikey = KEYS[6]
local score
if f[2] and f[2] == ikey then
  score = redis.call('ZSCORE', ikey, oid)
  if score then redis.call('ZREM', ikey, oid) end
end
local iargv = {}
for j = 7, #ARGV do iargv[#iargv + 1] = ARGV[j] end
local reply = insert({KEYS[4], KEYS[5], KEYS[6]}, iargv)
if reply[1] ~= 'ok' then
  if score then redis.call('ZADD', ikey, score, oid) end
  return reply
end
redis.call('DEL', okey)
redis.call('ZREM', oxkey, oid)
if f[2] then redis.call('ZREM', f[2], oid) end
if ARGV[5] ~= '' then redis.call('SET', rkey, ARGV[5], 'PXAT', ARGV[6]) end
return reply
