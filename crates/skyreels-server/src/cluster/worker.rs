//! A worker of the Redis engine: a thread that owns one generator and takes tasks from its
//! models' streams through the consumer group, and a heartbeat thread beside it that announces
//! the worker and keeps its running task's stream entry fresh. A worker that dies stops the
//! heartbeat; after the claim timeout another worker's `XAUTOCLAIM` takes the entry and runs
//! the task again from scratch (attempt N+1; after [`MAX_ATTEMPTS`] the task fails with 5003).
//! A worker that finished while Redis was away keeps its result and writes it once Redis is
//! back; the first attempt to finish wins, a later one finds the task ended and drops its own.

use super::{
    decode_request, record_of, scripts, BadInput, Cluster, End, TaskHash, GROUP, KEYS, MAX_ATTEMPTS,
};
use crate::generator::{GenerationRequest, Generator, GeneratorLoader, ModelInfo};
use crate::job::{new_id, now_ms, JobRecord, Status, TaskCode};
use crate::store::{Outcome, Work};
use crate::AppState;
use redis::streams::{StreamAutoClaimReply, StreamReadReply};
use redis::Commands;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The task a worker runs, for its heartbeat.
#[derive(Clone)]
struct Running {
    id: String,
    model: String,
    entry: String,
}

/// A stream entry this worker was given.
struct Taken {
    model: String,
    entry: String,
    id: String,
}

/// Starts Redis worker `index` (a thread; the heartbeat runs on another).
pub(crate) fn spawn(
    state: Arc<AppState>,
    cluster: Arc<Cluster>,
    loader: GeneratorLoader,
    loaded: tokio::sync::oneshot::Sender<Result<(), String>>,
    index: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let st = state.clone();
    crate::worker::spawn_thread(state, loader, loaded, index, move |mut generator| {
        let name = format!(
            "{}-{}-{index}-{}",
            hostname(),
            std::process::id(),
            &new_id()[..6]
        );
        let mut w = Worker {
            cluster: cluster.clone(),
            models: generator.models(),
            name,
            conn: None,
            current: Arc::default(),
        };
        tracing::info!(worker = %w.name, "worker ready (redis)");
        let stop = Arc::new(AtomicBool::new(false));
        let beat = heartbeat(&w, stop.clone());
        let mut backoff = Backoff::default();
        while !cluster.is_draining() {
            match w.next() {
                Ok(Some(t)) => {
                    backoff.reset();
                    w.handle(&st, &mut *generator, t);
                }
                Ok(None) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(worker = %w.name, "redis: {e}; reconnecting");
                    w.conn = None;
                    backoff.sleep();
                }
            }
        }
        stop.store(true, Ordering::SeqCst);
        if let Some(b) = beat {
            let _ = b.join();
        }
    })
}

