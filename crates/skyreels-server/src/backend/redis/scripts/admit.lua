-- Admits a task if fewer than `max` tasks wait cluster-wide. The record expires after `ttl_ms`
-- unless a worker starts the task first (a backstop: the sweep fails tasks waiting past the
-- queue TTL).
--
-- KEYS[1] waiting   sorted set of the tasks not started, by admission order
-- KEYS[2] task      the task's hash
-- KEYS[3] seq       the admission counter
-- ARGV[1] max       the cluster-wide bound on waiting tasks
-- ARGV[2] id        the task id
-- ARGV[3] record    the record JSON
-- ARGV[4] total     the task's denoising steps
-- ARGV[5] model     the model id
-- ARGV[6] ttl_ms    the record's backstop expiry
-- Returns 1 (admitted) or 0 (the queue is full).
local waiting, task, seq = KEYS[1], KEYS[2], KEYS[3]
local max, id, record, total, model, ttl_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

if redis.call('ZCARD', waiting) >= tonumber(max) then return 0 end
local n = redis.call('INCR', seq)
redis.call('HSET', task, 'record', record, 'status', 'created', 'step', 0,
  'total', total, 'attempts', 0, 'model', model)
redis.call('PEXPIRE', task, ttl_ms)
redis.call('ZADD', waiting, n, id)
return 1
