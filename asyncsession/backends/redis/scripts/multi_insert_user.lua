-- The creates of user sessions of one batch on one server in one call (the
-- transport merges them: one script run, whose helpers are defined once, instead of
-- one per create). KEYS: session key, expiry set, user index, per create. ARGV:
-- INSERT's ARGV as sent (record, session key prefix, the list), per create. Each
-- runs insert.lua in turn, as its own call would; one that fails (a key of the
-- wrong type) gets its own error and the others go on. Returns each create's reply,
-- as INSERT would.
local out = {}
for i = 1, #KEYS / 3 do
  local k, a = 3 * i - 2, 3 * i - 2
  local ok, reply = pcall(insert, {KEYS[k], KEYS[k + 1], KEYS[k + 2]},
    {ARGV[a], ARGV[a + 1], ARGV[a + 2]})
  if ok then
    out[i] = reply
  elseif type(reply) == 'table' and reply.err then
    out[i] = reply
  else
    out[i] = {err = 'ERR ' .. tostring(reply)}
  end
end
return out
