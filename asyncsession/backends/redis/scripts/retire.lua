-- Redis Cluster, old and new ids in different slots: after the new session was
-- created, retire the old one (delete, record the rotation) in its own slot.
-- KEYS: old session, old expiry set, rotation record
-- ARGV: site, id, record value ('' = none), record PXAT
local okey, oxkey, rkey = KEYS[1], KEYS[2], KEYS[3]
local f = fields(okey, 's', 'i')
if not f or not f[1] then return 'missing' end
if f[1] ~= ARGV[1] then return 'other_site' end
if ARGV[3] ~= '' then here(rkey) end
if f[2] then here(f[2]) end
redis.call('DEL', okey)
redis.call('ZREM', oxkey, ARGV[2])
if f[2] then redis.call('ZREM', f[2], ARGV[2]) end
if ARGV[3] ~= '' then redis.call('SET', rkey, ARGV[3], 'PXAT', ARGV[4]) end
return 'ok'
