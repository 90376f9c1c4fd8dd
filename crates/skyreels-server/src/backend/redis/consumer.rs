//! The worker side of the Redis backend: a consumer that takes tasks from its models' streams
//! through the consumer group (a model's low-priority stream only while its normal one has
//! nothing), and a heartbeat thread beside it that announces the worker and
//! keeps its running task's stream entry fresh. A worker that dies stops the heartbeat; after
//! the claim timeout another worker's `XAUTOCLAIM` takes the entry and runs the task again
//! from scratch (attempt N+1; after [`MAX_ATTEMPTS`] the task fails with 5003). The first
//! attempt to finish wins (a compare and set from `processing` by this worker), a later one
//! finds the task ended and drops its own.

use super::{record_of, scripts, Cluster, End, TaskHash, GROUP, KEYS, MAX_ATTEMPTS};
use crate::engine::task::{new_id, now_ms, JobRecord, Outcome, Status, TaskCode};
use crate::engine::{
    Consumer, EngineError, Lease, ModelInfo, Priority, Queued, QueuedImage, Verdict,
};
use redis::streams::{StreamAutoClaimReply, StreamReadReply};
use redis::Commands;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The task a worker runs, for its heartbeat.
#[derive(Clone)]
struct Running {
    id: String,
    /// The stream it was read from.
    stream: String,
    entry: String,
}

/// A stream entry this worker was given.
struct Taken {
    model: String,
    /// Which of the model's streams it was read from.
    priority: Priority,
    entry: String,
    id: String,
}

impl Taken {
    fn stream(&self) -> String {
        KEYS.stream(&self.model, self.priority)
    }
}

/// The streams a worker of `models` reads, in the order it takes from them: every normal one,
/// then every low one.
fn queues(models: &[ModelInfo]) -> Vec<(String, Priority)> {
    [Priority::Normal, Priority::Low]
        .into_iter()
        .flat_map(|p| models.iter().map(move |m| (m.id.clone(), p)))
        .collect()
}

/// `XREADGROUP` of at most one new entry from one queue, without waiting (one stream per read:
/// every entry a read returns becomes this worker's, and a read of several streams returns one
/// entry per stream).
fn read(
    c: &mut redis::Connection,
    name: &str,
    (model, priority): &(String, Priority),
) -> redis::RedisResult<Option<Taken>> {
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(name)
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(KEYS.stream(model, *priority))
        .arg(">")
        .query(c)?;
    let entry = reply
        .and_then(|r| r.keys.into_iter().next())
        .and_then(|k| k.ids.into_iter().next());
    Ok(entry.map(|e| Taken {
        model: model.clone(),
        priority: *priority,
        entry: e.id.clone(),
        id: e.get("id").unwrap_or_default(),
    }))
}

