-- A worker's heartbeat on its running task: resets the stream entry's idle time (so no other
-- worker claims it) while the task is still this worker's.
--
-- KEYS[1] task     the task's hash
-- KEYS[2] stream   the model's queue
-- ARGV[1] worker   this worker's consumer name
-- ARGV[2] group    the consumer group
-- ARGV[3] entry    the task's stream entry
-- Returns 1 (kept) or 0 (not this worker's task any more).
local task, stream = KEYS[1], KEYS[2]
local worker, group, entry = ARGV[1], ARGV[2], ARGV[3]

if redis.call('HGET', task, 'worker') == worker then
  redis.call('XCLAIM', stream, group, worker, 0, entry, 'JUSTID')
  return 1
end
return 0
