-- KEYS: session, expiry set, [the id's record key: a logout leaves its record]
-- ARGV: site, id, [record value, its expiry (unix ms)]
local skey, xkey = KEYS[1], KEYS[2]
local f = fields(skey, 's', 'i')
if not f or not f[1] then
  -- nothing, or something that is not a session of this library: remove it
  if redis.call('DEL', skey) == 1 then redis.call('ZREM', xkey, ARGV[2]) end
  return 'missing'
end
if f[1] ~= ARGV[1] then return 'other_site' end
if f[2] then here(f[2]) end
redis.call('DEL', skey)
redis.call('ZREM', xkey, ARGV[2])
if f[2] then redis.call('ZREM', f[2], ARGV[2]) end
if KEYS[3] and ARGV[3] ~= '' then redis.call('SET', KEYS[3], ARGV[3], 'PXAT', ARGV[4]) end
return 'ok'
