//! The Redis backend of a scale-out deployment: API nodes and GPU workers on many machines
//! share task records, the queue, uploads, cancel requests, progress and outputs through one
//! Redis 7. No cluster protocol of ours: two streams per model consumed by one consumer group
//! are the queue (`XREADGROUP`, and `XAUTOCLAIM` for the tasks of workers that died; a worker
//! reads a model's low-priority stream only while its normal one has nothing), each state
//! change is a Lua script (compare and set on the status; `scripts/*.lua`), retention is key
//! TTLs.
//!
//! Keys (prefix `skyreels:`): `task:{id}` (hash: the record JSON and the fields that change
//! while it runs: status, step, total, attempts, worker, started_at; and priority and cancel_at,
//! read by the scripts), `input:{id}` (the generation parameters and the image as it came),
//! `queue:{model}` and `queue_low:{model}` (streams: normal and low-priority tasks), `waiting`
//! (sorted set of the tasks not started: normal ones scored by admission order, low ones by
//! 2^50 plus it, so every normal task ranks ahead; the cluster-wide bound and queue positions),
//! `seq`, `cancel:{id}`, `output:{file}`, `upload:{id}` and `upload_data:{id}`,
//! `ticket:{sha256}` (and `tickets`, the open ones with their expiry: the cluster-wide bound;
//! `tickets:{owner}` per API key), `upload_usage` and `upload_expiry` (the quotas),
//! `hook:{id}:{status}` (the webhook once-guard), `models` (hash: model id -> model info),
//! `models_seen`, `workers` (sorted set: worker -> last heartbeat ms), `worker_models` (hash:
//! worker -> its model ids), `secret`.
mod blobs;
mod config;
mod conn;
mod consumer;
mod keys;
mod record;
mod scripts;
mod sweep;

pub use blobs::{CONCURRENT_WINDOWS, WINDOW};
pub use config::{redacted, ClusterConfig, ConfigError, OutputStore, Quotas};

use crate::engine::files::Paths;
use crate::engine::task::{now_ms, JobRecord, Status};
use crate::engine::{
    Backend, Blob, Consumer, Content, EngineError, Hook, Mark, ModelInfo, Overview, Queued,
    Unstartable, Upload, UploadRefused, COMMAND_TIMEOUT, MAX_OPEN_TICKETS,
    MAX_OPEN_TICKETS_PER_KEY, TICKET_TTL,
};
use config::client;
use conn::Conn;
use keys::KEYS;
use record::{record_of, End, TaskHash};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The consumer group every worker reads the queues through.
pub const GROUP: &str = "workers";
/// A task whose worker stopped this many times fails with 5003.
pub const MAX_ATTEMPTS: u32 = 3;
/// How often a task's status and step are read while a client follows it (its event stream):
/// the latency of live progress on this backend, at one small read per open stream each time.
pub const EVENT_POLL: Duration = Duration::from_millis(250);

/// This node's view of the shared engine.
pub struct Cluster {
    pub config: ClusterConfig,
    client: redis::Client,
    conn: Conn,
    /// Uploads and videos are read on their own connection, in bounded windows.
    blobs: blobs::Blobs,
    paths: Paths,
    retention_ms: u64,
    hook: Arc<Hook>,
}

/// The Redis backend (see the module doc).
#[derive(Clone)]
pub struct Redis(Arc<Cluster>);

impl Redis {
    /// Opens a connection manager (lazy: it connects on first use and reconnects with backoff)
    /// over the local scratch folders.
    pub fn open(
        config: ClusterConfig,
        paths: Paths,
        retention: Option<Duration>,
        hook: Arc<Hook>,
    ) -> Result<Self, ConfigError> {
        let client = client(&config)?;
        let shown = redacted(&config.url);
        let manager = || {
            let settings = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(COMMAND_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            ConnectionManager::new_lazy_with_config(client.clone(), settings)
                .map(Conn)
                .map_err(|e| ConfigError::Url(shown.clone(), e.to_string()))
        };
        let (conn, blobs) = (manager()?, blobs::Blobs::new(manager()?));
        Ok(Redis(Arc::new(Cluster {
            config,
            client,
            conn,
            blobs,
            paths,
            retention_ms: retention.map_or(0, |r| r.as_millis() as u64),
            hook,
        })))
    }
}

impl Cluster {
    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    fn outputs_on_disk(&self) -> bool {
        self.config.output_store == OutputStore::Dir
    }

