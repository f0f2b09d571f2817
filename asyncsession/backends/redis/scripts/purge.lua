-- KEYS: expiry set
-- ARGV: now, batch size, session key prefix, [report: '1']
-- Returns {sessions removed, expiry entries examined}, then with report the id,
-- site and index key ('' anonymous) of each removed session.
local rows = {}
local removed, seen = purge(KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1', rows)
local out = {removed, seen}
for _, r in ipairs(rows) do out[#out + 1] = r end
return out
