-- ARGV as sent: one list, each value followed by ',' (site, now, sliding deadline,
-- grace, id, limit, counts, base version, the new record's expiry), the whole new
-- record, then the changes.
-- Run before the list is split and the shared prelude is even defined: the common
-- write (no idle timeout, nothing written since the caller loaded the session) is
-- one pattern match, one HMGET and one HSET.
local site0, now0, sliding0, limit0, base0 = string.match(ARGV[1],
  '^([^,]*),([^,]*),([^,]*),[^,]*,[^,]*,([^,]*),[^,]*,[^,]*,([^,]*),')
if sliding0 == '' and base0 ~= '' and base0 then
  local f0 = redis.pcall('HMGET', KEYS[1], 's', 'e', 'n')
  if f0[1] == site0 and f0[3] == base0 and f0[2]
      and (f0[2] == '' or tonumber(now0) < (tonumber(f0[2]) or 0))
      and (limit0 == '0' or #ARGV[2] <= tonumber(limit0)) then
    local n0 = string.format('%d', tonumber(f0[3]) + 1)
    redis.call('HSET', KEYS[1], 'r', ARGV[2], 'n', n0, 'a', now0)
    return {'ok', n0, f0[2]}
  end
end
-- Split here into the layout apply.lua documents.
local sent = ARGV
local ARGV = {}
for v in string.gmatch(sent[1], '([^,]*),') do ARGV[#ARGV + 1] = v end
table.insert(ARGV, 10, sent[2])
for j = 3, #sent do ARGV[#ARGV + 1] = sent[j] end
