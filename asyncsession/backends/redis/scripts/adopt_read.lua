-- KEYS: the session key of a plain id (the layout before ids were hashed), the key
--       of its handle, [the handle's rotation record]
-- Reads only: {1, record, index key ('' anonymous)} when a session hash is stored
-- under the plain id, else {0, whether the handle's key exists (a concurrent adopt
-- may have moved it since the caller looked), the rotation record or nil}: a lookup
-- that found nothing learns both in this one round trip.
local f = redis.pcall('HMGET', KEYS[1], 'r', 'i')
if f.err or not f[1] then
  local found = redis.call('EXISTS', KEYS[2])
  if KEYS[3] and found == 0 then
    local record = redis.pcall('GET', KEYS[3])
    if type(record) == 'table' then record = false end  -- another type there: damaged
    return {0, 0, record}
  end
  return {0, found}
end
return {1, f[1], f[2] or ''}
