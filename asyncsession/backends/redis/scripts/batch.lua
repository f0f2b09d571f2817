-- The creates a merged script (multi_insert, multi_insert_user) runs share a batch:
-- `fresh` when one EXISTS over all their session keys found none (the usual case:
-- ids are random), so each create skips its own EXISTS and only a key an earlier
-- create of the batch wrote (`made`) exists; `px`, per expiry set, the latest PX
-- deadline its creates need it to outlive, applied once at the end (extend_sets)
-- instead of once per create. Saves two or three calls per create.
local function new_batch(skeys)
  local found = 0
  for j = 1, #skeys, 1000 do
    found = found + redis.call('EXISTS', unpack(skeys, j, math.min(j + 999, #skeys)))
  end
  return {fresh = found == 0, made = {}, px = {}}
end
-- In a fresh batch, whether an earlier create of it wrote `skey` (which the create
-- about to write it then records); nil outside one: the create asks EXISTS itself.
local function made_before(batch, skey)
  if not (batch and batch.fresh) then return nil end
  if batch.made[skey] then return true end
  batch.made[skey] = true
  return false
end
local function outlast(batch, xkey, px)
  local was = batch.px[xkey]
  if not was or tonumber(px) > tonumber(was) then batch.px[xkey] = px end
end
-- each expiry set outlives its sessions (GT leaves a new, persistent set alone)
local function extend_sets(batch)
  for xkey, px in pairs(batch.px) do
    if redis.call('PEXPIREAT', xkey, px, 'GT') == 0 then
      redis.call('PEXPIREAT', xkey, px, 'NX')
    end
  end
end
