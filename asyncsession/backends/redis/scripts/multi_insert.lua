-- The anonymous creates of one batch on one server in one call (the transport merges
-- them: one script run instead of one per create).
-- KEYS: session key, expiry set, per create. ARGV: record, session key prefix,
-- insert.lua's list, per create. Each create trims first if its list asks (as
-- insert.lua does), then runs common_create. Returns each create's reply, as INSERT
-- would ({'ok'} or {'exists'}). One EXISTS and one expiry per set for the batch
-- (batch.lua).
local out, skeys = {}, {}
for i = 1, #KEYS / 2 do skeys[i] = KEYS[2 * i - 1] end
local batch = new_batch(skeys)
for i = 1, #KEYS / 2 do
  local skey, xkey, a = KEYS[2 * i - 1], KEYS[2 * i], 3 * i - 2
  local v = split_insert(ARGV[a + 2])
  if v[5] == '' then
    return redis.error_reply('ERR multi_insert takes creates that expire only')
  end
  trim(xkey, v[12], ARGV[a + 1], tonumber(v[13]) or 0)
  out[i] = common_create(skey, xkey, ARGV[a], v, batch)
end
extend_sets(batch)
return out