    fn ttl_or(&self, default: Duration) -> u64 {
        if self.retention_ms > 0 {
            self.retention_ms
        } else {
            default.as_millis() as u64
        }
    }

    /// How long an unstarted task's record and input are kept at most: the queue TTL plus
    /// the sweep's slack (the sweep fails it at the queue TTL; this is for a cluster where no
    /// API node runs to sweep).
    fn queue_backstop_ms(&self) -> u64 {
        (self.config.queue_ttl + Duration::from_secs(600)).as_millis() as u64
    }

    /// `mine` is stored where Redis has no secret (it lost its data) or, `force`, always; the
    /// cluster's secret is returned.
    async fn sync_secret(&self, mine: &str, force: bool) -> redis::RedisResult<String> {
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

    /// Every model a worker ever announced.
    async fn known_models(&self) -> Result<Vec<ModelInfo>, EngineError> {
        let all: HashMap<String, String> = self.conn().hgetall(KEYS.models()).await?;
        let mut models: Vec<ModelInfo> = all
            .values()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        models.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(models)
    }

    /// Live workers per model (a heartbeat within the claim timeout).
    async fn live_workers(&self) -> Result<HashMap<String, usize>, EngineError> {
        let mut c = self.conn();
        let since = now_ms().saturating_sub(self.config.claim_timeout.as_millis() as u64);
        let names: Vec<String> = c.zrangebyscore(KEYS.workers(), since, "+inf").await?;
        let mut per = HashMap::new();
        if names.is_empty() {
            return Ok(per);
        }
        let lists: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(KEYS.worker_models())
            .arg(&names)
            .query_async(&mut c)
            .await?;
        for list in lists.into_iter().flatten() {
            for m in serde_json::from_str::<Vec<String>>(&list).unwrap_or_default() {
                *per.entry(m).or_default() += 1;
            }
        }
        Ok(per)
    }

    /// Writes a compare-and-set change with [`scripts::END`]; whether it won (told to the
    /// hook when it did).
    async fn end(&self, end: End<'_>) -> Result<bool, EngineError> {
        let got: String = end.invocation().invoke_async(&mut self.conn()).await?;
        let won = got == "ok";
        if won {
            self.hook.committed(end.record);
        }
        Ok(won)
    }
}

#[async_trait::async_trait]
impl Backend for Redis {
    fn shared(&self) -> bool {
        true
    }

    fn outputs_on_disk(&self) -> bool {
        self.0.outputs_on_disk()
    }

    fn paths(&self) -> &Paths {
        &self.0.paths
    }

    async fn models(&self) -> Result<Option<Vec<ModelInfo>>, EngineError> {
        Ok(Some(self.0.known_models().await?))
    }

    async fn live_workers(&self) -> Result<Option<Vec<(String, usize)>>, EngineError> {
        Ok(Some(self.0.live_workers().await?.into_iter().collect()))
    }

    async fn admit(&self, record: &JobRecord, max_queue: usize) -> Result<bool, EngineError> {
        let json = serde_json::to_vec(record).expect("records serialize");
        let admitted: i64 = scripts::ADMIT
            .key(KEYS.waiting())
            .key(KEYS.task(&record.id))
            .key(KEYS.seq())
            .arg(max_queue)
            .arg(&record.id)
            .arg(json)
            .arg(record.total_steps)
            .arg(&record.model)
            .arg(self.0.queue_backstop_ms())
            .arg(record.priority.as_str())
            .arg(record.cancel_at.unwrap_or_default())
            .invoke_async(&mut self.0.conn())
            .await?;
        Ok(admitted == 1)
    }

