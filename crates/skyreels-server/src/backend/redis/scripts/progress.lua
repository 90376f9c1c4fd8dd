-- A running task's step: stored if this worker still owns the task; says whether a cancel was
-- asked.
--
-- KEYS[1] task     the task's hash
-- KEYS[2] cancel   set by DELETE while the task runs
-- ARGV[1] worker   this worker's consumer name
-- ARGV[2] step     denoising steps done
-- ARGV[3] total    of this many
-- Returns 1 (go on), 2 (a cancel was asked) or 0 (no longer this worker's: stop, write nothing).
local task, cancel = KEYS[1], KEYS[2]
local worker, step, total = ARGV[1], ARGV[2], ARGV[3]

if redis.call('HGET', task, 'status') ~= 'processing'
  or redis.call('HGET', task, 'worker') ~= worker then return 0 end
redis.call('HSET', task, 'step', step, 'total', total)
if redis.call('EXISTS', cancel) == 1 then return 2 end
return 1
