-- KEYS: session, new session, expiry set, rotation record
-- ARGV: site, now, id, new id, record value ('' = none), record PXAT
-- The new id takes the old one's place (score) in the user index.
local skey, nkey, xkey, rkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, new = ARGV[3], ARGV[4]
local f = fields(skey, 's', 'i', 'e', 'c')
if not f or not f[1] or not f[3] then return 'missing' end
if f[1] ~= ARGV[1] then return 'other_site' end
if not live(f[3], tonumber(ARGV[2])) then return 'expired' end
if redis.call('EXISTS', nkey) == 1 then return 'conflict' end
if ARGV[5] ~= '' then here(rkey) end
local score
if f[2] then
  here(f[2])
  score = redis.call('ZSCORE', f[2], id) or tonumber(f[4]) or 0
end
redis.call('RENAME', skey, nkey)
redis.call('HSET', nkey, 'h', new)  -- the record keeps the old id: its key's is here
-- the new member first: a set whose only member this is never empties on the way
-- (Redis would delete it, and the ZADD make a new one without its expiry)
if f[3] ~= '' then redis.call('ZADD', xkey, f[3], new) end
redis.call('ZREM', xkey, id)
if f[2] then
  redis.call('ZADD', f[2], score, new)
  redis.call('ZREM', f[2], id)
end
if ARGV[5] ~= '' then redis.call('SET', rkey, ARGV[5], 'PXAT', ARGV[6]) end
return 'ok'
