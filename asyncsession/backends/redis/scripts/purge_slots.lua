-- Redis Cluster, no KEYS: the expiry sets of many slots of the node it is sent to, in
-- one call (keys of several slots, all local: allowed to scripts without flags).
-- ARGV: now, budget (entries examined), session key prefix, report ('1' or ''),
--       expiry key prefix, slot tags...
-- Each slot is purged as by PURGE; a slot the node does not hold, or holds half of (a
-- migration), fails inside pcall before any write of it and is skipped. Returns
-- {removed, resume (position of the slot tag to start again from, 0 = done),
-- skipped count, skipped positions..., then with report id, site, index key...}.
local now, budget, sprefix, xprefix = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[5]
local report = ARGV[4] == '1'
local removed, resume, skipped, rows = 0, 0, {}, {}
for i = 6, #ARGV do
  local ok, n, seen = pcall(purge, xprefix .. ARGV[i] .. '}', now, budget, sprefix, report, rows)
  if not ok then
    skipped[#skipped + 1] = i - 5
  else
    removed = removed + n
    if seen >= budget then
      resume = i - 5
      break
    end
    budget = budget - seen
  end
end
local out = {removed, resume, #skipped}
for _, position in ipairs(skipped) do out[#out + 1] = position end
for _, r in ipairs(rows) do out[#out + 1] = r end
return out
