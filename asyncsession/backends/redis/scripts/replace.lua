local skey, xkey = KEYS[1], KEYS[2]
local e, px = ARGV[8], ARGV[10]
local f = fields(skey, 's', 'i', 'n', 'e', 'c')
if not f or not f[1] or not f[3] or not f[4] then return 'missing' end
if f[1] ~= ARGV[2] then return 'other_site' end
if not live(f[4], tonumber(ARGV[11])) then return 'expired' end
if (f[2] or '') ~= ARGV[3] then return 'user_changed' end
if f[3] ~= ARGV[4] then return 'conflict' end
trim(xkey, ARGV[15], ARGV[14])
local t, zadd
if f[2] then
  t = here(f[2])
  if f[5] ~= ARGV[6] and tonumber(ARGV[13]) > 0 then
    -- created_at changed: the index order follows (the limit keeps the index small)
    local ids = redis.call('ZRANGE', f[2], 0, -1)
    zadd = rescore(ARGV[14], ids, {}, ARGV[12], tonumber(ARGV[6]) or 0)
  end
end
redis.call('HSET', skey, 'r', ARGV[1], 'n', ARGV[5], 'c', ARGV[6], 'a', ARGV[7], 'e', e,
  'x', ARGV[9])
expire(skey, px)
schedule(xkey, e, ARGV[12], px)
if f[2] then
  if zadd and #zadd > 0 then each('ZADD', f[2], zadd) end
  outlive(f[2], px, t)
end
return 'ok'