/// Exponential backoff from 100 ms to 5 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn reset(&mut self) {
        self.0 = 0;
    }
    fn sleep(&mut self) {
        std::thread::sleep(Duration::from_millis(100 << self.0.min(5)).min(Duration::from_secs(5)));
        self.0 += 1;
    }
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
fn heartbeat(w: &Worker, stop: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
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
                            .key(KEYS.queue(&r.model))
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

struct Worker {
    cluster: Arc<Cluster>,
    models: Vec<ModelInfo>,
    /// This worker's consumer name in the group.
    name: String,
    conn: Option<redis::Connection>,
    current: Arc<Mutex<Option<Running>>>,
}

impl Worker {
    /// The connection, (re)connecting: each new connection makes sure the streams and the
    /// group exist and announces the models.
    fn conn(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.conn.is_none() {
            let mut c = connect(&self.cluster)?;
            for m in &self.models {
                let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(KEYS.queue(&m.id))
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query(&mut c);
                if let Err(e) = created {
                    if e.code() != Some("BUSYGROUP") {
                        return Err(e);
                    }
                }
                let info = serde_json::to_string(m).expect("model info serializes");
                let _: () = c.hset(KEYS.models(), &m.id, info)?;
            }
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// A task of a dead worker (idle past the claim timeout), else a new one (waiting up to a
    /// second); `None` when there is none.
    fn next(&mut self) -> redis::RedisResult<Option<Taken>> {
        let claim_ms = self.cluster.config.claim_timeout.as_millis() as u64;
        let (name, models) = (self.name.clone(), self.models.clone());
        let c = self.conn()?;
        for m in &models {
            let r: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(KEYS.queue(&m.id))
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
                    model: m.id.clone(),
                    entry: e.id.clone(),
                    id: e.get("id").unwrap_or_default(),
                }));
            }
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&name)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS");
        for m in &models {
            cmd.arg(KEYS.queue(&m.id));
        }
        for _ in &models {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = cmd.query(c)?;
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            let model = models
                .iter()
                .find(|m| KEYS.queue(&m.id) == k.key)
                .map(|m| m.id.clone())
                .unwrap_or_default();
            if let Some(e) = k.ids.first() {
                return Ok(Some(Taken {
                    model,
                    entry: e.id.clone(),
                    id: e.get("id").unwrap_or_default(),
                }));
            }
        }
        Ok(None)
    }

    /// Starts, runs and ends one task (or just acknowledges an entry with nothing to do).
    fn handle(&mut self, state: &AppState, generator: &mut dyn Generator, t: Taken) {
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
        let (verdict, attempt) = match started {
            Ok(v) => v,
            Err(e) => {
                // the entry stays pending: taken over after the claim timeout
                tracing::warn!(id = %t.id, "cannot start the task: {e}");
                self.conn = None;
                return;
            }
        };
        match verdict.as_str() {
            "run" => self.run(state, generator, &t, attempt),
            "exhausted" => {
                let outcome = Outcome::Failed(
                    TaskCode::Unavailable,
                    format!(
                        "the task was started {attempt} times and its worker stopped each time \
                         (a crash, a lost machine or a shutdown); submit it again"
                    ),
                );
                self.end(&t, outcome, None);
            }
            _ => {
                let _: redis::RedisResult<()> = self.conn().and_then(|c| {
                    redis::pipe()
                        .xack(KEYS.queue(&t.model), GROUP, &[&t.entry])
                        .xdel(KEYS.queue(&t.model), &[&t.entry])
                        .query(c)
                });
            }
        }
    }

    /// The task's request as queued, decoded and checked again against this worker's model
    /// and limits (whoever can write to Redis can queue anything).
    fn input(&mut self, id: &str, max_work: f64) -> Result<GenerationRequest, Outcome> {
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
        let image = h.get("image").map_or(&[][..], Vec::as_slice);
        let request = decode_request(json, image).map_err(|e| match e {
            BadInput::Corrupt(e) => internal(e),
            BadInput::Image(e) => Outcome::Failed(TaskCode::MediaAccessFailed, e),
        })?;
        let model = self
            .models
            .iter()
            .find(|m| m.id == request.model)
            .ok_or_else(|| {
                internal(format!(
                    "a task for {} on a worker of another model",
                    request.model
                ))
            })?;
        request.check(model, max_work).map_err(|e| {
            tracing::warn!(%id, "refused a queued task that breaks the API's rules: {e}");
            Outcome::Failed(
                TaskCode::InvalidParameter,
                format!("the queued task breaks this server's rules ({e}); it was not run"),
            )
        })?;
        Ok(request)
    }

    fn run(&mut self, state: &AppState, generator: &mut dyn Generator, t: &Taken, attempt: u32) {
        let request = match self.input(&t.id, state.config.max_work) {
            Ok(r) => r,
            Err(outcome) => {
                self.end(t, outcome, None);
                return;
            }
        };
        let base64 = self
            .record(&t.id)
            .is_some_and(|r| r.base64_output && self.cluster.outputs_on_disk());
        let cancel = Arc::new(AtomicBool::new(false));
        self.cluster
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.id.clone(), cancel.clone());
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Running {
            id: t.id.clone(),
            model: t.model.clone(),
            entry: t.entry.clone(),
        });
        tracing::info!(id = %t.id, attempt, worker = %self.name, "task started");
        // each attempt its own file: a worker that lost the task never touches the winner's
        let file = match attempt {
            1 => format!("{}.mp4", t.id),
            n => format!("{}-{n}.mp4", t.id),
        };
        let work = Work {
            id: t.id.clone(),
            file: file.clone(),
            request,
            cancel: cancel.clone(),
            base64,
        };
        let (mut asked, mut lost) = (false, false);
        let name = self.name.clone();
        let mut conn = self.conn.take();
        let mut reconnect_at = std::time::Instant::now();
        let cluster = self.cluster.clone();
        let outcome = crate::worker::run(state, generator, &work, &mut |done, total| {
            // Redis away: keep working, try again every few seconds
            if conn.is_none() && std::time::Instant::now() >= reconnect_at {
                conn = connect(&cluster).ok();
                reconnect_at = std::time::Instant::now() + Duration::from_secs(5);
            }
            let Some(c) = conn.as_mut() else {
                return;
            };
            let said: redis::RedisResult<i64> = scripts::PROGRESS
                .key(KEYS.task(&t.id))
                .key(KEYS.cancel(&t.id))
                .arg(&name)
                .arg(done)
                .arg(total)
                .invoke(c);
            match said {
                Ok(0) => {
                    lost = true;
                    cancel.store(true, Ordering::SeqCst);
                }
                Ok(2) => {
                    asked = true;
                    cancel.store(true, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => conn = None,
            }
        });
        self.conn = conn;
        self.cluster
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&t.id);
        let paths = self.cluster.paths().clone();
        let path = paths.video_path(&file);
        let drop_files = || {
            let _ = std::fs::remove_file(paths.video_path(&file));
            let _ = std::fs::remove_file(paths.base64_path(&file));
        };
        let stopped_here = cancel.load(Ordering::SeqCst) && !asked;
        if lost || stopped_here {
            // another worker owns the task now, or this node shuts down: no outcome from here
            tracing::warn!(id = %t.id, "task left to another worker");
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
            drop_files();
            return;
        }
        let bytes = match (&outcome, self.cluster.outputs_on_disk()) {
            (Outcome::Completed { .. }, false) => match std::fs::read(&path) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::error!(id = %t.id, "cannot read the output back: {e}");
                    drop_files();
                    let outcome = Outcome::Failed(
                        TaskCode::Internal,
                        "internal error: the output could not be stored".into(),
                    );
                    self.end(t, outcome, None);
                    return;
                }
            },
            _ => None,
        };
        let won = self.end(t, outcome, bytes.as_deref().map(|b| (file.as_str(), b)));
        // the bytes are in Redis now, or another attempt's files are the task's
        if bytes.is_some() || !won {
            drop_files();
        }
    }

    fn record(&mut self, id: &str) -> Option<JobRecord> {
        let h: TaskHash = self.conn().and_then(|c| c.hgetall(KEYS.task(id))).ok()?;
        record_of(&h)
    }

    /// Writes the outcome of a started task, retrying while Redis is away (the result is kept
    /// meanwhile); nothing is written if the task ended otherwise first. Whether it was written.
    fn end(&mut self, t: &Taken, outcome: Outcome, output: Option<(&str, &[u8])>) -> bool {
        let mut backoff = Backoff::default();
        let ttl_ms = self.cluster.retention_ms();
        let won = loop {
            let tried = (|| -> redis::RedisResult<Option<JobRecord>> {
                let h: TaskHash = self.conn()?.hgetall(KEYS.task(&t.id))?;
                let Some(mut r) = record_of(&h) else {
                    return Ok(None);
                };
                if r.status != Status::Processing {
                    return Ok(None);
                }
                outcome.clone().apply(&mut r);
                let end = End {
                    expected: Status::Processing,
                    record: &r,
                    ttl_ms,
                    output,
                    entry: Some(&t.entry),
                    delete_outputs: false,
                };
                let got: String = end.invocation().invoke(self.conn()?)?;
                Ok((got == "ok").then_some(r))
            })();
            match tried {
                Ok(Some(r)) => {
                    self.cluster.metrics.finished(r.status.as_str());
                    let _ = self.cluster.finished.send(r);
                    break true;
                }
                Ok(None) => {
                    tracing::info!(id = %t.id, "the task had already ended; this result is dropped");
                    let _: redis::RedisResult<()> = self.conn().and_then(|c| {
                        redis::pipe()
                            .xack(KEYS.queue(&t.model), GROUP, &[&t.entry])
                            .xdel(KEYS.queue(&t.model), &[&t.entry])
                            .query(c)
                    });
                    break false;
                }
                Err(e) => {
                    tracing::warn!(id = %t.id, "cannot store the outcome yet ({e}); keeping it and retrying");
                    self.conn = None;
                    backoff.sleep();
                }
            }
        };
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        won
    }
}
