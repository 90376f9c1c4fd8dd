-- A worker starts (or, after its last worker died, restarts) a task it read from the stream.
-- The record and the input no longer expire (a started task ends with its retention).
--
-- KEYS[1] task          the task's hash
-- KEYS[2] waiting       sorted set of the tasks not started
-- KEYS[3] input         the input's hash
-- ARGV[1] id            the task id
-- ARGV[2] worker        this worker's consumer name
-- ARGV[3] now_ms        the start time
-- ARGV[4] max_attempts  starts allowed in all
-- ARGV[5] entry         the stream entry the worker read
-- Returns {verdict, attempt}: `run` (this worker owns attempt N), `exhausted` (N attempts were
-- made: fail it), `late` (a waiting task past its deadline: fail it, unstarted), or what means
-- there is nothing to do: the status, `gone` when expired, `duplicate` for an entry that is
-- not the one the task runs under.
local task, waiting, input = KEYS[1], KEYS[2], KEYS[3]
local id, worker, now_ms, max_attempts, entry = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local s = redis.call('HGET', task, 'status')
if not s then return {'gone', 0} end
if s ~= 'created' and s ~= 'processing' then return {s, 0} end
if s == 'processing' and redis.call('HGET', task, 'entry') ~= entry then
  return {'duplicate', 0}
end
local cancel_at = tonumber(redis.call('HGET', task, 'cancel_at') or '0') or 0
if s == 'created' and cancel_at > 0 and tonumber(now_ms) >= cancel_at then
  return {'late', 0}
end
local a = tonumber(redis.call('HGET', task, 'attempts') or '0')
if a >= tonumber(max_attempts) then return {'exhausted', a} end
a = redis.call('HINCRBY', task, 'attempts', 1)
redis.call('HSET', task, 'status', 'processing', 'worker', worker, 'step', 0,
  'started_at', now_ms, 'entry', entry)
redis.call('ZREM', waiting, id)
redis.call('PERSIST', task)
redis.call('PERSIST', input)
return {'run', a}
