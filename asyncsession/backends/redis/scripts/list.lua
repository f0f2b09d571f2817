-- KEYS: user index
-- ARGV: session key prefix, start (rank in the index), batch size
-- At most `batch` members from rank `start`; members whose session is gone or no
-- longer this user's leave the index. Returns {next start (-1: done), the index key
-- (so a reply says which listing it is), then id, record, accessed, expires for each
-- session, in index order}.
local ikey, sprefix = KEYS[1], ARGV[1]
local start, batch = tonumber(ARGV[2]), tonumber(ARGV[3])
local ids = redis.call('ZRANGE', ikey, start, start + batch - 1)
local out, stale = {-1, ikey}, {}
for _, id in ipairs(ids) do
  local f = fields(key_of(sprefix, id), 'r', 'a', 'e', 'i')
  if not f or not f[1] or f[4] ~= ikey then
    stale[#stale + 1] = id
  else
    out[#out + 1] = id
    out[#out + 1] = f[1]
    out[#out + 1] = f[2] or ''
    out[#out + 1] = f[3] or ''
  end
end
for _, id in ipairs(stale) do redis.call('ZREM', ikey, id) end
if #ids == batch then out[1] = start + batch - #stale end
return out
