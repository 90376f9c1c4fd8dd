//! The Redis job engine of a scale-out deployment: API nodes and GPU workers on many machines
//! share task records, the queue, uploads, cancel requests, progress and outputs through one
//! Redis 7. No cluster protocol of ours: a stream per model consumed by one consumer group is
//! the queue (`XREADGROUP`, and `XAUTOCLAIM` for the tasks of workers that died), each state
//! change is a Lua script (compare and set on the status), retention is key TTLs.
//!
//! Keys (prefix `skyreels:`): `task:{id}` (hash: the record JSON and the fields that change
//! while it runs: status, step, total, attempts, worker, started_at), `input:{id}` (the
//! prepared request and image), `queue:{model}` (stream), `waiting` (sorted set of the tasks
//! not started, in admission order: the cluster-wide bound and queue positions), `seq`,
//! `cancel:{id}`, `output:{file}`, `upload:{id}`, `ticket:{sha256}` (and `tickets`, the open
//! ones with their expiry: the cluster-wide bound), `hook:{id}:{status}`
//! (the webhook once-guard), `models` (hash: model id -> model info), `workers` (sorted set:
//! worker -> last heartbeat ms), `worker_models` (hash: worker -> its model ids), `secret`.

mod blobs;
mod scripts;
mod sweep;
pub(crate) mod worker;

pub use blobs::{CONCURRENT_WINDOWS, WINDOW};

use crate::generator::{GenerationRequest, ModelInfo};
use crate::job::{now_ms, JobRecord, Status, TaskCode};
use crate::jobs::UploadRefused;
use crate::jobs::{Overview, Unavailable};
use crate::store::{
    new_ticket, AdmitError, CancelResult, Paths, Upload, MAX_OPEN_TICKETS,
    MAX_OPEN_TICKETS_PER_KEY, TICKET_TTL,
};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The owner an upload's quota and tickets count against (`anonymous` without keys).
fn owner_of(u: &Upload) -> &str {
    if u.owner.is_empty() {
        "anonymous"
    } else {
        &u.owner
    }
}

/// The consumer group every worker reads the queues through.
pub const GROUP: &str = "workers";
/// A task whose worker stopped this many times fails with 5003.
pub const MAX_ATTEMPTS: u32 = 3;

/// Where finished videos live in Redis mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStore {
    /// MP4 bytes in Redis (with the retention as their TTL).
    Redis,
    /// Files under `--output-dir`, a filesystem every node shares.
    Dir,
}

/// How a node reaches the shared engine.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `redis://[USER:PASSWORD@]HOST:PORT/DB`, or `rediss://` for TLS.
    pub url: String,
    /// A running task whose worker sent no heartbeat for this long is taken over.
    pub claim_timeout: Duration,
    pub output_store: OutputStore,
    /// Bytes of uploads Redis keeps, per API key and in all.
    pub quotas: Quotas,
    /// A task not started this long after it was accepted fails (5003).
    pub queue_ttl: Duration,
    /// A model no live worker has served for this long is forgotten: submits naming it are
    /// refused (404) instead of waiting for a worker that will not come.
    pub forget_models_after: Duration,
    /// PEM of the authority that signed a `rediss://` server's certificate (else the system's).
    pub ca_cert: Option<std::path::PathBuf>,
    /// Accept a URL without a password on an address other than loopback.
    pub allow_no_password: bool,
}

impl ClusterConfig {
    /// The defaults: 30 s claim timeout, videos in Redis, [`Quotas::default`], tasks waiting
    /// at most 6 hours, models forgotten an hour after their last worker.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            claim_timeout: Duration::from_secs(30),
            output_store: OutputStore::Redis,
            quotas: Quotas::default(),
            queue_ttl: Duration::from_secs(6 * 3600),
            forget_models_after: Duration::from_secs(3600),
            ca_cert: None,
            allow_no_password: false,
        }
    }
}

/// Upload bytes kept in Redis (where they live in RAM until the retention ends).
#[derive(Clone, Copy, Debug)]
pub struct Quotas {
    /// Per API key (all clients together when no key is configured).
    pub uploads_per_key: u64,
    /// Over every key.
    pub uploads_total: u64,
}

impl Default for Quotas {
    /// 256 MiB per key, 2 GiB in all.
    fn default() -> Self {
        Self {
            uploads_per_key: 256 << 20,
            uploads_total: 2 << 30,
        }
    }
}

/// The key names.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: &'static str,
}

