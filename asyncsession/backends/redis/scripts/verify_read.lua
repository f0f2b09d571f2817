-- KEYS: a session key. ARGV: its storage id (handle).
-- A read that says which key it read: {key, {record, accessed, expires}} (a shape no
-- HMGET reply has, so it is never taken for another read's). The lone
-- HMGET's reply names no key, so one whose record is not this key's (its own id
-- differs and field 'h', the id a rotation gave it, too) is read again here: a
-- session rotated by a release before 'h' existed is this key's, and gets its 'h'
-- now (its next reads need no second look); any other reply was another request's,
-- left on the connection by a server or proxy that answered out of step.
local f = redis.pcall('HMGET', KEYS[1], 'r', 'a', 'e')
if f.err then return {KEYS[1], {'WRONGTYPE', false, false}} end
if f[1] then redis.call('HSET', KEYS[1], 'h', ARGV[1]) end
return {KEYS[1], f}
