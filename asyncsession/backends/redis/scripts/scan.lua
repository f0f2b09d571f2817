-- KEYS: session keys (one SCAN batch)
-- Returns site, index key, expires, record length per key (false for a key that is
-- gone or not a session hash).
local out = {}
for i, key in ipairs(KEYS) do
  local f = redis.pcall('HMGET', key, 's', 'i', 'e')
  if f.err or not f[1] then
    out[i] = false
  else
    out[i] = {f[1], f[2] or '', f[3] or '', redis.call('HSTRLEN', key, 'r')}
  end
end
return out