impl Keys {
    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }
    pub fn task(&self, id: &str) -> String {
        self.key("task", id)
    }
    pub fn input(&self, id: &str) -> String {
        self.key("input", id)
    }
    pub fn cancel(&self, id: &str) -> String {
        self.key("cancel", id)
    }
    pub fn output(&self, file: &str) -> String {
        self.key("output", file)
    }
    pub fn queue(&self, model: &str) -> String {
        self.key("queue", model)
    }
    fn upload(&self, id: &str) -> String {
        self.key("upload", id)
    }
    /// An upload's bytes (a string, so they can be read in windows).
    fn upload_data(&self, id: &str) -> String {
        self.key("upload_data", id)
    }
    fn ticket(&self, digest: &str) -> String {
        self.key("ticket", digest)
    }
    fn hook(&self, id: &str, status: Status) -> String {
        self.key("hook", &format!("{id}:{}", status.as_str()))
    }
    pub fn waiting(&self) -> String {
        format!("{}waiting", self.prefix)
    }
    fn seq(&self) -> String {
        format!("{}seq", self.prefix)
    }
    pub fn models(&self) -> String {
        format!("{}models", self.prefix)
    }
    pub fn workers(&self) -> String {
        format!("{}workers", self.prefix)
    }
    pub fn worker_models(&self) -> String {
        format!("{}worker_models", self.prefix)
    }
    fn tickets(&self) -> String {
        format!("{}tickets", self.prefix)
    }
    /// Open tickets of one API key (sorted set: digest -> expiry ms).
    fn key_tickets(&self, owner: &str) -> String {
        self.key("tickets", owner)
    }
    /// Upload bytes kept per API key (hash: key -> bytes; `*`: all keys).
    fn upload_usage(&self) -> String {
        format!("{}upload_usage", self.prefix)
    }
    /// When kept uploads expire (sorted set: `key|id|bytes` -> expiry ms).
    fn upload_expiry(&self) -> String {
        format!("{}upload_expiry", self.prefix)
    }
    /// When each model last had a live worker (hash: model id -> ms).
    pub fn models_seen(&self) -> String {
        format!("{}models_seen", self.prefix)
    }
    fn secret(&self) -> String {
        format!("{}secret", self.prefix)
    }
}

pub(crate) const KEYS: Keys = Keys {
    prefix: "skyreels:",
};

/// A task's request as it waits in Redis (its image, as it came, beside it).
#[derive(Serialize, Deserialize)]
struct QueuedRequest {
    model: String,
    prompt: String,
    negative_prompt: Option<String>,
    /// Whether the task has an image (its encoded bytes are the input's `image` field).
    image: bool,
    height: usize,
    width: usize,
    num_frames: usize,
    steps: usize,
    guidance_scale: f64,
    embedded_guidance_scale: f64,
    seed: u64,
    fps: f64,
    cache: String,
    #[serde(default)]
    flow_shift: Option<f64>,
}

/// The request as JSON (its image, if any, travels as the source bytes beside it).
pub(crate) fn encode_request(r: &GenerationRequest, has_image: bool) -> Vec<u8> {
    let q = QueuedRequest {
        model: r.model.clone(),
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone(),
        image: has_image,
        height: r.height,
        width: r.width,
        num_frames: r.num_frames,
        steps: r.steps,
        guidance_scale: r.guidance_scale,
        embedded_guidance_scale: r.embedded_guidance_scale,
        seed: r.seed,
        fps: r.fps,
        cache: r.cache.to_string(),
        flow_shift: r.flow_shift,
    };
    serde_json::to_vec(&q).expect("plain fields serialize")
}

/// Why a queued request cannot run.
#[derive(Debug, PartialEq)]
pub(crate) enum BadInput {
    /// The stored input is not one this server wrote (5000).
    Corrupt(String),
    /// Its image does not decode (1402).
    Image(String),
}

/// The request from its JSON and its image's bytes, the image decoded (with the API's limits)
/// and fitted to the task's size as the API node would have.
pub(crate) fn decode_request(json: &[u8], source: &[u8]) -> Result<GenerationRequest, BadInput> {
    let q: QueuedRequest = serde_json::from_slice(json)
        .map_err(|e| BadInput::Corrupt(format!("the queued request: {e}")))?;
    let image = match q.image {
        true => {
            let img = crate::media::decode(source).map_err(|e| BadInput::Image(e.to_string()))?;
            Some(skyreels_params::fit_image(&img, q.width, q.height))
        }
        false => None,
    };
    Ok(GenerationRequest {
        model: q.model,
        prompt: q.prompt,
        negative_prompt: q.negative_prompt,
        image,
        height: q.height,
        width: q.width,
        num_frames: q.num_frames,
        steps: q.steps,
        guidance_scale: q.guidance_scale,
        embedded_guidance_scale: q.embedded_guidance_scale,
        seed: q.seed,
        fps: q.fps,
        cache: q.cache.parse().map_err(BadInput::Corrupt)?,
        flow_shift: q.flow_shift,
    })
}

/// A large value a node serves from Redis.
#[derive(Clone, Copy, Debug)]
pub enum Blob<'a> {
    /// A completed upload's bytes, by upload id.
    Upload(&'a str),
    /// A finished video, by file name.
    Output(&'a str),
}

impl Blob<'_> {
    fn key(self) -> String {
        match self {
            Blob::Upload(id) => KEYS.upload_data(id),
            Blob::Output(file) => KEYS.output(file),
        }
    }
}

/// A task's hash as stored.
pub(crate) type TaskHash = HashMap<String, Vec<u8>>;

fn parse_status(s: &str) -> Option<Status> {
    Status::ALL.into_iter().find(|st| st.as_str() == s)
}

