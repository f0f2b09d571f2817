-- KEYS: session, expiry set
-- ARGV (as apply_first.lua splits what was sent): site, now (us), sliding deadline
--       ('' = no idle timeout), grace ms, id,
--       size limit (0 = none), number of expectations, number of sets, the version
--       the caller loaded, the whole new record it built from it and its expiry ('' x3
--       without), then each expectation (key JSON, value JSON or '' for absent), each
--       set (key JSON, value JSON), then the key JSON of each key to delete.
-- Uses the shared prelude (fields, here, live, schedule, outlive).
local function str_end(s, p)
  -- s[p] is a quote: the index after the string's closing quote, nil if unterminated.
  -- A plain search (memchr speed over long strings); a quote preceded by an odd run
  -- of backslashes is escaped.
  local q = p + 1
  while true do
    local i = string.find(s, '"', q, true)
    if not i then return nil end
    local k = i - 1
    while string.byte(s, k) == 92 do k = k - 1 end
    if (i - 1 - k) % 2 == 0 then return i + 1 end
    q = i + 1
  end
end
local function value_end(s, p)
  -- the index after the JSON value starting at s[p], nil if malformed
  local c = string.byte(s, p)
  if c == 34 then return str_end(s, p) end
  if c == 123 or c == 91 then
    local depth, q = 0, p
    while true do
      local i = string.find(s, '["{}%[%]]', q)
      if not i then return nil end
      local b = string.byte(s, i)
      if b == 34 then
        q = str_end(s, i)
        if not q then return nil end
      else
        if b == 123 or b == 91 then depth = depth + 1 else depth = depth - 1 end
        q = i + 1
        if depth == 0 then return q end
      end
    end
  end
  if not c then return nil end
  return string.find(s, '[,}%]]', p)  -- a number, true, false or null
end
local function members(s, p)
  -- the members {key JSON, value JSON} of the object at s[p] and the index after
  -- it; nil if it is not a compact JSON object
  if string.byte(s, p) ~= 123 then return nil end
  local out = {}
  p = p + 1
  if string.byte(s, p) == 125 then return out, p + 1 end
  while true do
    if string.byte(s, p) ~= 34 then return nil end
    local k = str_end(s, p)
    if not k or string.byte(s, k) ~= 58 then return nil end
    local v = value_end(s, k + 1)
    if not v or v == k + 1 then return nil end
    out[#out + 1] = {string.sub(s, p, k - 1), string.sub(s, k + 1, v - 1)}
    local b = string.byte(s, v)
    if b == 125 then return out, v + 1 end
    if b ~= 44 then return nil end
    p = v + 1
  end
end
local function join(list)
  local parts = {}
  for _, m in ipairs(list) do
    if m then parts[#parts + 1] = m[1] .. ':' .. m[2] end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

local skey, xkey = KEYS[1], KEYS[2]
local now, sliding = ARGV[2], ARGV[3]
local f = fields(skey, 's', 'i', 'e', 'x', 'n')
if not f or not f[1] or not f[3] or not f[5] then return 'missing' end
if f[1] ~= ARGV[1] then return 'other_site' end
if not live(f[3], tonumber(now)) then return 'expired' end
local n, e, record
if ARGV[9] ~= '' and f[5] == ARGV[9] then
  -- nothing was written since the caller loaded version ARGV[9]: the whole record it
  -- built from what it loaded is the new one (its expectations hold by construction)
  n = string.format('%d', tonumber(f[5]) + 1)
  record, e = ARGV[10], ARGV[11]
else
local r = redis.call('HGET', skey, 'r')  -- only the merge reads the record
if not r then return 'missing' end
-- The data is the record's last member. In compact JSON a quote that follows a comma
-- opens a key (a quote inside a string is escaped), so the first ',"d":' is it, and
-- the header's numbers are found the same way.
local i = string.find(r, ',"d":', 1, true)
if not i then return 'corrupt' end
local data, dstop = members(r, i + 5)
if not data or dstop ~= #r or string.byte(r, #r) ~= 125 then return 'corrupt' end
-- encrypted data (this merge runs only for a store without keys): never merge into it
if #data == 1 and data[1][1] == '"\\u0000enc"' then return 'sealed' end
local pos = {}
for j, m in ipairs(data) do pos[m[1]] = j end
local a = 12
for _ = 1, tonumber(ARGV[7]) do
  local j, v = pos[ARGV[a]], ARGV[a + 1]
  if v == '' then
    if j then return 'conflict' end
  elseif not j or data[j][2] ~= v then
    return 'conflict'
  end
  a = a + 2
end
for _ = 1, tonumber(ARGV[8]) do
  local k, v = ARGV[a], ARGV[a + 1]
  local j = pos[k]
  if j then
    data[j][2] = v
  else
    data[#data + 1] = {k, v}
    pos[k] = #data
  end
  a = a + 2
end
for q = a, #ARGV do
  local j = pos[ARGV[q]]
  if j then data[j] = false end
end
n = string.format('%d', (tonumber(f[5]) or 0) + 1)
e = f[3]
if sliding ~= '' then
  e = sliding
  if f[4] and f[4] ~= '' then
    local x = tonumber(f[4])
    if not x then return 'corrupt' end
    if x < tonumber(sliding) then e = f[4] end
  end
end
-- the header with updated_at, last access, expiry and version rewritten
local spans = {}
for _, kv in ipairs({{',"m":', now}, {',"a":', now}, {',"e":', e == '' and 'null' or e},
                     {',"n":', n}}) do
  local k = string.find(r, kv[1], 1, true)
  if not k or k > i then return 'corrupt' end
  local v = k + #kv[1]
  local stop = string.find(r, ',', v, true)
  spans[#spans + 1] = {v, stop, kv[2]}
end
table.sort(spans, function(p, q) return p[1] < q[1] end)
local parts, from = {}, 1
for _, span in ipairs(spans) do
  parts[#parts + 1] = string.sub(r, from, span[1] - 1)
  parts[#parts + 1] = span[3]
  from = span[2]
end
parts[#parts + 1] = string.sub(r, from, i + 4)
parts[#parts + 1] = join(data)
parts[#parts + 1] = '}'
record = table.concat(parts)
end
local limit = tonumber(ARGV[6])
if limit > 0 and #record > limit then return {'too_large', #record} end
local t
if sliding ~= '' and f[2] then t = here(f[2]) end
redis.call('HSET', skey, 'r', record, 'n', n, 'a', now, 'e', e)
if sliding ~= '' then
  local px = string.format('%d', math.floor((tonumber(e) + 999) / 1000) + tonumber(ARGV[4]))
  redis.call('PEXPIREAT', skey, px)
  schedule(xkey, e, ARGV[5], px)
  if f[2] then outlive(f[2], px, t) end
end
return {'ok', n, e, KEYS[1]}  -- (the key: the caller checks the reply is its own)
