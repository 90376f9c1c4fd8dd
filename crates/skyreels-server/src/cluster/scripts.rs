//! The Lua scripts that make each state change of a task atomic in Redis (one script runs at a
//! time on the server, so a check and its write cannot interleave with another node's).

use redis::Script;
use std::sync::LazyLock;

/// Admits a task if fewer than `max` wait cluster-wide; the record expires after `ttl` unless
/// a worker starts it first (a backstop: the sweep fails tasks waiting past the queue TTL).
/// KEYS: waiting, task, seq. ARGV: max, id, record JSON, total steps, model, ttl ms.
/// Returns 1 (admitted) or 0 (queue full).
pub static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[2], 'record', ARGV[3], 'status', 'created', 'step', 0,
  'total', ARGV[4], 'attempts', 0, 'model', ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[1], seq, ARGV[2])
return 1
",
    )
});

/// Queues a created task's prepared input on its model's stream (once: a retried call finds it
/// queued). KEYS: task, input, stream. ARGV: id, request JSON, image bytes (as they came),
/// ttl ms of the input (as the record's).
/// Returns 1, or 0 when the task is no longer waiting (cancelled, failed, expired).
pub static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'status') ~= 'created' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'enqueued') == 1 then return 1 end
redis.call('HSET', KEYS[2], 'request', ARGV[2], 'image', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'enqueued', 1)
return 1
",
    )
});

/// A worker starts (or, after its last worker died, restarts) a task it read from the stream.
/// The record and the input no longer expire (a started task ends with its retention).
/// KEYS: task, waiting, input. ARGV: id, worker, now ms, max attempts, stream entry.
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
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[3])
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
/// ARGV: expected, status, record JSON, id, ttl ms (0: no expiry; `deleted` keeps the one it
/// has), output bytes ('' none), group,
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
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl)
elseif ARGV[2] ~= 'deleted' then redis.call('PERSIST', KEYS[1]) end
if ARGV[8] ~= '' then
  redis.call('XACK', KEYS[5], ARGV[7], ARGV[8])
  redis.call('XDEL', KEYS[5], ARGV[8])
end
return 'ok'
",
    )
});

/// Opens a PUT ticket if fewer than `max` are open cluster-wide and fewer than `max per key`
/// of its API key's.
/// KEYS: open tickets (sorted set: digest -> expiry ms), the key's open tickets (the same),
/// ticket. ARGV: now ms, max, expiry ms, digest, upload JSON, ttl ms, max per key.
/// Returns 1, 0 when too many are open, 2 when too many of the key's are.
pub static TICKET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], 0, ARGV[1])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then return 2 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
return 1
",
    )
});

/// Takes a ticket (single use), freeing its places. KEYS: open tickets, ticket.
/// ARGV: digest, the prefix of the per-key sets (`...tickets:`; the owner is in the upload).
/// Returns the upload JSON, or nil.
pub static TAKE_TICKET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZREM', KEYS[1], ARGV[1])
local meta = redis.call('GETDEL', KEYS[2])
if meta then
  local owner = cjson.decode(meta)['owner'] or 'anonymous'
  redis.call('ZREM', ARGV[2] .. owner, ARGV[1])
end
return meta
",
    )
});

/// Accounts for an upload's bytes if its API key's and the cluster's quotas leave room; the
/// bytes of uploads whose retention ended are given back first.
/// KEYS: usage (hash: key -> bytes, `*` -> all), expiry (sorted set: `key|id|bytes` -> expiry ms).
/// ARGV: now ms, key, upload id, bytes, expiry ms, per-key quota, cluster quota.
/// Returns 0 (accounted), 1 (over the key's quota) or 2 (over the cluster's).
pub static UPLOAD_QUOTA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], 0, ARGV[1], 'LIMIT', 0, 1000)
for _, m in ipairs(gone) do
  local k, n = string.match(m, '^([^|]*)|[^|]*|(%d+)$')
  if k then
    redis.call('HINCRBY', KEYS[1], k, -tonumber(n))
    redis.call('HINCRBY', KEYS[1], '*', -tonumber(n))
  end
  redis.call('ZREM', KEYS[2], m)
end
local n = tonumber(ARGV[4])
if tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0') + n > tonumber(ARGV[6]) then return 1 end
if tonumber(redis.call('HGET', KEYS[1], '*') or '0') + n > tonumber(ARGV[7]) then return 2 end
redis.call('HINCRBY', KEYS[1], ARGV[2], n)
redis.call('HINCRBY', KEYS[1], '*', n)
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4])
return 0
",
    )
});
