-- Redis Cluster, old and new ids in different slots: after the new session was
-- created, retire the old one (delete, record the rotation) in its own slot, only if
-- it is still live (and at the expected version, if any): a write since the caller's
-- read is 'conflict', another login's retire 'missing', and the caller then removes
-- the new session.
-- KEYS: old session, old expiry set, rotation record
-- ARGV: site, id, record value ('' = none), record PXAT, expected version ('' = any),
--       now
local okey, oxkey, rkey = KEYS[1], KEYS[2], KEYS[3]
local f = fields(okey, 's', 'i', 'n', 'e')
if not f or not f[1] or not f[3] or not f[4] then return 'missing' end
if f[1] ~= ARGV[1] then return 'other_site' end
if not live(f[4], tonumber(ARGV[6])) then return 'expired' end
if ARGV[5] ~= '' and f[3] ~= ARGV[5] then return 'conflict' end
if ARGV[3] ~= '' then here(rkey) end
if f[2] then here(f[2]) end
redis.call('DEL', okey)
redis.call('ZREM', oxkey, ARGV[2])
if f[2] then redis.call('ZREM', f[2], ARGV[2]) end
if ARGV[3] ~= '' then redis.call('SET', rkey, ARGV[3], 'PXAT', ARGV[4]) end
return 'ok'
