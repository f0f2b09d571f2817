-- The creates a merged script (multi_insert, multi_insert_user) runs share a batch:
-- `fresh` when one EXISTS over all their session keys found none (the usual case:
-- ids are random), so a create skips its own EXISTS unless a create of the batch
-- wrote its key (`made`); `px`, per expiry set, the latest PX deadline its creates
-- need it to outlive, applied once at the end (extend_sets) instead of once per
-- create. Saves two or three calls per create.
local function new_batch(skeys)
  local found = 0
  for j = 1, #skeys, 1000 do
    found = found + redis.call('EXISTS', unpack(skeys, j, math.min(j + 999, #skeys)))
  end
  return {fresh = found == 0, made = {}, px = {}}
end
-- Whether `skey` is known not to exist, so its create needs no EXISTS: the batch is
-- fresh and no create of it wrote the key. One that did asks EXISTS as a create of its
-- own would: the key may have been evicted since (outside review: a create refused by
-- a limit or an error, or evicted by a later one, made the next create of the same id
-- "exists" while no key did).
local function known_absent(batch, skey)
  return batch ~= nil and batch.fresh and not batch.made[skey]
end
-- a create of the batch wrote `skey` (right after its HSET)
local function wrote(batch, skey)
  if batch then batch.made[skey] = true end
end
local function outlast(batch, xkey, px)
  local was = batch.px[xkey]
  if not was or tonumber(px) > tonumber(was) then batch.px[xkey] = px end
end
-- the expiry set outlives a session due at PX `px` (GT leaves a new, persistent set
-- alone: NX gives it one)
local function extend_set(xkey, px)
  if redis.call('PEXPIREAT', xkey, px, 'GT') == 0 then
    redis.call('PEXPIREAT', xkey, px, 'NX')
  end
end
-- each expiry set of the batch outlives its sessions
local function extend_sets(batch)
  for xkey, px in pairs(batch.px) do extend_set(xkey, px) end
end
