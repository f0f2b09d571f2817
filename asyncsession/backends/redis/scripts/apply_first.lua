-- ARGV as sent: one list, each value followed by ',' (site, now, sliding deadline,
-- grace, id, limit, counts, base version, the new record's expiry), the whole new
-- record, then the changes.
-- Run before the list is split and the shared prelude is even defined: the common
-- write (common_apply.lua).
local done = common_apply(KEYS[1], ARGV[1], ARGV[2])
if done then return done end
-- Split here into the layout apply.lua documents.
local sent = ARGV
local ARGV = {}
for v in string.gmatch(sent[1], '([^,]*),') do ARGV[#ARGV + 1] = v end
table.insert(ARGV, 10, sent[2])
for j = 3, #sent do ARGV[#ARGV + 1] = sent[j] end
