-- KEYS: session
-- ARGV: record, site, expected version, new version, now
-- reencrypt: the same data sealed under another key. Only the record and the version
-- change; times, index and expiry stay as stored, so a touch since the caller read
-- the record (it moves 'a' and 'e', not the version) keeps its slide.
local f = fields(KEYS[1], 's', 'n', 'e')
if not f or not f[1] or not f[2] or not f[3] then return 'missing' end
if f[1] ~= ARGV[2] then return 'other_site' end
if not live(f[3], tonumber(ARGV[5])) then return 'expired' end
if f[2] ~= ARGV[3] then return 'conflict' end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 'n', ARGV[4])
return 'ok'
