-- Helpers of the scripts that order a user index (INSERT, REPLACE, ROTATE).
-- a command over a list of arguments, in chunks (Lua's unpack has a stack limit)
local function each(cmd, key, list)
  for j = 1, #list, 1000 do
    local k = math.min(j + 999, #list)
    if key then redis.call(cmd, key, unpack(list, j, k))
    else redis.call(cmd, unpack(list, j, k)) end
  end
end
-- how many of these keys exist (one EXISTS per chunk); like fields, never half a slot
local function count(keys)
  local n = 0
  for j = 1, #keys, 1000 do
    local r = redis.pcall('EXISTS', unpack(keys, j, math.min(j + 999, #keys)))
    if type(r) == 'table' then settle(r.err) return 0 end
    n = n + r
  end
  return n
end
local function exists(key)
  local r = redis.pcall('EXISTS', key)
  if type(r) == 'table' then settle(r.err) return 0 end
  return r
end
local function score_of(n) return string.format('%d', n) end
-- ZADD arguments that rescore the index `ids` (in index order, minus `skip`) by
-- (created_at, index order): each member's created_at read from its session (the
-- session `id` taken as created at `c`), or one more than the score before it when
-- that is not greater. Reads only; damaged created_at sorts first.
local function rescore(sprefix, ids, skip, id, c)
  local rows = {}
  for j, mid in ipairs(ids) do
    if not skip[mid] then
      local at = c
      if mid ~= id then
        local f = fields(key_of(sprefix, mid), 'c')
        at = tonumber(f and f[1]) or 0
      end
      rows[#rows + 1] = {at, j, mid}
    end
  end
  table.sort(rows, function(p, q)
    if p[1] ~= q[1] then return p[1] < q[1] end
    return p[2] < q[2]
  end)
  local out, prev = {}, nil
  for _, row in ipairs(rows) do
    local s = row[1]
    if prev and s <= prev then s = prev + 1 end
    out[#out + 1] = score_of(s)
    out[#out + 1] = row[3]
    prev = s
  end
  return out
end
