-- KEYS: session, expiry set
-- ARGV: site, now, sliding deadline ('' = no idle timeout), grace ms, id, session key prefix
local skey, xkey = KEYS[1], KEYS[2]
local now, sliding = ARGV[2], ARGV[3]
local f = fields(skey, 's', 'i', 'e', 'x')
if not f or not f[1] or not f[3] then return 'missing' end
if f[1] ~= ARGV[1] then return 'other_site' end
if not live(f[3], tonumber(now)) then return 'expired' end
if sliding == '' then
  redis.call('HSET', skey, 'a', now)
  return 'ok'
end
local e = sliding
if f[4] and f[4] ~= '' then
  local x = tonumber(f[4])
  if not x then return 'missing' end  -- a damaged absolute deadline is never extended
  if x < tonumber(sliding) then e = f[4] end
end
trim(xkey, string.format('%d', tonumber(now) - 1000 * tonumber(ARGV[4])), ARGV[6])
local t
if f[2] then t = here(f[2]) end
redis.call('HSET', skey, 'a', now, 'e', e)
local px = string.format('%d', math.floor((tonumber(e) + 999) / 1000) + tonumber(ARGV[4]))
redis.call('PEXPIREAT', skey, px)
schedule(xkey, e, ARGV[5], px)
if f[2] then outlive(f[2], px, t) end
return 'ok'
