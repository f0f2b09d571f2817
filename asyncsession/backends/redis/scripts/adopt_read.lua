-- KEYS: the session key of a plain id (the layout before ids were hashed), the key
--       of its handle
-- Reads only: {1, record, index key ('' anonymous)} when a session hash is stored
-- under the plain id, else {0, whether the handle's key exists} (a concurrent adopt
-- may have moved it since the caller looked).
local f = redis.pcall('HMGET', KEYS[1], 'r', 'i')
if f.err or not f[1] then return {0, redis.call('EXISTS', KEYS[2])} end
return {1, f[1], f[2] or ''}
