-- Admits a task if fewer than `max` tasks wait cluster-wide. The record expires after `ttl_ms`
-- unless a worker starts the task first (a backstop: the sweep fails tasks waiting past the
-- queue TTL).
--
-- KEYS[1] waiting    sorted set of the tasks not started: normal ones scored by admission
--                    order, low ones by 2^50 + it (behind every normal one; exact in a double)
-- KEYS[2] task       the task's hash
-- KEYS[3] seq        the admission counter
-- ARGV[1] max        the cluster-wide bound on waiting tasks
-- ARGV[2] id         the task id
-- ARGV[3] record     the record JSON
-- ARGV[4] total      the task's denoising steps
-- ARGV[5] model      the model id
-- ARGV[6] ttl_ms     the record's backstop expiry
-- ARGV[7] priority   'normal' or 'low'
-- ARGV[8] cancel_at  the task's deadline in ms since the epoch (0: none)
-- Returns 1 (admitted) or 0 (the queue is full).
local waiting, task, seq = KEYS[1], KEYS[2], KEYS[3]
local max, id, record, total, model, ttl_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local priority, cancel_at = ARGV[7], ARGV[8]

if redis.call('ZCARD', waiting) >= tonumber(max) then return 0 end
local n = redis.call('INCR', seq)
redis.call('HSET', task, 'record', record, 'status', 'created', 'step', 0,
  'total', total, 'attempts', 0, 'model', model, 'priority', priority, 'cancel_at', cancel_at)
redis.call('PEXPIRE', task, ttl_ms)
if priority == 'low' then n = n + 2^50 end
redis.call('ZADD', waiting, n, id)
return 1