/// The record of a task's hash: the stored record with the fields that change while it runs.
pub(crate) fn record_of(h: &TaskHash) -> Option<JobRecord> {
    let mut r: JobRecord = serde_json::from_slice(h.get("record")?).ok()?;
    let text = |k: &str| h.get(k).and_then(|v| std::str::from_utf8(v).ok());
    let num = |k: &str| text(k).and_then(|v| v.parse::<u64>().ok());
    if let Some(s) = text("status").and_then(parse_status) {
        r.status = s;
    }
    if let Some(a) = num("attempts") {
        r.attempts = a as u32;
    }
    // a finished task's stored record holds its final values
    if !r.status.is_finished() {
        r.step = num("step").unwrap_or_default() as usize;
        r.total_steps = num("total").map_or(r.total_steps, |t| t as usize);
        r.started_at = num("started_at").or(r.started_at);
    }
    Some(r)
}

/// One invocation of [`scripts::END`]: the change of a task from `expected` to `record`'s
/// status.
pub(crate) struct End<'a> {
    pub expected: Status,
    pub record: &'a JobRecord,
    /// Retention as a TTL (terminal states; 0 keeps it).
    pub ttl_ms: u64,
    /// The output file the change stores (with its bytes) or deletes.
    pub output: Option<(&'a str, &'a [u8])>,
    /// The stream entry to acknowledge and delete.
    pub entry: Option<&'a str>,
    pub delete_outputs: bool,
}

impl End<'_> {
    pub fn invocation(&self) -> redis::ScriptInvocation<'static> {
        let r = self.record;
        let json = serde_json::to_vec(r).expect("records serialize");
        let out_key = KEYS.output(self.output.map_or("", |o| o.0));
        let bytes = if self.delete_outputs {
            &[][..]
        } else {
            self.output.map_or(&[][..], |o| o.1)
        };
        let mut inv = scripts::END.prepare_invoke();
        inv.key(KEYS.task(&r.id))
            .key(KEYS.waiting())
            .key(KEYS.input(&r.id))
            .key(out_key)
            .key(KEYS.queue(&r.model))
            .arg(self.expected.as_str())
            .arg(r.status.as_str())
            .arg(json)
            .arg(&r.id)
            .arg(self.ttl_ms)
            .arg(bytes)
            .arg(GROUP)
            .arg(self.entry.unwrap_or(""))
            .arg(if self.delete_outputs { "1" } else { "0" });
        inv
    }
}

/// Messages of Redis failures for clients (no address, no credentials).
pub(crate) fn down(e: redis::RedisError) -> Unavailable {
    if is_oom(&e) {
        tracing::error!("redis is full (maxmemory reached): {e}");
        return Unavailable(
            "the job store (Redis) is full: it reached its memory limit; retry later (operators: \
             see docs/scale-out.md, sizing Redis)"
                .into(),
        );
    }
    tracing::warn!("redis: {e}");
    Unavailable("the job store (Redis) is unreachable; retry shortly".into())
}

/// Redis refused a write because it reached `maxmemory` (`OOM command not allowed ...`).
pub(crate) fn is_oom(e: &redis::RedisError) -> bool {
    e.code() == Some("OOM") || e.to_string().contains("OOM command not allowed")
}

/// The longest a node waits for one Redis command (a hung Redis answers nothing: the client
/// gets its 503 after this, not after a TCP timeout).
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(2500);

/// The node's connection: a connection manager whose command is sent once more, after a short
/// pause, when the connection turned out to be broken (Redis restarted: the manager reconnects
/// on that error, so the second try normally goes through instead of failing a client). Every
/// script is safe to run twice (each checks the state it changes). A command that got no
/// answer within [`COMMAND_TIMEOUT`] is not sent again (Redis hangs: the client hears so
/// at once).
#[derive(Clone)]
pub(crate) struct Conn(ConnectionManager);

impl Conn {
    fn retry(e: &redis::RedisError) -> bool {
        (e.is_connection_dropped() || e.is_io_error()) && !e.is_timeout()
    }

    async fn timed<T>(
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "redis did not answer in time",
            )
            .into()),
        }
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            match Self::timed(self.0.req_packed_command(cmd)).await {
                Err(e) if Self::retry(&e) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Self::timed(self.0.req_packed_command(cmd)).await
                }
                r => r,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            match Self::timed(self.0.req_packed_commands(pipeline, offset, count)).await {
                Err(e) if Self::retry(&e) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Self::timed(self.0.req_packed_commands(pipeline, offset, count)).await
                }
                r => r,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

