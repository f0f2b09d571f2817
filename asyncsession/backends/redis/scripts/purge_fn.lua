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
-- a write's share of the cleanup: up to `count` (default 2) entries of the expiry set
-- due before `cutoff` (now minus the native-expiry grace) whose session key is gone
-- (Redis's own expiry dropped it, or a DEL) leave the set, so with background cleanup
-- off it stays within the live sessions plus a constant (inserts ask for 2 on average:
-- none on most, more on one in TRIM_EVERY). Sessions still stored are left to
-- purge_expired (they keep their id until then). Never fails the write.
local function trim(xkey, cutoff, sprefix, count)
  count = count or 2
  if count < 1 then return end
  pcall(function()
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', xkey, '-inf', cutoff, 'LIMIT', 0, count)) do
      if redis.call('EXISTS', key_of(sprefix, id)) == 0 then redis.call('ZREM', xkey, id) end
    end
  end)
end
