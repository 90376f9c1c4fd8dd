-- A change of status that only happens from `expected` (compare and set): the winner writes
-- the whole record. Terminal states drop the input, leave the waiting set, store the output
-- and start the retention clock; `deleted` drops the output.
--
-- KEYS[1] task            the task's hash
-- KEYS[2] waiting         sorted set of the tasks not started
-- KEYS[3] input           the input's hash
-- KEYS[4] output          the output video's key
-- KEYS[5] stream          the model's queue the task waits on (its priority's)
-- ARGV[1] expected        the status the change starts from
-- ARGV[2] status          the new status
-- ARGV[3] record          the new record JSON
-- ARGV[4] id              the task id
-- ARGV[5] ttl_ms          the retention (0: no expiry; `deleted` keeps the expiry it has)
-- ARGV[6] output_bytes    the video to store ('' none)
-- ARGV[7] group           the consumer group
-- ARGV[8] entry           the stream entry to acknowledge and delete ('' none)
-- ARGV[9] delete_output   '1' to delete the output
-- Returns 'ok', or the status found instead ('missing' when expired).
local task, waiting, input, output, stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local expected, status, record, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl_ms, output_bytes, group, entry = tonumber(ARGV[5]), ARGV[6], ARGV[7], ARGV[8]
local delete_output = ARGV[9]

local s = redis.call('HGET', task, 'status')
if s ~= expected then return s or 'missing' end
redis.call('HSET', task, 'status', status, 'record', record)
redis.call('ZREM', waiting, id)
redis.call('DEL', input)
if output_bytes ~= '' then
  if ttl_ms > 0 then redis.call('SET', output, output_bytes, 'PX', ttl_ms)
  else redis.call('SET', output, output_bytes) end
end
if delete_output == '1' then redis.call('DEL', output) end
if ttl_ms > 0 then redis.call('PEXPIRE', task, ttl_ms)
elseif status ~= 'deleted' then redis.call('PERSIST', task) end
if entry ~= '' then
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
end
return 'ok'
