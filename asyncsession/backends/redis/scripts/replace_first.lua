-- KEYS: session, expiry set
-- ARGV: record, site, index key ('' anonymous), expected version, new version,
--       created, accessed, expires, absolute, px, now, id, per-user limit, key prefix,
--       trim cutoff (us: now minus the grace)
--
-- The common update (same site, user and version, live, same deadline and creation
-- time: no idle timeout moved it) needs only the hash written. It runs first, before
-- the helpers below are defined, which is 2-3 us less Redis time per update (20-25%
-- of the script; measured with INFO commandstats). Anything else (a missing or
-- damaged field, a read error, another outcome) falls through to the full script,
-- which reads the fields again and decides.
local f0 = redis.pcall('HMGET', KEYS[1], 's', 'i', 'n', 'e', 'c')
if f0[1] == ARGV[2] and (f0[2] or '') == ARGV[3] and f0[3] == ARGV[4]
    and f0[4] == ARGV[8] and f0[5] == ARGV[6]
    and (f0[4] == '' or tonumber(ARGV[11]) < (tonumber(f0[4]) or 0)) then
  redis.call('HSET', KEYS[1], 'r', ARGV[1], 'n', ARGV[5], 'a', ARGV[7], 'x', ARGV[9])
  return 'ok'
end
