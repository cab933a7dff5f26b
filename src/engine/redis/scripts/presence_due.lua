-- Announces the offline / vacated transitions whose grace is over (see
-- presence_due in presence.lua, prepended): a single Redis or Sentinel.
-- Returns them as '-u' / '-g', name, seq.
-- KEYS[1] '<base>:off' (declared for routing only)
-- ARGV[1] the presence base ('<prefix>:pr'), ARGV[2] most names per call.
presence_init(ARGV[1], '', 0)
presence_due(tonumber(ARGV[2]))
return PRESENCE_OUT
