-- The common writes of one batch on one server in one call (the transport merges
-- them: one script run instead of one per write).
-- KEYS: session key, per write. ARGV: the apply script's first two arguments as
-- sent (header, whole new record), per write. Returns each write's reply as APPLY
-- would, or 'again' for one that is not the common write here (its version moved,
-- another site, expired, too large, missing): the transport sends that one as APPLY,
-- whose full script merges or answers why.
local out = {}
for i = 1, #KEYS do
  out[i] = common_apply(KEYS[i], ARGV[2 * i - 1], ARGV[2 * i]) or 'again'
end
return out
