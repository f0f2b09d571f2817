-- Run before the shared prelude is even defined: the common create (see
-- common_create.lua). ARGV as sent (see insert.lua): record, session key prefix,
-- then the list.
if #KEYS == 2 then
  local v = split_insert(ARGV[3])
  if v[13] == '0' and v[5] ~= '' then
    return common_create(KEYS[1], KEYS[2], ARGV[1], v)
  end
end
