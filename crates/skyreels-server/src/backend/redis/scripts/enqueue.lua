-- Queues a created task's prepared input on its model's stream for its priority, once (a
-- retried call finds it queued).
--
-- KEYS[1] task      the task's hash
-- KEYS[2] input     the input's hash (request JSON and image bytes)
-- KEYS[3] stream    the model's queue
-- KEYS[4] low       the model's low-priority queue
-- ARGV[1] id        the task id
-- ARGV[2] request   the generation parameters (JSON)
-- ARGV[3] image     the image's bytes as they came ('' for none)
-- ARGV[4] ttl_ms    the input's backstop expiry (as the record's)
-- Returns 1, or 0 when the task no longer waits (cancelled, failed, expired).
local task, input, stream, low = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, request, image, ttl_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

if redis.call('HGET', task, 'status') ~= 'created' then return 0 end
if redis.call('HEXISTS', task, 'enqueued') == 1 then return 1 end
if redis.call('HGET', task, 'priority') == 'low' then stream = low end
redis.call('HSET', input, 'request', request, 'image', image)
redis.call('PEXPIRE', input, ttl_ms)
redis.call('XADD', stream, '*', 'id', id)
redis.call('HSET', task, 'enqueued', 1)
return 1
