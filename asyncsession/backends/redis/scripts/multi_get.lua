-- KEYS: session keys. Returns record, accessed, expires, id given by a rotation per
-- key ('WRONGTYPE' as the record for a key that is not a hash).
local out = {}
for i, key in ipairs(KEYS) do
  local f = redis.pcall('HMGET', key, 'r', 'a', 'e', 'h')
  if f.err then f = {'WRONGTYPE', false, false, false} end
  out[i] = f
end
return out
