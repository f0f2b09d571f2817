-- ARGV as sent: one list, each value followed by ',' (site, now, sliding deadline,
-- grace, id, limit, counts, base version, the new record's expiry), the whole new
-- record, then the changes; split here into the layout apply.lua documents.
local sent = ARGV
local ARGV = {}
for v in string.gmatch(sent[1], '([^,]*),') do ARGV[#ARGV + 1] = v end
table.insert(ARGV, 10, sent[2])
for j = 3, #sent do ARGV[#ARGV + 1] = sent[j] end
-- Run before the shared prelude is even defined: the common write (no idle timeout,
-- nothing written since the caller loaded the session) is one HMGET and one HSET.
if ARGV[3] == '' and ARGV[9] ~= '' then
  local f0 = redis.pcall('HMGET', KEYS[1], 's', 'e', 'n')
  if f0[1] == ARGV[1] and f0[3] == ARGV[9] and f0[2]
      and (f0[2] == '' or tonumber(ARGV[2]) < (tonumber(f0[2]) or 0))
      and (ARGV[6] == '0' or #ARGV[10] <= tonumber(ARGV[6])) then
    local n0 = string.format('%d', tonumber(f0[3]) + 1)
    redis.call('HSET', KEYS[1], 'r', ARGV[10], 'n', n0, 'a', ARGV[2])
    return {'ok', n0, f0[2]}
  end
end
