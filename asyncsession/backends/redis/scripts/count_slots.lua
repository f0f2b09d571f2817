-- Redis Cluster, no KEYS: sessions scheduled in the expiry sets of the given slots of
-- this node (those it does not hold count 0). ARGV: expiry key prefix, slot tags...
local n = 0
for i = 2, #ARGV do
  local c = redis.pcall('ZCARD', ARGV[1] .. ARGV[i] .. '}')
  if type(c) == 'number' then n = n + c end
end
return n
