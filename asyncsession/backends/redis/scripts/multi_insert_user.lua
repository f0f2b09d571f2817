-- The creates of user sessions of one batch on one server in one call (the
-- transport merges them: one script run, whose helpers are defined once, instead of
-- one per create). KEYS: session key, expiry set, user index, per create. ARGV:
-- INSERT's ARGV as sent (record, session key prefix, the list), per create. Each
-- runs insert.lua in turn, as its own call would; one that fails (a key of the
-- wrong type) gets its own error and the others go on. Returns each create's reply,
-- as INSERT would. One EXISTS and one expiry per set for the batch (batch.lua).
local out, skeys = {}, {}
for i = 1, #KEYS / 3 do skeys[i] = KEYS[3 * i - 2] end
local batch = new_batch(skeys)
for i = 1, #KEYS / 3 do
  local j = 3 * i - 2  -- (three keys and three arguments per create)
  local ok, reply = pcall(insert, {KEYS[j], KEYS[j + 1], KEYS[j + 2]},
    {ARGV[j], ARGV[j + 1], ARGV[j + 2]}, batch)
  if ok or (type(reply) == 'table' and reply.err) then
    out[i] = reply  -- its reply, or the error Redis raised (a table in Redis 7)
  else
    out[i] = {err = 'ERR ' .. tostring(reply)}  -- (fakeredis raises other types)
  end
end
extend_sets(batch)
return out