    async fn enqueue(&self, id: &str, model: &str, input: &Queued) -> Result<(), EngineError> {
        let json = serde_json::to_vec(&input.params).expect("parameters serialize");
        let _: i64 = scripts::ENQUEUE
            .key(KEYS.task(id))
            .key(KEYS.input(id))
            .key(KEYS.queue(model))
            .key(KEYS.queue_low(model))
            .arg(id)
            .arg(&json)
            .arg(&*input.image_bytes())
            .arg(self.0.queue_backstop_ms())
            .invoke_async(&mut self.0.conn())
            .await?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<(JobRecord, Option<usize>)>, EngineError> {
        let (h, rank): (TaskHash, Option<usize>) = redis::pipe()
            .hgetall(KEYS.task(id))
            .zrank(KEYS.waiting(), id)
            .query_async(&mut self.0.conn())
            .await?;
        Ok(record_of(&h).map(|r| {
            let position = (r.status == Status::Created).then(|| rank.unwrap_or_default());
            (r, position)
        }))
    }

    async fn replace(&self, from: &JobRecord, to: &JobRecord) -> Result<bool, EngineError> {
        let deleting = to.status == Status::Deleted;
        let end = End {
            expected: from.status,
            record: to,
            // a deleted task keeps the expiry it has
            ttl_ms: if deleting { 0 } else { self.0.retention_ms },
            output: from
                .outputs
                .first()
                .filter(|_| deleting)
                .map(|f| (f.as_str(), &[][..])),
            entry: None,
            delete_outputs: deleting,
        };
        self.0.end(end).await
    }

    async fn request_cancel(&self, id: &str) -> Result<(), EngineError> {
        let ttl = self.0.retention_ms.max(24 * 3600 * 1000);
        let _: () = self.0.conn().pset_ex(KEYS.cancel(id), 1, ttl).await?;
        Ok(())
    }

    async fn wait_finished(&self, id: &str, limit: Duration) -> Result<bool, EngineError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // a failed read is not an answer: asked again until the limit
            let status: redis::RedisResult<Option<String>> =
                self.0.conn().hget(KEYS.task(id), "status").await;
            match status.map(|s| s.map(|s| s.parse::<Status>())) {
                Ok(None) => return Ok(true),
                Ok(Some(Ok(s))) if s.is_finished() => return Ok(true),
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
            )
            .await;
        }
    }