/// This node's view of the shared engine.
pub struct Cluster {
    pub config: ClusterConfig,
    pub(crate) client: redis::Client,
    conn: Conn,
    /// Uploads and videos are read on their own connection, in bounded windows.
    blobs: blobs::Blobs,
    paths: Paths,
    max_queue: usize,
    retention_ms: u64,
    draining: AtomicBool,
    /// Stop flags of the tasks this node's workers run (shutdown past its grace).
    pub(crate) running: Mutex<HashMap<String, Arc<AtomicBool>>>,
    pub(crate) finished: tokio::sync::mpsc::UnboundedSender<JobRecord>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

impl Cluster {
    /// Opens a connection manager (lazy: it connects on first use and reconnects with backoff)
    /// and the local scratch folders. Finished tasks this node ended are sent on the returned
    /// channel (webhooks).
    pub fn open(
        config: ClusterConfig,
        paths: Paths,
        max_queue: usize,
        retention: Option<Duration>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<(Self, tokio::sync::mpsc::UnboundedReceiver<JobRecord>), String> {
        let client = client(&config)?;
        let manager = || {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(COMMAND_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            ConnectionManager::new_lazy_with_config(client.clone(), config)
                .map(Conn)
                .map_err(|e| format!("redis: {e}"))
        };
        let (conn, blobs) = (manager()?, blobs::Blobs::new(manager()?));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Ok((
            Self {
                config,
                client,
                conn,
                blobs,
                paths,
                max_queue,
                retention_ms: retention.map_or(0, |r| r.as_millis() as u64),
                draining: AtomicBool::new(false),
                running: Mutex::default(),
                finished: tx,
                metrics,
            },
            rx,
        ))
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    pub fn outputs_on_disk(&self) -> bool {
        self.config.output_store == OutputStore::Dir
    }

    pub(crate) fn retention_ms(&self) -> u64 {
        self.retention_ms
    }

    /// The cluster's webhook secret: a configured one (`--webhook-secret`, `configured`) is
    /// stored as the cluster's; otherwise the first node's generated one is kept in Redis and
    /// used by every node. Retries with backoff for up to a minute while Redis is unreachable.
    pub async fn shared_secret(&self, mine: String, configured: bool) -> Result<String, String> {
        let mut wait = Duration::from_millis(200);
        let start = std::time::Instant::now();
        loop {
            match self.sync_secret(&mine, configured).await {
                Ok(s) => return Ok(s),
                Err(e) if start.elapsed() < Duration::from_secs(60) => {
                    tracing::warn!("redis is not reachable yet ({e}); retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(format!("redis is not reachable: {e}")),
            }
        }
    }

    /// One round of [`Cluster::shared_secret`]: `mine` is stored where Redis has no secret
    /// (it lost its data) or, `force`, always; the cluster's secret is returned.
    pub async fn sync_secret(&self, mine: &str, force: bool) -> redis::RedisResult<String> {
        let mut c = self.conn();
        if force {
            let before: Option<String> = redis::cmd("SET")
                .arg(KEYS.secret())
                .arg(mine)
                .arg("GET")
                .query_async(&mut c)
                .await?;
            if before.is_some_and(|b| b != mine) {
                tracing::warn!(
                    "another node stored a different webhook secret: give every node the same \
                     --webhook-secret"
                );
            }
            return Ok(mine.to_string());
        }
        let _: () = redis::cmd("SET")
            .arg(KEYS.secret())
            .arg(mine)
            .arg("NX")
            .query_async(&mut c)
            .await?;
        c.get(KEYS.secret()).await
    }

    /// What is wrong with Redis' memory policy, if anything: any policy but `noeviction` lets
    /// a full Redis silently drop task records, queue entries, uploads and outputs (with
    /// `noeviction` it refuses writes instead, which clients see as a 503 saying Redis is full).
    pub async fn memory_policy_problem(&self) -> Option<String> {
        let got: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut self.conn())
            .await;
        match got.as_deref() {
            Ok([_, policy]) if policy == "noeviction" => None,
            Ok([_, policy]) => Some(format!(
                "redis' maxmemory-policy is {policy}: when it fills up it evicts keys, and tasks, \
                 queue entries or outputs vanish; set maxmemory-policy noeviction (docs/scale-out.md)"
            )),
            Ok(_) | Err(_) => Some(
                "cannot read redis' maxmemory-policy (CONFIG GET refused?): make sure it is \
                 noeviction (docs/scale-out.md)"
                    .into(),
            ),
        }
    }

    /// How long an unstarted task's record and input are kept at most: the queue TTL plus
    /// the sweep's slack (the sweep fails it at the queue TTL; this is for a cluster where no
    /// API node runs to sweep).
    fn queue_backstop_ms(&self) -> u64 {
        (self.config.queue_ttl + Duration::from_secs(600)).as_millis() as u64
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Stops this node's running tasks without an outcome: another worker takes them over.
    pub fn stop_running(&self) {
        for flag in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// Every model a worker ever announced.
    pub async fn known_models(&self) -> Result<Vec<ModelInfo>, Unavailable> {
        let all: HashMap<String, String> =
            self.conn().hgetall(KEYS.models()).await.map_err(down)?;
        let mut models: Vec<ModelInfo> = all
            .values()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        models.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(models)
    }

    /// Live workers per model (a heartbeat within the claim timeout).
    pub async fn live_workers(&self) -> Result<HashMap<String, usize>, Unavailable> {
        let mut c = self.conn();
        let since = now_ms().saturating_sub(self.config.claim_timeout.as_millis() as u64);
        let names: Vec<String> = c
            .zrangebyscore(KEYS.workers(), since, "+inf")
            .await
            .map_err(down)?;
        let mut per = HashMap::new();
        if names.is_empty() {
            return Ok(per);
        }
        let lists: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(KEYS.worker_models())
            .arg(&names)
            .query_async(&mut c)
            .await
            .map_err(down)?;
        for list in lists.into_iter().flatten() {
            for m in serde_json::from_str::<Vec<String>>(&list).unwrap_or_default() {
                *per.entry(m).or_default() += 1;
            }
        }
        Ok(per)
    }

    pub async fn admit(&self, record: JobRecord) -> Result<(), AdmitError> {
        if self.is_draining() {
            return Err(AdmitError::Draining);
        }
        let json = serde_json::to_vec(&record).expect("records serialize");
        let admitted: i64 = scripts::ADMIT
            .key(KEYS.waiting())
            .key(KEYS.task(&record.id))
            .key(KEYS.seq())
            .arg(self.max_queue)
            .arg(&record.id)
            .arg(json)
            .arg(record.total_steps)
            .arg(&record.model)
            .arg(self.queue_backstop_ms())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| AdmitError::Unavailable(down(e).0))?;
        if admitted == 1 {
            Ok(())
        } else {
            Err(AdmitError::QueueFull)
        }
    }

    pub async fn wait_finished(&self, id: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let status: redis::RedisResult<Option<String>> =
                self.conn().hget(KEYS.task(id), "status").await;
            match status {
                Ok(None) => return true,
                Ok(Some(s)) if parse_status(&s).is_some_and(Status::is_finished) => return true,
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
            )
            .await;
        }
    }

    /// Queues the prepared input, retried for a few minutes while Redis is away (the task stays
    /// created, and its client's polls get 503 meanwhile).
    pub async fn enqueue(&self, id: &str, request: GenerationRequest, source: Option<Vec<u8>>) {
        let json = encode_request(&request, source.is_some());
        let image = source.unwrap_or_default();
        let mut wait = Duration::from_millis(100);
        for _ in 0..40 {
            let r: redis::RedisResult<i64> = scripts::ENQUEUE
                .key(KEYS.task(id))
                .key(KEYS.input(id))
                .key(KEYS.queue(&request.model))
                .arg(id)
                .arg(&json)
                .arg(&image)
                .arg(self.queue_backstop_ms())
                .invoke_async(&mut self.conn())
                .await;
            match r {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(%id, "cannot queue the task yet: {e}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::error!(%id, "gave up queueing the task: Redis stayed unreachable");
    }

    /// Moves a task from `expected` to what `change` makes of it; the ended record when this
    /// node won the change (told to the finished channel if terminal).
    async fn transition(
        &self,
        id: &str,
        expected: impl Fn(Status) -> bool,
        change: impl Fn(&mut JobRecord),
        delete_outputs: bool,
    ) -> Result<Option<JobRecord>, Unavailable> {
        // a compare and set: retried when another node changed the task in between
        for _ in 0..8 {
            let Some(mut r) = self.get(id).await?.map(|(r, _)| r) else {
                return Ok(None);
            };
            let from = r.status;
            if !expected(from) {
                return Ok(None);
            }
            let file = r.outputs.first().cloned();
            change(&mut r);
            let ttl_ms = if delete_outputs { 0 } else { self.retention_ms };
            let end = End {
                expected: from,
                record: &r,
                ttl_ms,
                output: file
                    .as_deref()
                    .filter(|_| delete_outputs)
                    .map(|f| (f, &[][..])),
                entry: None,
                delete_outputs,
            };
            let got: String = end
                .invocation()
                .invoke_async(&mut self.conn())
                .await
                .map_err(down)?;
            if got == "ok" {
                if matches!(
                    r.status,
                    Status::Completed | Status::Failed | Status::Cancelled
                ) {
                    self.metrics.finished(r.status.as_str());
                    let _ = self.finished.send(r.clone());
                }
                return Ok(Some(r));
            }
        }
        Err(Unavailable("the task keeps changing; retry".into()))
    }

    pub async fn fail_unstarted(&self, id: &str, code: TaskCode, error: String) {
        let r = self
            .transition(
                id,
                |s| s == Status::Created,
                |r| {
                    let _ = r.fail(code, error.clone());
                },
                false,
            )
            .await;
        if let Err(e) = r {
            tracing::error!(%id, "cannot fail the task: {e}");
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<(JobRecord, Option<usize>)>, Unavailable> {
        let (h, rank): (TaskHash, Option<usize>) = redis::pipe()
            .hgetall(KEYS.task(id))
            .zrank(KEYS.waiting(), id)
            .query_async(&mut self.conn())
            .await
            .map_err(down)?;
        Ok(record_of(&h).map(|r| {
            let position = (r.status == Status::Created).then(|| rank.unwrap_or_default());
            (r, position)
        }))
    }

    pub async fn cancel_or_delete(&self, id: &str) -> Result<Option<CancelResult>, Unavailable> {
        for _ in 0..8 {
            let Some((r, _)) = self.get(id).await? else {
                return Ok(None);
            };
            match r.status {
                Status::Created => {
                    let done = self
                        .transition(
                            id,
                            |s| s == Status::Created,
                            |r| {
                                let _ = r.transition(Status::Cancelled);
                            },
                            false,
                        )
                        .await?;
                    if done.is_some() {
                        return Ok(Some(CancelResult::Dequeued));
                    }
                }
                Status::Processing => {
                    let ttl = self.retention_ms.max(24 * 3600 * 1000);
                    let _: () = self
                        .conn()
                        .pset_ex(KEYS.cancel(id), 1, ttl)
                        .await
                        .map_err(down)?;
                    return Ok(Some(CancelResult::Cancelling));
                }
                Status::Deleted => return Ok(Some(CancelResult::AlreadyDeleted)),
                Status::Completed | Status::Failed | Status::Cancelled => {
                    let outputs = r.outputs.clone();
                    let done = self
                        .transition(
                            id,
                            |s| s == r.status,
                            |r| {
                                let _ = r.transition(Status::Deleted);
                                r.outputs.clear();
                            },
                            true,
                        )
                        .await?;
                    if done.is_some() {
                        if self.outputs_on_disk() {
                            for f in &outputs {
                                let _ = tokio::fs::remove_file(self.paths.video_path(f)).await;
                                let _ = tokio::fs::remove_file(self.paths.base64_path(f)).await;
                            }
                        }
                        return Ok(Some(CancelResult::Deleted));
                    }
                }
            }
        }
        Err(Unavailable("the task keeps changing; retry".into()))
    }

    /// Waiting tasks per model and live workers per model.
    pub async fn overview(&self) -> Result<Overview, Unavailable> {
        let mut c = self.conn();
        let ids: Vec<String> = c.zrange(KEYS.waiting(), 0, -1).await.map_err(down)?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hget(KEYS.task(id), "model");
        }
        let models: Vec<Option<String>> = if ids.is_empty() {
            vec![]
        } else {
            pipe.query_async(&mut c).await.map_err(down)?
        };
        let mut waiting = std::collections::BTreeMap::<String, usize>::new();
        for m in self.known_models().await? {
            waiting.insert(m.id, 0);
        }
        for m in models.into_iter().flatten() {
            *waiting.entry(m).or_default() += 1;
        }
        let mut workers: Vec<(String, usize)> = self.live_workers().await?.into_iter().collect();
        workers.sort();
        Ok(Overview {
            jobs: vec![],
            waiting: waiting.into_iter().collect(),
            workers,
        })
    }

    fn ttl_or(&self, default: Duration) -> u64 {
        if self.retention_ms > 0 {
            self.retention_ms
        } else {
            default.as_millis() as u64
        }
    }

    pub async fn upload(&self, id: &str) -> Result<Option<Upload>, Unavailable> {
        let meta: Option<String> = self
            .conn()
            .hget(KEYS.upload(id), "meta")
            .await
            .map_err(down)?;
        Ok(meta
            .and_then(|m| serde_json::from_str::<Upload>(&m).ok())
            .filter(|u| u.complete))
    }

    /// A completed upload's bytes (read in windows).
    pub async fn upload_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, Unavailable> {
        self.blobs.read(&KEYS.upload_data(id)).await
    }

    /// The length of a large value; `None` when there is none.
    pub async fn blob_len(&self, blob: Blob<'_>) -> Result<Option<u64>, Unavailable> {
        self.blobs.len(&blob.key()).await
    }

    /// Bytes `first..=last` of a large value, streamed in windows.
    pub fn blob_stream(
        &self,
        blob: Blob<'_>,
        first: u64,
        last: u64,
    ) -> impl futures_util::Stream<Item = Result<bytes::Bytes, Unavailable>> + Send + 'static {
        self.blobs.stream(blob.key(), first, last)
    }

    /// Moves the checked bytes from the scratch file into Redis, with the record, if the
    /// uploader's and the cluster's upload quotas leave room for them.
    pub async fn complete_upload(&self, mut upload: Upload) -> Result<Upload, UploadRefused> {
        upload.complete = true;
        let path = self.paths.upload_data_path(&upload.id);
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| Unavailable(format!("cannot read the upload back: {e}")));
        let _ = tokio::fs::remove_file(&path).await;
        let bytes = bytes?;
        let now = now_ms();
        let expiry = if self.retention_ms > 0 {
            now + self.retention_ms
        } else {
            u64::MAX >> 11
        };
        let q = &self.config.quotas;
        let verdict: i64 = scripts::UPLOAD_QUOTA
            .key(KEYS.upload_usage())
            .key(KEYS.upload_expiry())
            .arg(now)
            .arg(owner_of(&upload))
            .arg(&upload.id)
            .arg(bytes.len())
            .arg(expiry)
            .arg(q.uploads_per_key)
            .arg(q.uploads_total)
            .invoke_async(&mut self.conn())
            .await
            .map_err(down)?;
        match verdict {
            1 => return Err(UploadRefused::KeyQuota(q.uploads_per_key)),
            2 => return Err(UploadRefused::ClusterQuota(q.uploads_total)),
            _ => {}
        }
        let meta = serde_json::to_string(&upload).expect("uploads serialize");
        let (key, data) = (KEYS.upload(&upload.id), KEYS.upload_data(&upload.id));
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(&key, "meta", meta)
            .ignore()
            .set(&data, bytes)
            .ignore();
        if self.retention_ms > 0 {
            pipe.pexpire(&key, self.retention_ms as i64)
                .ignore()
                .pexpire(&data, self.retention_ms as i64)
                .ignore();
        }
        let _: () = pipe.query_async(&mut self.conn()).await.map_err(down)?;
        Ok(upload)
    }

    pub async fn open_ticket(
        &self,
        filename: &str,
        content_type: &str,
        size: u64,
        base_url: &str,
        owner: &str,
    ) -> Result<(Upload, String), UploadRefused> {
        let (upload, token) = new_ticket(filename, content_type, size, base_url, owner);
        let meta = serde_json::to_string(&upload).expect("uploads serialize");
        let ttl = TICKET_TTL.as_millis() as u64;
        let (digest, now) = (token_digest(&token), now_ms());
        let opened: i64 = scripts::TICKET
            .key(KEYS.tickets())
            .key(KEYS.key_tickets(owner_of(&upload)))
            .key(KEYS.ticket(&digest))
            .arg(now)
            .arg(MAX_OPEN_TICKETS)
            .arg(now + ttl)
            .arg(&digest)
            .arg(meta)
            .arg(ttl)
            .arg(MAX_OPEN_TICKETS_PER_KEY)
            .invoke_async(&mut self.conn())
            .await
            .map_err(down)?;
        match opened {
            1 => Ok((upload, token)),
            2 => Err(UploadRefused::KeyTickets),
            _ => Err(UploadRefused::Tickets),
        }
    }

    pub async fn take_ticket(&self, token: &str) -> Result<Option<Upload>, Unavailable> {
        let digest = token_digest(token);
        let meta: Option<String> = scripts::TAKE_TICKET
            .key(KEYS.tickets())
            .key(KEYS.ticket(&digest))
            .arg(&digest)
            .arg(KEYS.key_tickets(""))
            .invoke_async(&mut self.conn())
            .await
            .map_err(down)?;
        Ok(meta
            .and_then(|m| serde_json::from_str::<Upload>(&m).ok())
            .filter(|u| !u.complete))
    }

    pub async fn output_base64(&self, file: &str) -> Option<String> {
        if self.outputs_on_disk() {
            return crate::jobs::read_base64(&self.paths, file).await;
        }
        let bytes = self.blobs.read(&KEYS.output(file)).await.ok()??;
        tokio::task::spawn_blocking(move || crate::worker::data_uri(&bytes))
            .await
            .ok()
    }

    /// `SET NX` on the task's webhook key for this state: only the first node to ask delivers.
    pub async fn claim_webhook(&self, record: &JobRecord) -> bool {
        let ttl = self.ttl_or(Duration::from_secs(7 * 24 * 3600));
        let got: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(KEYS.hook(&record.id, record.status))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .query_async(&mut self.conn())
            .await;
        match got {
            Ok(v) => v.is_some(),
            Err(e) => {
                // at most once: a guard that cannot be set is not delivered blind
                tracing::error!(id = %record.id, "webhook not sent: redis: {e}");
                false
            }
        }
    }
}

/// The key of a PUT token: its SHA-256 (the token itself is never stored).
fn token_digest(token: &str) -> String {
    crate::job::hex(&Sha256::digest(token.as_bytes()))
}

/// The client of `--redis`: refused without a password on a non-loopback address (unless
/// allowed), with the `--redis-ca` authority for `rediss://`.
fn client(config: &ClusterConfig) -> Result<redis::Client, String> {
    let shown = redacted(&config.url);
    let bad = |e: &dyn std::fmt::Display| format!("--redis {shown:?}: {e}");
    let url = url::Url::parse(&config.url).map_err(|e| bad(&e))?;
    let local = match url.host() {
        // redis: is not a special scheme to the URL parser: addresses come as names
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => true,
    };
    if !local && url.password().is_none() && !config.allow_no_password {
        return Err(format!(
            "--redis {shown:?} has no password and is not on this machine: anyone who reaches that \
             Redis could read every input and queue any task. Give it a password \
             (redis://:PASSWORD@HOST:PORT/DB, or an ACL user: docs/scale-out.md), or pass \
             --allow-redis-without-password on a network only these nodes reach"
        ));
    }
    match (&config.ca_cert, url.scheme()) {
        (Some(ca), "rediss") => {
            let root =
                std::fs::read(ca).map_err(|e| format!("--redis-ca {}: {e}", ca.display()))?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root),
            };
            redis::Client::build_with_tls(config.url.as_str(), certs).map_err(|e| bad(&e))
        }
        (Some(_), _) => Err(format!(
            "--redis-ca is for TLS: the URL must start with rediss://, got {shown:?}"
        )),
        (None, _) => redis::Client::open(config.url.as_str()).map_err(|e| bad(&e)),
    }
}

/// A Redis URL without its password, for messages.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_requests_carry_the_source_image_and_fit_it_again() {
        let img =
            image::RgbImage::from_fn(30, 20, |x, y| image::Rgb([x as u8 * 8, y as u8 * 12, 3]));
        let mut png = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let r = GenerationRequest {
            model: "wavespeed-ai/SkyReels-V1".into(),
            prompt: "a cat".into(),
            negative_prompt: Some("blur".into()),
            image: None,
            height: 32,
            width: 48,
            num_frames: 5,
            steps: 3,
            guidance_scale: 6.5,
            embedded_guidance_scale: 1.0,
            seed: 2_147_483_647,
            fps: 24.0,
            cache: skyreels_params::CacheSpec::TeaCache(0.1),
            flow_shift: Some(3.5),
        };
        let json = encode_request(&r, true);
        let back = decode_request(&json, &png).unwrap();
        // the worker's fit is the API node's: the same pixels as fitting on arrival
        assert_eq!(
            back.image.as_ref().unwrap(),
            &skyreels_params::fit_image(&img, 48, 32)
        );
        assert_eq!(
            (
                back.prompt.as_str(),
                back.seed,
                back.cache,
                back.guidance_scale,
                back.flow_shift
            ),
            ("a cat", r.seed, r.cache, 6.5, Some(3.5))
        );
        assert!(matches!(
            decode_request(&json, &png[..png.len() / 2]),
            Err(BadInput::Image(_))
        ));
        assert!(matches!(
            decode_request(b"{", &png),
            Err(BadInput::Corrupt(_))
        ));
        let text = encode_request(&r, false);
        assert!(decode_request(&text, &[]).unwrap().image.is_none());
    }

    #[test]
    fn records_merge_the_running_fields_until_finished() {
        let mut r: JobRecord = serde_json::from_value(serde_json::json!({
            "id": "abc", "model": "m", "status": "created", "input": {}, "base_url": "http://x",
            "created_at": 1, "started_at": null, "completed_at": null, "error": "", "code": 0,
            "seed": 1, "outputs": [], "base64_output": false, "webhook": null, "step": 0,
            "total_steps": 30, "timings": []
        }))
        .unwrap();
        let hash = |r: &JobRecord, fields: &[(&str, &str)]| -> TaskHash {
            let mut h: TaskHash = fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect();
            h.insert("record".into(), serde_json::to_vec(r).unwrap());
            h
        };
        let running = [
            ("status", "processing"),
            ("step", "7"),
            ("total", "30"),
            ("attempts", "2"),
            ("started_at", "99"),
        ];
        let got = record_of(&hash(&r, &running)).unwrap();
        assert_eq!(
            (got.status, got.step, got.attempts, got.started_at),
            (Status::Processing, 7, 2, Some(99))
        );
        // the final record wins over the last progress written
        r.status = Status::Completed;
        r.step = 30;
        r.started_at = Some(100);
        let mut done = running;
        done[0] = ("status", "completed");
        let got = record_of(&hash(&r, &done)).unwrap();
        assert_eq!((got.step, got.started_at, got.attempts), (30, Some(100), 2));
        assert!(record_of(&TaskHash::new()).is_none());
    }

    #[test]
    fn a_redis_elsewhere_needs_a_password() {
        // Client::open connects to nothing: these only parse
        let cfg = ClusterConfig::new;
        let err = client(&cfg("redis://redis.internal:6379/0")).err().unwrap();
        assert!(err.contains("no password") && err.contains("--allow-redis-without-password"));
        for ok in [
            "redis://:pw@redis.internal:6379/0",
            "redis://skyreels:pw@redis.internal/0",
            "rediss://:pw@redis.internal/0",
            "redis://127.0.0.1:6379/0",
            "redis://localhost/0",
            "redis://[::1]:6379/0",
            "redis+unix:///run/redis.sock",
        ] {
            assert!(client(&cfg(ok)).is_ok(), "{ok}");
        }
        let allowed = ClusterConfig {
            allow_no_password: true,
            ..cfg("redis://redis.internal/0")
        };
        assert!(client(&allowed).is_ok());
        let ca_without_tls = ClusterConfig {
            ca_cert: Some("/nonexistent.pem".into()),
            ..cfg("redis://127.0.0.1/0")
        };
        assert!(client(&ca_without_tls).err().unwrap().contains("rediss://"));
        let missing_ca = ClusterConfig {
            ca_cert: Some("/nonexistent.pem".into()),
            ..cfg("rediss://127.0.0.1/0")
        };
        assert!(client(&missing_ca)
            .err()
            .unwrap()
            .contains("/nonexistent.pem"));
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redacted("redis://:hunter2@10.0.0.5:6379/0"),
            "redis://:***@10.0.0.5:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1/"), "redis://127.0.0.1/");
    }
}
