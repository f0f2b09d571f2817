-- Purge one expiry set: up to `limit` due entries (reads first, then writes). Returns
-- sessions removed and entries examined; with `report`, appends the id, site and index
-- key ('' anonymous) of each removed session to `rows`.
local function purge(xkey, now, limit, sprefix, report, rows)
  local ids = redis.call('ZRANGEBYSCORE', xkey, '-inf', now, 'LIMIT', 0, limit)
  local found = {}
  for j, id in ipairs(ids) do
    local f = fields(key_of(sprefix, id), 'e', 'i', 's')
    if f and f[2] then here(f[2]) end
    found[j] = f or false
  end
  local removed = 0
  for j, id in ipairs(ids) do
    local f = found[j]
    if f and f[1] and f[1] ~= '' and not live(f[1], tonumber(now)) then
      redis.call('DEL', key_of(sprefix, id))
      if f[2] then redis.call('ZREM', f[2], id) end
      redis.call('ZREM', xkey, id)
      removed = removed + 1
      if report then
        rows[#rows + 1] = id
        rows[#rows + 1] = f[3] or ''
        rows[#rows + 1] = f[2] or ''
      end
    elseif f and f[1] and f[1] ~= '' then
      redis.call('ZADD', xkey, f[1], id)
    else
      redis.call('ZREM', xkey, id)
    end
  end
  return removed, #ids
end
-- a write's share of the cleanup: purge up to 2 entries of the expiry set due before
-- `cutoff` (now minus the native-expiry grace: sessions Redis itself would have
-- dropped by now), so with background cleanup off the set and the user indexes stay
-- within the live sessions plus a constant. Never fails the write (a slot
-- half-migrated on a cluster: skipped this time).
local function trim(xkey, cutoff, sprefix)
  pcall(purge, xkey, cutoff, 2, sprefix, false, {})
end
