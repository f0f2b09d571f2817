-- The common create: an anonymous session (no user index) that expires. One
-- EXISTS, then the writes insert.lua does for such a session (the trim, when the
-- store asks for one, is the caller's: insert_first.lua leaves those creates to
-- insert.lua, multi_insert.lua trims before each). `v` is insert.lua's list as sent, split: site, version,
-- created, accessed, expires, absolute, px, now, limit, eviction, id, trim cutoff,
-- trim count. Used by insert_first.lua (one create) and multi_insert.lua (the
-- common creates of one batch in one call, `batch` theirs: see batch.lua).
local function split_insert(list)
  return {string.match(list, '^' .. string.rep('([^,]*),', 13))}
end
local function common_create(skey, xkey, record, v, batch)
  if not known_absent(batch, skey) then
    local found = redis.pcall('EXISTS', skey)
    if type(found) == 'table' then error({err = 'TRYAGAIN ' .. tostring(found.err)}) end
    if found == 1 then return {'exists'} end
  end
  redis.call('HSET', skey, 'r', record, 's', v[1], 'n', v[2], 'c', v[3], 'a', v[4],
    'e', v[5], 'x', v[6])
  wrote(batch, skey)
  redis.call('PEXPIREAT', skey, v[7])
  redis.call('ZADD', xkey, v[5], v[11])
  if batch then  -- (extend_sets, once for the batch)
    outlast(batch, xkey, v[7])
  else
    extend_set(xkey, v[7])
  end
  return {'ok'}
end
