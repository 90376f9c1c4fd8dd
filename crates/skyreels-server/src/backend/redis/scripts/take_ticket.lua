-- Takes a ticket (single use), freeing its places.
--
-- KEYS[1] open          open tickets (sorted set: digest -> expiry ms)
-- KEYS[2] ticket        the ticket
-- ARGV[1] digest        the SHA-256 of the PUT token
-- ARGV[2] key_prefix    the prefix of the per-key sets (`...tickets:`; the owner is in the
--                       upload JSON)
-- Returns the upload JSON, or nil.
local open, ticket = KEYS[1], KEYS[2]
local digest, key_prefix = ARGV[1], ARGV[2]

redis.call('ZREM', open, digest)
local upload = redis.call('GETDEL', ticket)
if upload then
  local owner = cjson.decode(upload)['owner'] or 'anonymous'
  redis.call('ZREM', key_prefix .. owner, digest)
end
return upload
