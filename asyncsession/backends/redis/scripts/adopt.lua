-- Move a session stored under its plain id (before ids were hashed) to its handle.
-- KEYS: plain session key, handle's session key, expiry set, [user index]
-- ARGV: id, handle, SHA1 of the record the caller read, the record under the handle
--       (its own id field the handle), the index key the caller read ('' anonymous;
--       declared as KEYS[4] unless it names no index of the session's slot)
-- 'moved': this call moved it; 'found': the handle's key exists (a concurrent call
-- moved it first); 'none': nothing stored under the plain id; 'changed': the record
-- or its index changed since the caller read it (it reads again).
local okey, hkey, xkey, ikey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, handle = ARGV[1], ARGV[2]
local f = fields(okey, 'r', 'i')
here(hkey)
here(xkey)
if ikey then here(ikey) end
if not f or not f[1] then
  if redis.call('EXISTS', hkey) == 1 then return 'found' end
  return 'none'
end
if (f[2] or '') ~= ARGV[5] or redis.sha1hex(f[1]) ~= ARGV[3] then return 'changed' end
-- the member under the handle, same score (added first: a set never empties on the
-- way, which would drop its expiry)
local function move(key)
  local score = redis.pcall('ZSCORE', key, id)  -- (a damaged 'i' may name any key)
  if score and type(score) ~= 'table' then
    redis.call('ZADD', key, score, handle)
    redis.call('ZREM', key, id)
  end
end
-- a record under the handle already (written by this version while an older one
-- wrote the plain key): it is the one reads find, the plain one goes
if redis.call('EXISTS', hkey) == 1 then
  redis.call('DEL', okey)
  redis.call('ZREM', xkey, id)
  if ikey then redis.pcall('ZREM', ikey, id) end
  return 'found'
end
-- RENAME keeps every field and the native expiry (PEXPIRETIME)
redis.call('RENAME', okey, hkey)
redis.call('HSET', hkey, 'r', ARGV[4])
move(xkey)
if ikey then move(ikey) end
return 'moved'
