//! The Lua scripts that make each state change of a task atomic in Redis (one script runs at a
//! time on the server, so a check and its write cannot interleave with another node's).

use redis::Script;
use std::sync::LazyLock;

/// Admits a task if fewer than `max` wait cluster-wide.
/// KEYS: waiting, task, seq. ARGV: max, id, record JSON, total steps, model.
/// Returns 1 (admitted) or 0 (queue full).
pub static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[2], 'record', ARGV[3], 'status', 'created', 'step', 0,
  'total', ARGV[4], 'attempts', 0, 'model', ARGV[5])
redis.call('ZADD', KEYS[1], seq, ARGV[2])
return 1
",
    )
});

/// Queues a created task's prepared input on its model's stream (once: a retried call finds it
/// queued). KEYS: task, input, stream. ARGV: id, request JSON, image RGB bytes.
/// Returns 1, or 0 when the task is no longer waiting (cancelled, failed, expired).
pub static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'status') ~= 'created' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'enqueued') == 1 then return 1 end
redis.call('HSET', KEYS[2], 'request', ARGV[2], 'image', ARGV[3])
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'enqueued', 1)
return 1
",
    )
});

/// A worker starts (or, after its last worker died, restarts) a task it read from the stream.
/// KEYS: task, waiting. ARGV: id, worker, now ms, max attempts, stream entry.
/// Returns {verdict, attempt}: `run` (this worker owns attempt N), `exhausted` (N attempts
/// made: fail it), or what means there is nothing to do: the status, `gone` when expired,
/// `duplicate` for an entry that is not the one the task runs under.
pub static START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {'gone', 0} end
if s ~= 'created' and s ~= 'processing' then return {s, 0} end
if s == 'processing' and redis.call('HGET', KEYS[1], 'entry') ~= ARGV[5] then
  return {'duplicate', 0}
end
local a = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if a >= tonumber(ARGV[4]) then return {'exhausted', a} end
a = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'processing', 'worker', ARGV[2], 'step', 0,
  'started_at', ARGV[3], 'entry', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[1])
return {'run', a}
",
    )
});

/// A running task's step: stored if this worker still owns it; says whether a cancel was asked.
/// KEYS: task, cancel. ARGV: worker, step, total.
/// Returns 1 (go on), 2 (cancel asked) or 0 (no longer this worker's: stop, write nothing).
pub static PROGRESS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'status') ~= 'processing'
  or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[2], 'total', ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
return 1
",
    )
});

/// A worker's heartbeat on its running task: resets the stream entry's idle time (so no other
/// worker claims it) while the task is still this worker's.
/// KEYS: task, stream. ARGV: worker, group, entry.
pub static KEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[1], 0, ARGV[3], 'JUSTID')
  return 1
end
return 0
",
    )
});

/// A change of status that only happens from `expected` (compare and set): the winner writes
/// the whole record. Terminal states drop the input, leave the waiting set, store the output
/// and start the retention clock; `deleted` drops the output.
/// KEYS: task, waiting, input, output, stream.
/// ARGV: expected, status, record JSON, id, ttl ms (0: keep), output bytes ('' none), group,
/// stream entry ('' none), 1 to delete the output.
/// Returns 'ok', or the status found instead ('missing' when expired).
pub static END: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= ARGV[1] then return s or 'missing' end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'record', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[3])
local ttl = tonumber(ARGV[5])
if ARGV[6] ~= '' then
  if ttl > 0 then redis.call('SET', KEYS[4], ARGV[6], 'PX', ttl)
  else redis.call('SET', KEYS[4], ARGV[6]) end
end
if ARGV[9] == '1' then redis.call('DEL', KEYS[4]) end
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
if ARGV[8] ~= '' then
  redis.call('XACK', KEYS[5], ARGV[7], ARGV[8])
  redis.call('XDEL', KEYS[5], ARGV[8])
end
return 'ok'
",
    )
});

/// Opens a PUT ticket if fewer than `max` are open cluster-wide.
/// KEYS: open tickets (sorted set: digest -> expiry ms), ticket. ARGV: now ms, max, expiry ms,
/// digest, upload JSON, ttl ms. Returns 1, or 0 when too many are open.
pub static TICKET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6])
return 1
",
    )
});

/// Takes a ticket (single use). KEYS: open tickets, ticket. ARGV: digest.
/// Returns the upload JSON, or nil.
pub static TAKE_TICKET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('GETDEL', KEYS[2])
",
    )
});
