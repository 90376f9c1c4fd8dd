-- Accounts for an upload's bytes if its API key's and the cluster's quotas leave room; the
-- bytes of uploads whose retention ended are given back first.
--
-- KEYS[1] usage        hash: API key -> bytes kept (`*` -> all keys)
-- KEYS[2] expiry       sorted set: `key|id|bytes` -> expiry ms
-- ARGV[1] now_ms       the time
-- ARGV[2] owner        the API key
-- ARGV[3] id           the upload id
-- ARGV[4] bytes        the upload's size
-- ARGV[5] expires_ms   when the upload expires
-- ARGV[6] per_key      the per-key quota
-- ARGV[7] total        the cluster's quota
-- Returns 0 (accounted), 1 (over the key's quota) or 2 (over the cluster's).
local usage, expiry = KEYS[1], KEYS[2]
local now_ms, owner, id, bytes = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local expires_ms, per_key, total = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])

local gone = redis.call('ZRANGEBYSCORE', expiry, 0, now_ms, 'LIMIT', 0, 1000)
for _, m in ipairs(gone) do
  local k, n = string.match(m, '^([^|]*)|[^|]*|(%d+)$')
  if k then
    redis.call('HINCRBY', usage, k, -tonumber(n))
    redis.call('HINCRBY', usage, '*', -tonumber(n))
  end
  redis.call('ZREM', expiry, m)
end
if tonumber(redis.call('HGET', usage, owner) or '0') + bytes > per_key then return 1 end
if tonumber(redis.call('HGET', usage, '*') or '0') + bytes > total then return 2 end
redis.call('HINCRBY', usage, owner, bytes)
redis.call('HINCRBY', usage, '*', bytes)
redis.call('ZADD', expiry, expires_ms, owner .. '|' .. id .. '|' .. bytes)
return 0
