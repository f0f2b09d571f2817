-- KEYS: session, expiry set, [user index]
-- ARGV: record, session key prefix, then one list of the other values, each followed
--       by ',': site, version, created, accessed, expires, absolute, px, now, limit,
--       eviction, id, trim cutoff (us: now minus the grace), trim count (expiry
--       entries to drop at most; 0 on most inserts). Split here into record, site,
--       version, created, accessed, expires, absolute, px, now, limit, eviction,
--       session key prefix, id, trim cutoff, trim count.
local sent = ARGV
local ARGV = {sent[1]}
for v in string.gmatch(sent[3], '([^,]*),') do ARGV[#ARGV + 1] = v end
table.insert(ARGV, 12, sent[2])
-- At the limit: the index (ZRANGE), the members' deadlines (ZMSCORE on the expiry
-- set), whether their keys exist (one EXISTS), then each victim's 'i' (is it still
-- this user's session?) before it is deleted; no other session is read ('lru' and
-- 'reject' read each live member's 'a' and 'i': last access, exact count).
local skey, xkey, ikey = KEYS[1], KEYS[2], KEYS[3]
local site, e, px, now = ARGV[2], ARGV[6], ARGV[8], tonumber(ARGV[9])
local limit, eviction, sprefix, id = tonumber(ARGV[10]), ARGV[11], ARGV[12], ARGV[13]
trim(xkey, ARGV[14], sprefix, tonumber(ARGV[15]) or 0)
-- (batch: the merged creates' state, batch.lua; nil in a create of its own)
if not known_absent(batch, skey) and redis.call('EXISTS', skey) == 1 then
  return {'exists'}
end
local evicted = {'ok'}
local drop, victims, skip = {}, {}, {}  -- index members to remove; sessions to delete
local zadd, kept, t  -- the new member's ZADD arguments; members the index keeps
if ikey and limit > 0 then
  -- with a limit the index stays small: read it whole, in eviction order
  local m = redis.call('ZRANGE', ikey, 0, -1, 'WITHSCORES')
  local ids = {}
  for j = 1, #m, 2 do ids[#ids + 1] = m[j] end
  if #ids >= limit then
    local keys = {}
    for j, mid in ipairs(ids) do keys[j] = key_of(sprefix, mid) end
    if eviction == 'lru' or eviction == 'reject' then
      -- each session read: live, still this user's, last access (lru), exact count
      local alive = {}
      for j, mid in ipairs(ids) do
        local f = fields(keys[j], 'e', 'a', 'i')
        if not f or not f[1] or f[3] ~= ikey then
          drop[#drop + 1] = mid  -- gone (native expiry, DEL, maxmemory) or not ours
        elseif live(f[1], now) then
          alive[#alive + 1] = {mid, tonumber(f[2]) or 0, j}  -- damaged access: least recent
        end
      end
      local excess = #alive - limit + 1
      if excess > 0 and eviction == 'reject' then
        if #drop > 0 then each('ZREM', ikey, drop) end
        return {'limit', #alive}
      end
      -- least recently used first (one sort); among equals the first in index order
      table.sort(alive, function(p, q)
        if p[2] ~= q[2] then return p[2] < q[2] end
        return p[3] < q[3]
      end)
      for q = 1, excess do victims[#victims + 1] = alive[q][1] end
    else
      -- oldest first: no session is read but the victims. Live: by the deadline in
      -- the expiry set (expired ones stay indexed until purged, uncounted); gone
      -- (native expiry, DEL, maxmemory): one EXISTS over all of them, then per key
      -- only when one is missing
      local due = {}
      for j = 1, #ids, 1000 do
        local part = redis.call('ZMSCORE', xkey, unpack(ids, j, math.min(j + 999, #ids)))
        for q = 1, #part do due[j + q - 1] = part[q] end
      end
      local gone = count(keys) < #ids
      local live_at = {}
      for j, mid in ipairs(ids) do
        if gone and exists(keys[j]) == 0 then
          drop[#drop + 1] = mid
        elseif not due[j] or now < tonumber(due[j]) then
          live_at[#live_at + 1] = j
        end
      end
      -- the first live members go; one that is no longer this user's session is
      -- dropped from the index instead, which lowers the count as much
      for q = 1, #live_at - limit + 1 do
        local j = live_at[q]
        local f = fields(keys[j], 'i')
        if f and f[1] == ikey then victims[#victims + 1] = ids[j] else drop[#drop + 1] = ids[j] end
      end
    end
  end
  for _, mid in ipairs(drop) do skip[mid] = true end
  for _, mid in ipairs(victims) do skip[mid] = true end
  kept = #ids - #drop - #victims
  -- the new member's score: its created_at when that sorts it after every member
  local c, last = tonumber(ARGV[4]), tonumber(m[#m])
  if not last or c > last then
    zadd = {score_of(c), id}
  else
    local f = fields(key_of(sprefix, ids[#ids]), 'c')
    local lc = tonumber(f and f[1])
    if not lc or c >= lc then
      zadd = {score_of(last + 1), id}  -- created in the newest one's microsecond
    else
      ids[#ids + 1] = id  -- created before an indexed session: rescore them all
      zadd = rescore(sprefix, ids, skip, id, c)
    end
  end
elseif ikey then
  -- no limit: the index may be long; drop gone members among the two at the old
  -- end and two at random (so it stays within about twice its live sessions)
  local m = redis.call('ZRANGE', ikey, 0, 1)
  for _, mid in ipairs(redis.call('ZRANDMEMBER', ikey, 2)) do m[#m + 1] = mid end
  local seen = {}
  for j = 1, #m do
    if not seen[m[j]] then
      seen[m[j]] = true
      local f = fields(key_of(sprefix, m[j]), 'i')
      if not f or f[1] ~= ikey then drop[#drop + 1] = m[j] end
    end
  end
  local top = redis.call('ZRANGE', ikey, -1, -1, 'WITHSCORES')
  local c, last = tonumber(ARGV[4]), tonumber(top[2])
  if last and c <= last then c = last + 1 end
  zadd = {score_of(c), id}
end
-- every key read: the writes begin
if #drop > 0 then each('ZREM', ikey, drop) end
if #victims > 0 then
  local vkeys = {}
  for j, victim in ipairs(victims) do
    vkeys[j] = key_of(sprefix, victim)
    evicted[#evicted + 1] = victim
  end
  each('DEL', nil, vkeys)
  each('ZREM', ikey, victims)
  each('ZREM', xkey, victims)
end
if ikey then
  redis.call('HSET', skey, 'r', ARGV[1], 's', site, 'n', ARGV[3], 'c', ARGV[4], 'a', ARGV[5],
    'e', e, 'x', ARGV[7], 'i', ikey)
  if not kept then t = redis.call('PEXPIRETIME', ikey) end
  each('ZADD', ikey, zadd)
  -- the index outlives its sessions; persistent while it holds one that never expires
  if not kept then
    outlive(ikey, px, t)
  elseif px == '' then
    redis.call('PERSIST', ikey)
  elseif kept == 0 then
    redis.call('PEXPIREAT', ikey, px)
  else
    redis.call('PEXPIREAT', ikey, px, 'GT')
  end
else
  redis.call('HSET', skey, 'r', ARGV[1], 's', site, 'n', ARGV[3], 'c', ARGV[4], 'a', ARGV[5],
    'e', e, 'x', ARGV[7])
end
wrote(batch, skey)
if e == '' then
  redis.call('ZREM', xkey, id)
else
  redis.call('PEXPIREAT', skey, px)
  redis.call('ZADD', xkey, e, id)
  if batch then  -- (extend_sets, once for the batch)
    outlast(batch, xkey, px)
  else
    extend_set(xkey, px)
  end
end
return evicted
