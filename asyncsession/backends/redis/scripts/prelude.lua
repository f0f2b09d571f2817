-- Hash fields of a session key:
--   r  the record (codec.encode)          s  site id          n  version
--   c  created_at (us)                    a  last access (us) e  expires_at (us, '' = never)
--   x  absolute deadline (us, '' = never) i  user index key (absent: anonymous)
-- Numbers cross into Lua as decimal strings and are only compared there (exact in
-- a double up to 2**53 us, year 2255); values Lua writes back are the same strings.
--
-- A user index is a sorted set of session ids scored by creation order: a member's
-- score is its created_at (us), or one more than the score before it when a session
-- was created in the same microsecond as the newest one. Scores therefore sort the
-- members by (created_at, insertion), so the oldest session is the first member and
-- a create at the limit finds its victim without reading any session; which members
-- are live it learns from the expiry set (ZMSCORE) and which keys still exist from
-- one EXISTS over all of them. A session created with an older created_at than an
-- indexed one, or an update that changes created_at, rescores the index from the
-- sessions' own 'c' fields (rare; only with a per-user limit, which bounds the index).
-- Redis Cluster: while a slot migrates, a key of it that this node no longer holds
-- fails the command. A script reads every key it writes before its first write and
-- stops there with TRYAGAIN: nothing was written, and the client sends it again.
local function settle(err)
  err = tostring(err)  -- (a string in Redis; fakeredis hands its own type)
  if not string.find(err, 'WRONGTYPE', 1, true) then error({err = 'TRYAGAIN ' .. err}) end
end
local function fields(key, ...)
  local f = redis.pcall('HMGET', key, ...)
  if f.err then settle(f.err) return nil end
  return f
end
-- a key the script will write without having read it: make sure it is here; its
-- PEXPIRETIME (-2: no such key, -1: no expiry)
local function here(key)
  local t = redis.pcall('PEXPIRETIME', key)
  if type(t) == 'table' then settle(t.err) end
  return t
end
-- the key of a session id: prefix..'s:'..id, or in a cluster prefix..'s:{'..tag..'}'..rest
local function key_of(sprefix, id)
  if string.byte(sprefix, -1) == 123 then
    return sprefix .. string.sub(id, 1, 4) .. '}' .. string.sub(id, 5)
  end
  return sprefix .. id
end
local function live(e, now)
  if e == '' then return true end
  local t = tonumber(e)
  return t ~= nil and now < t  -- a damaged deadline is past, never a script error
end
local function expire(key, px)
  if px == '' then redis.call('PERSIST', key) else redis.call('PEXPIREAT', key, px) end
end
-- keep a user index alive at least as long as a session it holds; t is the index's
-- PEXPIRETIME before this write (-2: new, -1: holds a session that never expires)
local function outlive(ikey, px, t)
  if px == '' then
    if t >= 0 then redis.call('PERSIST', ikey) end
  elseif t ~= -1 and t < tonumber(px) then
    redis.call('PEXPIREAT', ikey, px)
  end
end
-- the expiry set holds every session that can expire; it outlives the last of them
local function schedule(xkey, e, id, px)
  if e == '' then redis.call('ZREM', xkey, id) return end
  local t = redis.call('PEXPIRETIME', xkey)
  redis.call('ZADD', xkey, e, id)
  if t < tonumber(px) then redis.call('PEXPIREAT', xkey, px) end
end
