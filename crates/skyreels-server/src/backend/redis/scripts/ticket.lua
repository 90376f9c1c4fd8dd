-- Opens a PUT ticket if fewer than `max` are open cluster-wide and fewer than `max_per_key` of
-- its API key's.
--
-- KEYS[1] open          open tickets (sorted set: digest -> expiry ms)
-- KEYS[2] key_open      the API key's open tickets (the same)
-- KEYS[3] ticket        the ticket (its upload JSON, by the token's digest)
-- ARGV[1] now_ms        the time
-- ARGV[2] max           open tickets allowed cluster-wide
-- ARGV[3] expires_ms    when this ticket expires
-- ARGV[4] digest        the SHA-256 of the PUT token
-- ARGV[5] upload        the upload JSON
-- ARGV[6] ttl_ms        the ticket's time to live
-- ARGV[7] max_per_key   open tickets allowed per API key
-- Returns 1, 0 when too many are open, 2 when too many of the key's are.
local open, key_open, ticket = KEYS[1], KEYS[2], KEYS[3]
local now_ms, max, expires_ms, digest = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local upload, ttl_ms, max_per_key = ARGV[5], ARGV[6], ARGV[7]

redis.call('ZREMRANGEBYSCORE', open, 0, now_ms)
redis.call('ZREMRANGEBYSCORE', key_open, 0, now_ms)
if redis.call('ZCARD', key_open) >= tonumber(max_per_key) then return 2 end
if redis.call('ZCARD', open) >= tonumber(max) then return 0 end
redis.call('ZADD', open, expires_ms, digest)
redis.call('ZADD', key_open, expires_ms, digest)
redis.call('PEXPIRE', key_open, ttl_ms)
redis.call('SET', ticket, upload, 'PX', ttl_ms)
return 1