/// Waits up to `ms` for a new entry on any of `queues`, taking none (a plain `XREAD` from `$`):
/// the reads that follow take one in priority order. (An entry added just before the wait
/// began is read at the next turn, within the wait.)
fn wait_for_entries(
    c: &mut redis::Connection,
    queues: &[(String, Priority)],
    ms: u64,
) -> redis::RedisResult<()> {
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT").arg(1).arg("BLOCK").arg(ms).arg("STREAMS");
    for (model, priority) in queues {
        cmd.arg(KEYS.stream(model, *priority));
    }
    for _ in queues {
        cmd.arg("$");
    }
    let _: Option<StreamReadReply> = cmd.query(c)?;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// A synchronous connection with timeouts (a read blocks at most this long past BLOCK).
fn connect(cluster: &Cluster) -> redis::RedisResult<redis::Connection> {
    let c = cluster
        .client
        .get_connection_with_timeout(Duration::from_secs(2))?;
    // XREADGROUP blocks for a second; anything else answers at once or Redis is stuck
    c.set_read_timeout(Some(Duration::from_secs(4)))?;
    c.set_write_timeout(Some(Duration::from_secs(4)))?;
    Ok(c)
}

/// The model ids of a worker, as announced.
fn model_ids(models: &[ModelInfo]) -> String {
    serde_json::to_string(&models.iter().map(|m| &m.id).collect::<Vec<_>>())
        .expect("strings serialize")
}

/// Announces the worker every third of the claim timeout and keeps its running task's entry
/// fresh; on stop, takes the worker off the live list.
fn heartbeat(w: &RedisConsumer, stop: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
    let (cluster, name, current) = (w.cluster.clone(), w.name.clone(), w.current.clone());
    let ids = model_ids(&w.models);
    let models: Vec<String> = w.models.iter().map(|m| m.id.clone()).collect();
    let every = (cluster.config.claim_timeout / 3)
        .clamp(Duration::from_millis(200), Duration::from_secs(10));
    let claim_ms = cluster.config.claim_timeout.as_millis() as u64;
    std::thread::Builder::new()
        .name(format!("{name}-heartbeat"))
        .spawn(move || {
            let mut conn: Option<redis::Connection> = None;
            while !stop.load(Ordering::SeqCst) {
                let beat = (|| -> redis::RedisResult<()> {
                    if conn.is_none() {
                        conn = Some(connect(&cluster)?);
                    }
                    let c = conn.as_mut().expect("just connected");
                    let now = now_ms();
                    let seen: Vec<(&str, u64)> = models.iter().map(|m| (m.as_str(), now)).collect();
                    let _: () = redis::pipe()
                        .zadd(KEYS.workers(), &name, now)
                        .hset(KEYS.worker_models(), &name, &ids)
                        .hset_multiple(KEYS.models_seen(), &seen)
                        // workers gone for long are forgotten
                        .zrembyscore(KEYS.workers(), 0, now.saturating_sub(10 * claim_ms))
                        .query(c)?;
                    let running = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if let Some(r) = running {
                        let _: i64 = scripts::KEEP
                            .key(KEYS.task(&r.id))
                            .key(&r.stream)
                            .arg(&name)
                            .arg(GROUP)
                            .arg(&r.entry)
                            .invoke(c)?;
                    }
                    Ok(())
                })();
                if let Err(e) = beat {
                    tracing::warn!(worker = %name, "heartbeat: redis: {e}");
                    conn = None;
                }
                let until = std::time::Instant::now() + every;
                while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            if let Some(c) = conn.as_mut() {
                let _: redis::RedisResult<()> = redis::pipe()
                    .zrem(KEYS.workers(), &name)
                    .hdel(KEYS.worker_models(), &name)
                    .query(c);
            }
        })
        .map_err(|e| tracing::error!("cannot start the heartbeat: {e}"))
        .ok()
}

/// One worker's consumer in the group.
pub(super) struct RedisConsumer {
    cluster: Arc<Cluster>,
    models: Vec<ModelInfo>,
    /// This worker's consumer name in the group.
    name: String,
    conn: Option<redis::Connection>,
    /// While Redis is away, a running task's steps try to reconnect at most this often.
    reconnect_at: Instant,
    current: Arc<Mutex<Option<Running>>>,
    stop: Arc<AtomicBool>,
    beat: Option<std::thread::JoinHandle<()>>,
}

impl RedisConsumer {
    pub(super) fn new(cluster: Arc<Cluster>, models: Vec<ModelInfo>, index: usize) -> Self {
        let name = format!(
            "{}-{}-{index}-{}",
            hostname(),
            std::process::id(),
            &new_id()[..6]
        );
        let mut me = RedisConsumer {
            cluster,
            models,
            name,
            conn: None,
            reconnect_at: Instant::now(),
            current: Arc::default(),
            stop: Arc::default(),
            beat: None,
        };
        me.beat = heartbeat(&me, me.stop.clone());
        tracing::info!(worker = %me.name, "worker ready (redis)");
        me
    }

    /// The connection, (re)connecting: each new connection makes sure the streams and the
    /// group exist and announces the models.
    fn conn(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.conn.is_none() {
            let mut c = connect(&self.cluster)?;
            for (model, priority) in queues(&self.models) {
                let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(KEYS.stream(&model, priority))
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query(&mut c);
                if let Err(e) = created {
                    if e.code() != Some("BUSYGROUP") {
                        return Err(e);
                    }
                }
            }
            for m in &self.models {
                let info = serde_json::to_string(m).expect("model info serializes");
                let _: () = c.hset(KEYS.models(), &m.id, info)?;
            }
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// A task of a dead worker (idle past the claim timeout), else a new one: a normal task,
    /// else a low one, else the first to come within a second on any stream; `None` when there
    /// is none.
    fn next(&mut self) -> redis::RedisResult<Option<Taken>> {
        let claim_ms = self.cluster.config.claim_timeout.as_millis() as u64;
        let (name, queues) = (self.name.clone(), queues(&self.models));
        let c = self.conn()?;
        for (model, priority) in &queues {
            let r: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(KEYS.stream(model, *priority))
                .arg(GROUP)
                .arg(&name)
                .arg(claim_ms)
                .arg("0-0")
                .arg("COUNT")
                .arg(1)
                .query(c)?;
            if let Some(e) = r.claimed.first() {
                tracing::warn!(worker = %name, entry = %e.id, "taking over a task whose worker stopped");
                return Ok(Some(Taken {
                    model: model.clone(),
                    priority: *priority,
                    entry: e.id.clone(),
                    id: e.get("id").unwrap_or_default(),
                }));
            }
        }
        // normal queues first, then low ones; else wait for an entry and look again
        for waited in [false, true] {
            if waited {
                wait_for_entries(c, &queues, 1000)?;
            }
            for queue in &queues {
                if let Some(t) = read(c, &name, queue)? {
                    return Ok(Some(t));
                }
            }
        }
        Ok(None)
    }

    fn ack(&mut self, t: &Taken) {
        let _: redis::RedisResult<()> = self.conn().and_then(|c| {
            redis::pipe()
                .xack(t.stream(), GROUP, &[&t.entry])
                .xdel(t.stream(), &[&t.entry])
                .query(c)
        });
    }

    fn record(&mut self, id: &str) -> Option<JobRecord> {
        let h: TaskHash = self.conn().and_then(|c| c.hgetall(KEYS.task(id))).ok()?;
        record_of(&h)
    }

    /// The task's input as queued: its parameters and its image as it came, decoded and
    /// fitted (a corrupt or missing input fails the task).
    fn input(&mut self, id: &str) -> Result<crate::engine::Input, Outcome> {
        let internal = |e: String| {
            tracing::error!(%id, "{e}");
            Outcome::Failed(TaskCode::Internal, format!("internal error: {e}"))
        };
        let h: TaskHash = self
            .conn()
            .and_then(|c| c.hgetall(KEYS.input(id)))
            .map_err(|e| internal(format!("redis: {e}")))?;
        let json = h
            .get("request")
            .ok_or_else(|| internal("the task's input is gone".into()))?;
        let params = serde_json::from_slice(json)
            .map_err(|e| internal(format!("the queued request: {e}")))?;
        let image = h
            .get("image")
            .filter(|b| !b.is_empty())
            .map(|b| QueuedImage::Encoded(b.clone()));
        Queued { params, image }.into_input()
    }

    /// Fails a waiting task whose deadline passed before it could start (5005) and takes its
    /// entry off the stream; while Redis is away the entry stays pending (read again after the
    /// claim timeout).
    fn fail_late(&mut self, t: &Taken) {
        let retention_ms = self.cluster.retention_ms;
        let ended = (|| -> redis::RedisResult<Option<JobRecord>> {
            let h: TaskHash = self.conn()?.hgetall(KEYS.task(&t.id))?;
            let Some(mut r) = record_of(&h) else {
                return Ok(None);
            };
            if r.miss_deadline().is_err() {
                return Ok(None);
            }
            let end = End {
                expected: Status::Created,
                record: &r,
                ttl_ms: retention_ms,
                output: None,
                entry: Some(&t.entry),
                delete_outputs: false,
            };
            let got: String = end.invocation().invoke(self.conn()?)?;
            Ok((got == "ok").then_some(r))
        })();
        match ended {
            Ok(Some(r)) => self.cluster.hook.committed(&r),
            Ok(None) => self.ack(t),
            Err(e) => {
                tracing::warn!(id = %t.id, "cannot fail a task past its deadline yet: {e}");
                self.conn = None;
            }
        }
    }

    fn set_current(&self, running: Option<Running>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = running;
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(b) = self.beat.take() {
            let _ = b.join();
        }
    }
}

impl Consumer for RedisConsumer {
    fn take(&mut self) -> Result<Option<Lease>, EngineError> {
        let Some(t) = self.next().inspect_err(|_| self.conn = None)? else {
            return Ok(None);
        };
        let name = self.name.clone();
        let started: redis::RedisResult<(String, u32)> = self.conn().and_then(|c| {
            scripts::START
                .key(KEYS.task(&t.id))
                .key(KEYS.waiting())
                .key(KEYS.input(&t.id))
                .arg(&t.id)
                .arg(&name)
                .arg(now_ms())
                .arg(MAX_ATTEMPTS)
                .arg(&t.entry)
                .invoke(c)
        });
        // on failure the entry stays pending: taken over after the claim timeout
        let (verdict, attempt) = started.inspect_err(|_| self.conn = None)?;
        let input = match verdict.as_str() {
            "run" => self.input(&t.id),
            "exhausted" => Err(Outcome::Failed(
                TaskCode::Unavailable,
                format!(
                    "the task was started {attempt} times and its worker stopped each time \
                     (a crash, a lost machine or a shutdown); submit it again"
                ),
            )),
            "late" => {
                self.fail_late(&t);
                return Ok(None);
            }
            _ => {
                // nothing to do: ended, expired, or a duplicate entry
                self.ack(&t);
                return Ok(None);
            }
        };
        let record = self.record(&t.id);
        let base64_output = record.as_ref().is_some_and(|r| r.base64_output);
        let safety_check = record.as_ref().is_none_or(|r| r.safety_check);
        let cancel_at = record.and_then(|r| r.cancel_at);
        self.set_current(Some(Running {
            id: t.id.clone(),
            stream: t.stream(),
            entry: t.entry.clone(),
        }));
        Ok(Some(Lease {
            id: t.id,
            model: t.model,
            attempt,
            base64_output,
            safety_check,
            priority: t.priority,
            cancel_at,
            input,
            handle: t.entry,
        }))
    }

    fn progress(&mut self, lease: &Lease, step: usize, total: usize) -> Verdict {
        // Redis away: keep working, try again every few seconds
        if self.conn.is_none() {
            if Instant::now() < self.reconnect_at {
                return Verdict::GoOn;
            }
            self.reconnect_at = Instant::now() + Duration::from_secs(5);
            self.conn = connect(&self.cluster).ok();
        }
        let Some(c) = self.conn.as_mut() else {
            return Verdict::GoOn;
        };
        let said: redis::RedisResult<i64> = scripts::PROGRESS
            .key(KEYS.task(&lease.id))
            .key(KEYS.cancel(&lease.id))
            .arg(&self.name)
            .arg(step)
            .arg(total)
            .invoke(c);
        match said {
            Ok(0) => Verdict::Lost,
            Ok(2) => Verdict::CancelAsked,
            Ok(_) => Verdict::GoOn,
            Err(_) => {
                self.conn = None;
                Verdict::GoOn
            }
        }
    }

    /// Writes the outcome if the task is still this attempt's: the video's bytes go into
    /// Redis with it (`--output-store redis`); nothing is written if the task ended otherwise
    /// first.
    fn finish(
        &mut self,
        lease: &Lease,
        outcome: &Outcome,
        video: &Path,
    ) -> Result<bool, EngineError> {
        let mut outcome = outcome.clone();
        let bytes = match (&outcome, self.cluster.outputs_on_disk()) {
            (Outcome::Completed { .. }, false) => match std::fs::read(video) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::error!(id = %lease.id, "cannot read the output back: {e}");
                    outcome = Outcome::Failed(
                        TaskCode::Internal,
                        "internal error: the output could not be stored".into(),
                    );
                    None
                }
            },
            _ => None,
        };
        let file = video
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tried = (|| -> redis::RedisResult<Option<JobRecord>> {
            let h: TaskHash = self.conn()?.hgetall(KEYS.task(&lease.id))?;
            let Some(mut r) = record_of(&h) else {
                return Ok(None);
            };
            if r.status != Status::Processing {
                return Ok(None);
            }
            r.end(outcome.clone());
            let end = End {
                expected: Status::Processing,
                record: &r,
                ttl_ms: self.cluster.retention_ms,
                output: bytes.as_deref().map(|b| (file.as_str(), b)),
                entry: Some(&lease.handle),
                delete_outputs: false,
            };
            let got: String = end.invocation().invoke(self.conn()?)?;
            Ok((got == "ok").then_some(r))
        })();
        let won = match tried {
            Ok(Some(r)) => {
                self.cluster.hook.committed(&r);
                true
            }
            Ok(None) => {
                let taken = Taken {
                    model: lease.model.clone(),
                    priority: lease.priority,
                    entry: lease.handle.clone(),
                    id: lease.id.clone(),
                };
                self.ack(&taken);
                false
            }
            Err(e) => {
                self.conn = None;
                return Err(e.into());
            }
        };
        self.set_current(None);
        Ok(won)
    }

    /// The entry stays pending: after the claim timeout another worker takes it over.
    fn abandon(&mut self, _lease: &Lease) {
        self.set_current(None);
    }
}
