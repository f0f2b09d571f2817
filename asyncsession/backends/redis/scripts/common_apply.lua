-- The common write: no idle timeout, nothing written since the caller loaded the
-- session (its base version is the stored one), so the whole record the caller built
-- is the new one: one pattern match, one HMGET and one HSET. `header` is the apply
-- script's first argument as sent (site, now, sliding deadline, grace, id, limit,
-- counts, base version, the new record's expiry, each followed by ','). The reply
-- (`ok` names its key: the caller checks it is its own), or nil when this is not the
-- common write (the full apply script decides).
-- Used by apply_first.lua (one write) and multi_apply.lua (the writes of one batch).
local function common_apply(key, header, record)
  local site0, now0, sliding0, limit0, base0 = string.match(header,
    '^([^,]*),([^,]*),([^,]*),[^,]*,[^,]*,([^,]*),[^,]*,[^,]*,([^,]*),')
  if sliding0 ~= '' or not base0 or base0 == '' then return nil end
  local f0 = redis.pcall('HMGET', key, 's', 'e', 'n')
  if f0[1] == site0 and f0[3] == base0 and f0[2]
      and (f0[2] == '' or tonumber(now0) < (tonumber(f0[2]) or 0))
      and (limit0 == '0' or #record <= tonumber(limit0)) then
    local n0 = string.format('%d', tonumber(f0[3]) + 1)
    redis.call('HSET', key, 'r', record, 'n', n0, 'a', now0)
    return {'ok', n0, f0[2], key}
  end
  return nil
end