    /// Polls the task's status and step every [`EVENT_POLL`] (workers write them with each step;
    /// no channel per task to subscribe to).
    async fn wait_change(&self, id: &str, seen: Mark, limit: Duration) -> Result<(), EngineError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let got: (Option<String>, Option<usize>) = redis::cmd("HMGET")
                .arg(KEYS.task(id))
                .arg("status")
                .arg("step")
                .query_async(&mut self.0.conn())
                .await?;
            match got {
                (Some(s), step) if s.parse::<Status>().ok() == Some(seen.0) => {
                    if step.unwrap_or_default() != seen.1 {
                        return Ok(());
                    }
                }
                _ => return Ok(()),
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + EVENT_POLL)).await;
        }
    }

    async fn overview(&self) -> Result<Overview, EngineError> {
        let mut c = self.0.conn();
        let ids: Vec<String> = c.zrange(KEYS.waiting(), 0, -1).await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hget(KEYS.task(id), "model");
        }
        let models: Vec<Option<String>> = if ids.is_empty() {
            vec![]
        } else {
            pipe.query_async(&mut c).await?
        };
        let mut waiting = std::collections::BTreeMap::<String, usize>::new();
        for m in models.into_iter().flatten() {
            *waiting.entry(m).or_default() += 1;
        }
        Ok(Overview {
            jobs: vec![],
            waiting: waiting.into_iter().collect(),
            workers: vec![],
        })
    }

    /// Moves the checked bytes from the scratch file into Redis, with the record, if the
    /// uploader's and the cluster's upload quotas leave room for them.
    async fn store_upload(&self, upload: &Upload, path: &Path) -> Result<(), UploadRefused> {
        let c = &self.0;
        let bytes = tokio::fs::read(path).await.map_err(EngineError::from);
        let _ = tokio::fs::remove_file(path).await;
        let bytes = bytes?;
        let now = now_ms();
        let expiry = if c.retention_ms > 0 {
            now + c.retention_ms
        } else {
            u64::MAX >> 11
        };
        let q = &c.config.quotas;
        let verdict: i64 = scripts::UPLOAD_QUOTA
            .key(KEYS.upload_usage())
            .key(KEYS.upload_expiry())
            .arg(now)
            .arg(upload.owner())
            .arg(&upload.id)
            .arg(bytes.len())
            .arg(expiry)
            .arg(q.uploads_per_key)
            .arg(q.uploads_total)
            .invoke_async(&mut c.conn())
            .await
            .map_err(EngineError::from)?;
        match verdict {
            1 => return Err(UploadRefused::KeyQuota(q.uploads_per_key)),
            2 => return Err(UploadRefused::ClusterQuota(q.uploads_total)),
            _ => {}
        }
        let meta = serde_json::to_string(upload).expect("uploads serialize");
        let (key, data) = (KEYS.upload(&upload.id), KEYS.upload_data(&upload.id));
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(&key, "meta", meta)
            .ignore()
            .set(&data, bytes)
            .ignore();
        if c.retention_ms > 0 {
            pipe.pexpire(&key, c.retention_ms as i64)
                .ignore()
                .pexpire(&data, c.retention_ms as i64)
                .ignore();
        }
        let _: () = pipe
            .query_async(&mut c.conn())
            .await
            .map_err(EngineError::from)?;
        Ok(())
    }

    async fn upload(&self, id: &str) -> Result<Option<Upload>, EngineError> {
        let meta: Option<String> = self.0.conn().hget(KEYS.upload(id), "meta").await?;
        Ok(meta.and_then(|m| serde_json::from_str::<Upload>(&m).ok()))
    }

    async fn open_ticket(&self, upload: &Upload, digest: &str) -> Result<(), UploadRefused> {
        let meta = serde_json::to_string(upload).expect("uploads serialize");
        let ttl = TICKET_TTL.as_millis() as u64;
        let now = now_ms();
        let opened: i64 = scripts::TICKET
            .key(KEYS.tickets())
            .key(KEYS.key_tickets(upload.owner()))
            .key(KEYS.ticket(digest))
            .arg(now)
            .arg(MAX_OPEN_TICKETS)
            .arg(now + ttl)
            .arg(digest)
            .arg(meta)
            .arg(ttl)
            .arg(MAX_OPEN_TICKETS_PER_KEY)
            .invoke_async(&mut self.0.conn())
            .await
            .map_err(EngineError::from)?;
        match opened {
            1 => Ok(()),
            2 => Err(UploadRefused::KeyTickets),
            _ => Err(UploadRefused::Tickets),
        }
    }

    async fn take_ticket(&self, digest: &str) -> Result<Option<Upload>, EngineError> {
        let meta: Option<String> = scripts::TAKE_TICKET
            .key(KEYS.tickets())
            .key(KEYS.ticket(digest))
            .arg(digest)
            .arg(KEYS.key_tickets(""))
            .invoke_async(&mut self.0.conn())
            .await?;
        Ok(meta.and_then(|m| serde_json::from_str::<Upload>(&m).ok()))
    }

    async fn content(&self, blob: Blob<'_>) -> Result<Option<Content>, EngineError> {
        if let (Blob::Output(file), true) = (blob, self.0.outputs_on_disk()) {
            let path = self.0.paths.video_path(file);
            return Ok(path.is_file().then_some(Content::File(path)));
        }
        let key = KEYS.blob(blob);
        let Some(len) = self.0.blobs.len(&key).await? else {
            return Ok(None);
        };
        let blobs = self.0.blobs.clone();
        Ok(Some(Content::Stream {
            len,
            read: Box::new(move |first, last| Box::pin(blobs.stream(key.clone(), first, last))),
        }))
    }

    /// `SET NX` on the task's webhook key for this state: only the first node to ask delivers.
    async fn claim_webhook(&self, record: &JobRecord) -> bool {
        let ttl = self.0.ttl_or(Duration::from_secs(7 * 24 * 3600));
        let got: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(KEYS.hook(&record.id, record.status))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .query_async(&mut self.0.conn())
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

    fn close(&self) -> Vec<String> {
        // the queue is shared: what waits stays queued for the other workers
        vec![]
    }

    async fn flushed(&self) {}

    async fn sweep(&self, stalled: Duration) -> Result<Vec<Unstartable>, EngineError> {
        self.0.sweep(stalled).await
    }

    async fn sync_secret(&self, mine: &str, force: bool) -> Result<String, EngineError> {
        Ok(self.0.sync_secret(mine, force).await?)
    }

    /// What is wrong with Redis' memory policy, if anything: any policy but `noeviction` lets
    /// a full Redis silently drop task records, queue entries, uploads and outputs (with
    /// `noeviction` it refuses writes instead, which clients see as a 503 saying Redis is full).
    async fn setup_problem(&self) -> Option<String> {
        let got: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut self.0.conn())
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

    fn consumer(&self, models: &[ModelInfo], index: usize) -> Box<dyn Consumer> {
        Box::new(consumer::RedisConsumer::new(
            self.0.clone(),
            models.to_vec(),
            index,
        ))
    }
}
