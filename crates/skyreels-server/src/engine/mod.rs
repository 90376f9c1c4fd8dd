//! The job engine: every rule about tasks, written once, over a storage [`Backend`].
//!
//! The rules: which status changes are legal ([`task`]), what `DELETE` does to a task in each
//! state, what happens when a task ends (the [`Hook`]: metrics and the finished channel), the
//! queue bound and draining, uploads and their PUT tickets, output files, and what a worker
//! does with a task it took ([`worker`]). A backend only stores, compares and sets, queues and
//! leases: the in-memory one of a single process, or the Redis one a scale-out deployment
//! shares (the backends, `backend/`). The HTTP layer talks to [`Engine`] and never to a backend.

pub mod backend;
pub mod files;
pub mod task;
pub mod worker;

pub use crate::generator::{Input, ModelInfo};
pub use crate::metrics::Overview;
pub use backend::{Backend, Consumer, Lease, Verdict};
pub use files::{FolderError, Paths};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use task::{new_id, now_ms, JobRecord, Outcome, Status, TaskCode};

/// PUT tickets open at once, at most (each is a little memory until it expires).
pub const MAX_OPEN_TICKETS: usize = 1024;
/// PUT tickets one API key may hold open at once (one key cannot lock the others out).
pub const MAX_OPEN_TICKETS_PER_KEY: usize = 64;
/// A PUT ticket not used within this long expires.
pub const TICKET_TTL: Duration = Duration::from_secs(600);
/// The longest a node waits for one command of a shared store (a hung Redis answers nothing:
/// the client gets its 503 after this, not after a TCP timeout).
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(2500);
/// The owner of uploads made without an API key (no keys configured).
pub const ANONYMOUS: &str = "anonymous";

/// Why the engine cannot answer now.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The shared store (Redis) failed or is unreachable.
    #[error("{}", store_message(.0))]
    Store(#[from] redis::RedisError),
    /// Another node kept changing the task during a compare and set.
    #[error("the task keeps changing; retry")]
    Contended,
    /// A stored value vanished while it was being read (expired or deleted).
    #[error("the file was removed while it was being read")]
    Vanished,
    /// A local file could not be read or written.
    #[error("the server's storage failed: {0}")]
    Io(#[from] std::io::Error),
    /// The process is stopping.
    #[error("the server is shutting down")]
    Closed,
}

/// What a client is told of a store failure (no address, no credentials).
fn store_message(e: &redis::RedisError) -> &'static str {
    if is_full(e) {
        "the job store (Redis) is full: it reached its memory limit; retry later (operators: \
         see docs/scale-out.md, sizing Redis)"
    } else {
        "the job store (Redis) is unreachable; retry shortly"
    }
}

/// Redis refused a write because it reached `maxmemory` (`OOM command not allowed ...`).
pub fn is_full(e: &redis::RedisError) -> bool {
    e.code() == Some("OOM") || e.to_string().contains("OOM command not allowed")
}

impl EngineError {
    /// Logs the failure with its cause (the client's message leaves it out).
    pub fn log(&self) {
        match self {
            EngineError::Store(e) if is_full(e) => {
                tracing::error!("redis is full (maxmemory reached): {e}")
            }
            EngineError::Store(e) => tracing::warn!("redis: {e}"),
            EngineError::Io(e) => tracing::error!("storage: {e}"),
            EngineError::Contended | EngineError::Vanished | EngineError::Closed => {}
        }
    }
}

/// Why a submit was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The queue holds `max_queue` unstarted tasks.
    #[error("the queue is full")]
    QueueFull,
    /// The server is shutting down.
    #[error("the server is shutting down")]
    Draining,
    #[error(transparent)]
    Unavailable(#[from] EngineError),
}

/// Why an upload (or an upload ticket) was not taken.
#[derive(Debug, thiserror::Error)]
pub enum UploadRefused {
    #[error(transparent)]
    Unavailable(#[from] EngineError),
    #[error("too many upload tickets are open; send or let some expire first")]
    Tickets,
    #[error(
        "this API key has {MAX_OPEN_TICKETS_PER_KEY} upload tickets open; send them or let them \
         expire (after {} minutes)",
        TICKET_TTL.as_secs() / 60
    )]
    KeyTickets,
    #[error(
        "this API key's uploads take {} MiB, its quota; they are deleted when the retention ends",
        .0 >> 20
    )]
    KeyQuota(u64),
    #[error("the server keeps {} MiB of uploads, its limit; retry later", .0 >> 20)]
    ClusterQuota(u64),
}

/// What `DELETE /predictions/{id}` did.
#[derive(Debug, PartialEq)]
pub enum CancelResult {
    /// Taken off the queue: now cancelled.
    Dequeued,
    /// Running: it stops at the next denoising step.
    Cancelling,
    /// Finished: its files are gone, the record says deleted.
    Deleted,
    /// Deleted before.
    AlreadyDeleted,
}

/// A file received through one of the upload flows.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Upload {
    pub id: String,
    pub filename: String,
    pub content_type: String,
    pub size: u64,
    pub created_at: u64,
    /// `false` while a PUT ticket is open.
    pub complete: bool,
    pub base_url: String,
    /// Who uploaded it (an API key's digest prefix): the quotas and ticket bounds are per
    /// owner. Empty: [`ANONYMOUS`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
}

impl Upload {
    /// A new upload (not stored until it is complete).
    pub fn new(filename: &str, content_type: &str, size: u64, base_url: &str) -> Self {
        Upload {
            id: new_id(),
            filename: files::safe_filename(filename),
            content_type: content_type.to_string(),
            size,
            created_at: now_ms(),
            complete: false,
            base_url: base_url.to_string(),
            owner: String::new(),
        }
    }

    /// The owner its quota and tickets count against.
    pub fn owner(&self) -> &str {
        if self.owner.is_empty() {
            ANONYMOUS
        } else {
            &self.owner
        }
    }

    pub fn kind(&self) -> &'static str {
        match self.content_type.split('/').next() {
            Some("image") => "image",
            Some("video") => "video",
            Some("audio") => "audio",
            _ => "file",
        }
    }

    pub fn download_url(&self) -> String {
        format!(
            "{}/api/v3/media/files/{}/{}",
            self.base_url, self.id, self.filename
        )
    }
}

/// The key a PUT token is kept under: its SHA-256 in hex (the token itself is never stored).
pub fn ticket_digest(token: &str) -> String {
    task::hex(&Sha256::digest(token.as_bytes()))
}

/// A large stored value.
#[derive(Clone, Copy, Debug)]
pub enum Blob<'a> {
    /// A completed upload's bytes, by upload id.
    Upload(&'a str),
    /// A finished video, by file name.
    Output(&'a str),
}

/// Reads bytes `first..=last` of a stored value as a stream.
pub type ReadRange =
    Box<dyn Fn(u64, u64) -> BoxStream<'static, Result<Bytes, EngineError>> + Send + Sync>;

/// Where a stored value's bytes are.
pub enum Content {
    /// A file on this machine.
    File(PathBuf),
    /// `len` bytes, read in bounded windows.
    Stream { len: u64, read: ReadRange },
}

impl Content {
    /// The whole value.
    pub async fn read_all(self) -> Result<Vec<u8>, EngineError> {
        use futures_util::TryStreamExt;
        match self {
            Content::File(p) => Ok(tokio::fs::read(p).await?),
            Content::Stream { len, read } => {
                let mut out = Vec::with_capacity(len as usize);
                if len > 0 {
                    let mut s = read(0, len - 1);
                    while let Some(chunk) = s.try_next().await? {
                        out.extend_from_slice(&chunk);
                    }
                }
                Ok(out)
            }
        }
    }
}

/// A task's input as it waits in the queue.
#[derive(Clone, Debug)]
pub struct Queued {
    pub params: skyreels_params::GenerationParams,
    pub image: Option<QueuedImage>,
}

/// A queued task's image.
#[derive(Clone, Debug)]
pub enum QueuedImage {
    /// Already fitted to the task's size (only what the model reads).
    Fitted(image::RgbImage),
    /// As it came (compressed): what a shared queue keeps, fitted by the worker.
    Encoded(Vec<u8>),
}

impl Queued {
    /// The input a worker runs: the image decoded (with the API's limits) and fitted to the
    /// task's size, as the API node would have; an image that does not decode fails the task
    /// with 1402.
    pub fn into_input(self) -> Result<Input, Outcome> {
        let (width, height) = (self.params.width, self.params.height);
        let image = match self.image {
            None => None,
            Some(QueuedImage::Fitted(i)) => Some(i),
            Some(QueuedImage::Encoded(bytes)) => {
                let img = crate::media::decode(&bytes)
                    .map_err(|e| Outcome::Failed(TaskCode::MediaAccessFailed, e.to_string()))?;
                Some(skyreels_params::fit_image(&img, width, height))
            }
        };
        Ok(Input {
            params: self.params,
            image,
        })
    }

    /// The image as bytes to keep: the encoded ones, or fitted pixels as a PNG.
    pub fn image_bytes(&self) -> Vec<u8> {
        match &self.image {
            None => vec![],
            Some(QueuedImage::Encoded(b)) => b.clone(),
            Some(QueuedImage::Fitted(i)) => {
                let mut png = vec![];
                i.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .expect("an RGB image encodes as PNG in memory");
                png
            }
        }
    }
}

/// What happens when a task reaches an outcome (completed, failed, cancelled): it is counted
/// and told to the finished channel (logs, webhooks). Backends call it when they commit such
/// a change (the memory backend under its lock, so a client that sees the status also sees
/// it counted).
pub struct Hook {
    metrics: Arc<crate::metrics::Metrics>,
    finished: tokio::sync::mpsc::UnboundedSender<JobRecord>,
}

impl Hook {
    /// The hook and the receiver of the records of finished tasks.
    pub fn new(
        metrics: Arc<crate::metrics::Metrics>,
    ) -> (Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<JobRecord>) {
        let (finished, rx) = tokio::sync::mpsc::unbounded_channel();
        (Arc::new(Hook { metrics, finished }), rx)
    }

    /// A committed change of a task to `record`'s status.
    pub fn committed(&self, record: &JobRecord) {
        if record.status.is_outcome() {
            self.metrics.finished(record.status.as_str());
            let _ = self.finished.send(record.clone());
        }
    }
}

/// Exponential backoff from 100 ms to 5 s (reconnecting to a store, retrying a write).
#[derive(Default)]
pub struct Backoff(u32);

impl Backoff {
    pub fn reset(&mut self) {
        self.0 = 0;
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let d = Duration::from_millis(100 << self.0.min(6)).min(Duration::from_secs(5));
        self.0 += 1;
        d
    }

    /// Sleeps the next wait (worker threads).
    pub fn sleep(&mut self) {
        std::thread::sleep(self.next_delay());
    }
}

/// The job engine.
pub struct Engine {
    backend: Box<dyn Backend>,
    max_queue: usize,
    metrics: Arc<crate::metrics::Metrics>,
    draining: AtomicBool,
    /// Stop flags of the tasks this process's workers run (a shutdown past its grace).
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

impl Engine {
    pub fn new(
        backend: Box<dyn Backend>,
        max_queue: usize,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            backend,
            max_queue,
            metrics,
            draining: AtomicBool::new(false),
            running: Mutex::default(),
        }
    }

    /// The local file layout (the output folder; scratch space of a shared backend).
    pub fn paths(&self) -> &Paths {
        self.backend.paths()
    }

    /// Outputs are files under [`Paths::video_dir`] (else served from the backend).
    pub fn outputs_on_disk(&self) -> bool {
        self.backend.outputs_on_disk()
    }

    /// Tasks outlive this process: other nodes and workers share them.
    pub fn is_shared(&self) -> bool {
        self.backend.shared()
    }

    /// The task source of one of this process's workers serving `models`.
    pub fn consumer(&self, models: &[ModelInfo], index: usize) -> Box<dyn Consumer> {
        self.backend.consumer(models, index)
    }

    /// Queued tasks keep their image as it came (compressed; fitted by the worker) rather than
    /// fitted pixels: a shared backend, where queued inputs take shared memory.
    pub fn queues_source_images(&self) -> bool {
        self.backend.shared()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stops admitting and starting tasks on this node. Tasks that can no longer start (a
    /// backend that is not shared: its queue ends with the process) fail with 5003; a shared
    /// backend's stay queued for the other workers.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for id in self.backend.close() {
            self.fail_unstarted(
                &id,
                TaskCode::Unavailable,
                "the server shut down before this task started; submit it again".into(),
            )
            .await;
        }
    }

    /// Asks this node's running tasks to stop at their next step: with a shared backend they
    /// are left to be taken over by another worker, otherwise they end cancelled.
    pub fn cancel_running(&self) {
        for flag in self.running_flags().values() {
            flag.store(true, Ordering::SeqCst);
        }
    }

    fn running_flags(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once every change so far is durable.
    pub async fn flushed(&self) {
        self.backend.flushed().await;
    }

    /// The models a submit may name: announced by workers (shared backend; a task for a model
    /// with no live worker waits for one), else this process's loaded ones. `None` while none
    /// is known.
    pub async fn models(
        &self,
        loaded: Option<&Vec<ModelInfo>>,
    ) -> Result<Option<Vec<ModelInfo>>, EngineError> {
        Ok(match self.backend.models().await? {
            Some(known) => (!known.is_empty()).then_some(known),
            None => loaded.cloned(),
        })
    }

    /// Live workers per model: announced ones, else `workers` (this process's loaded ones)
    /// for each of its `loaded` models.
    pub async fn live_workers(
        &self,
        loaded: Option<&Vec<ModelInfo>>,
        workers: usize,
    ) -> Result<Vec<(String, usize)>, EngineError> {
        Ok(match self.backend.live_workers().await? {
            Some(live) => live,
            None => loaded
                .into_iter()
                .flatten()
                .map(|m| (m.id.clone(), workers))
                .collect(),
        })
    }

    /// Accepts a new task (status created) once its record is stored.
    pub async fn admit(&self, record: JobRecord) -> Result<(), AdmitError> {
        if self.is_draining() {
            return Err(AdmitError::Draining);
        }
        match self.backend.admit(&record, self.max_queue).await? {
            true => Ok(()),
            false => Err(AdmitError::QueueFull),
        }
    }

    /// Its input is ready: a worker may take it. Retried for a few minutes while the store is
    /// away (the task stays created, and its client's polls get 503 meanwhile).
    pub async fn enqueue(&self, id: &str, model: &str, input: Queued) {
        let mut backoff = Backoff::default();
        for _ in 0..40 {
            match self.backend.enqueue(id, model, input.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(%id, "cannot queue the task yet: {e}");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        tracing::error!(%id, "gave up queueing the task: the job store stayed unreachable");
    }

    /// Moves a task whose status `from` accepts to what `change` makes of it (a compare and
    /// set, retried when another node changed the task in between); the new record when this
    /// call made the change.
    async fn change(
        &self,
        id: &str,
        from: impl Fn(Status) -> bool,
        change: impl Fn(&mut JobRecord),
    ) -> Result<Option<JobRecord>, EngineError> {
        for _ in 0..8 {
            let Some((before, _)) = self.backend.get(id).await? else {
                return Ok(None);
            };
            if !from(before.status) {
                return Ok(None);
            }
            let mut after = before.clone();
            change(&mut after);
            if self.backend.replace(&before, &after).await? {
                return Ok(Some(after));
            }
        }
        Err(EngineError::Contended)
    }

    /// Fails a task that has not started (its input could not be prepared, or it never will
    /// start).
    pub async fn fail_unstarted(&self, id: &str, code: TaskCode, error: String) {
        let failed = self
            .change(
                id,
                |s| s == Status::Created,
                |r| {
                    let _ = r.fail(code, error.clone());
                },
            )
            .await;
        if let Err(e) = failed {
            tracing::error!(%id, "cannot fail the task: {e}");
        }
    }

    /// A task's record and, while it waits, its queue position.
    pub async fn get(&self, id: &str) -> Result<Option<(JobRecord, Option<usize>)>, EngineError> {
        self.backend.get(id).await
    }

    /// Waits up to `limit` for the task to finish; whether it did.
    pub async fn wait_finished(&self, id: &str, limit: Duration) -> bool {
        self.backend.wait_finished(id, limit).await.unwrap_or(false)
    }

    /// `DELETE`: a waiting task is taken off the queue (cancelled), a running one asked to
    /// stop at its next step, a finished one's files deleted (answered once they are gone).
    pub async fn cancel_or_delete(&self, id: &str) -> Result<Option<CancelResult>, EngineError> {
        for _ in 0..8 {
            let Some((r, _)) = self.backend.get(id).await? else {
                return Ok(None);
            };
            match r.status {
                Status::Created => {
                    let to = |r: &mut JobRecord| {
                        let _ = r.transition(Status::Cancelled);
                    };
                    if self
                        .change(id, |s| s == Status::Created, to)
                        .await?
                        .is_some()
                    {
                        return Ok(Some(CancelResult::Dequeued));
                    }
                }
                Status::Processing => {
                    self.backend.request_cancel(id).await?;
                    return Ok(Some(CancelResult::Cancelling));
                }
                Status::Deleted => return Ok(Some(CancelResult::AlreadyDeleted)),
                Status::Completed | Status::Failed | Status::Cancelled => {
                    let to = |r: &mut JobRecord| {
                        let _ = r.transition(Status::Deleted);
                        r.outputs.clear();
                    };
                    if self.change(id, |s| s == r.status, to).await?.is_some() {
                        if self.outputs_on_disk() {
                            files::remove_files(self.paths().output_files(&r.outputs));
                        }
                        self.backend.flushed().await;
                        return Ok(Some(CancelResult::Deleted));
                    }
                }
            }
        }
        Err(EngineError::Contended)
    }

    /// The tasks by status, waiting per model (every known model listed) and live workers per
    /// model; what cannot be read now is left out.
    pub async fn overview(&self, loaded: Option<&Vec<ModelInfo>>, workers: usize) -> Overview {
        let read = async {
            let mut o = self.backend.overview().await?;
            let mut waiting: BTreeMap<String, usize> = o.waiting.into_iter().collect();
            for m in self.models(loaded).await?.into_iter().flatten() {
                waiting.entry(m.id).or_default();
            }
            o.waiting = waiting.into_iter().collect();
            o.workers = self.live_workers(loaded, workers).await?;
            o.workers.sort();
            Ok::<_, EngineError>(o)
        };
        read.await.unwrap_or_else(|e| {
            e.log();
            Overview::default()
        })
    }

    /// A completed upload by id.
    pub async fn upload(&self, id: &str) -> Result<Option<Upload>, EngineError> {
        Ok(self.backend.upload(id).await?.filter(|u| u.complete))
    }

    /// A completed upload's bytes.
    pub async fn upload_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, EngineError> {
        match self.backend.content(Blob::Upload(id)).await? {
            Some(c) => Ok(Some(c.read_all().await?)),
            None => Ok(None),
        }
    }

    /// Stores an upload whose checked bytes are at [`Paths::upload_data_path`], complete
    /// (within the backend's quotas).
    pub async fn complete_upload(&self, mut upload: Upload) -> Result<Upload, UploadRefused> {
        upload.complete = true;
        let bytes = self.paths().upload_data_path(&upload.id);
        self.backend.store_upload(&upload, &bytes).await?;
        Ok(upload)
    }

    /// Opens a PUT ticket for `owner`: the upload and the single-use secret of its URL;
    /// refused when [`MAX_OPEN_TICKETS`] are open, or [`MAX_OPEN_TICKETS_PER_KEY`] of the
    /// owner's. Unused tickets expire after [`TICKET_TTL`].
    pub async fn open_ticket(
        &self,
        filename: &str,
        content_type: &str,
        size: u64,
        base_url: &str,
        owner: &str,
    ) -> Result<(Upload, String), UploadRefused> {
        let upload = Upload {
            owner: owner.to_string(),
            ..Upload::new(filename, content_type, size, base_url)
        };
        let token = format!("{}{}", new_id(), new_id());
        self.backend
            .open_ticket(&upload, &ticket_digest(&token))
            .await?;
        Ok((upload, token))
    }

    /// Takes the open ticket of a PUT token (single use).
    pub async fn take_ticket(&self, token: &str) -> Result<Option<Upload>, EngineError> {
        let upload = self.backend.take_ticket(&ticket_digest(token)).await?;
        Ok(upload.filter(|u| !u.complete))
    }

    /// A stored upload's or output's bytes.
    pub async fn content(&self, blob: Blob<'_>) -> Result<Option<Content>, EngineError> {
        self.backend.content(blob).await
    }

    /// A finished video's data: URI: the copy the worker wrote once when it completed, or
    /// (outputs kept by the backend) encoded from the stored video.
    pub async fn output_base64(&self, file: &str) -> Option<String> {
        let read = async {
            if self.outputs_on_disk() {
                let text = tokio::fs::read_to_string(self.paths().base64_path(file)).await?;
                return Ok(Some(text));
            }
            let Some(c) = self.backend.content(Blob::Output(file)).await? else {
                return Ok(None);
            };
            let bytes = c.read_all().await?;
            let uri = tokio::task::spawn_blocking(move || worker::data_uri(&bytes))
                .await
                .map_err(|_| EngineError::Closed)?;
            Ok::<_, EngineError>(Some(uri))
        };
        read.await.unwrap_or_else(|e| {
            tracing::error!("cannot read the base64 output {file}: {e}");
            None
        })
    }

    /// Whether this node delivers the webhook of this terminal state (once per task and state
    /// across the nodes of a shared backend).
    pub async fn claim_webhook(&self, record: &JobRecord) -> bool {
        self.backend.claim_webhook(record).await
    }

    /// Periodic upkeep (retention, tickets, dead workers); the waiting tasks that can no
    /// longer start fail with 5003 (`stalled`: a task not queued this long after its
    /// admission was abandoned by the node preparing its input). How many failed.
    pub async fn sweep(&self, stalled: Duration) -> Result<usize, EngineError> {
        let unstartable = self.backend.sweep(stalled).await?;
        for (id, why) in &unstartable {
            self.fail_unstarted(id, TaskCode::Unavailable, why.clone())
                .await;
        }
        Ok(unstartable.len())
    }

    /// The webhook secret every node uses (see [`Backend::sync_secret`]).
    pub async fn sync_secret(&self, mine: &str, force: bool) -> Result<String, EngineError> {
        self.backend.sync_secret(mine, force).await
    }

    /// [`Engine::sync_secret`] retried with backoff for up to a minute while the store is
    /// unreachable (a node starting before its Redis).
    pub async fn shared_secret(&self, mine: &str, force: bool) -> Result<String, EngineError> {
        let start = std::time::Instant::now();
        let mut backoff = Backoff::default();
        loop {
            match self.sync_secret(mine, force).await {
                Ok(s) => return Ok(s),
                Err(e) if start.elapsed() < Duration::from_secs(60) => {
                    tracing::warn!("the job store is not reachable yet ({e}); retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A problem with the backend's setup worth a warning at start.
    pub async fn setup_problem(&self) -> Option<String> {
        self.backend.setup_problem().await
    }

    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Registers the stop flag of a task this process's worker runs (until the guard drops).
    pub(crate) fn running(&self, id: &str) -> RunningGuard<'_> {
        let flag = Arc::new(AtomicBool::new(false));
        self.running_flags().insert(id.to_string(), flag.clone());
        RunningGuard {
            engine: self,
            id: id.to_string(),
            flag,
        }
    }
}

/// A task this process runs; its stop flag is set by [`Engine::cancel_running`].
pub(crate) struct RunningGuard<'a> {
    engine: &'a Engine,
    id: String,
    pub flag: Arc<AtomicBool>,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.engine.running_flags().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> skyreels_params::GenerationParams {
        skyreels_params::GenerationParams {
            prompt: "p".into(),
            negative_prompt: None,
            height: 32,
            width: 48,
            num_frames: 5,
            steps: 3,
            guidance_scale: 6.0,
            embedded_guidance_scale: 1.0,
            seed: 1,
            fps: 24.0,
            cache: skyreels_params::CacheSpec::None,
            flow_shift: None,
        }
    }

    #[test]
    fn a_queued_image_is_fitted_as_on_arrival_or_fails_the_task() {
        let img =
            image::RgbImage::from_fn(30, 20, |x, y| image::Rgb([x as u8 * 8, y as u8 * 12, 3]));
        let mut png = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let fitted = skyreels_params::fit_image(&img, 48, 32);
        let encoded = Queued {
            params: params(),
            image: Some(QueuedImage::Encoded(png.clone())),
        };
        assert_eq!(encoded.clone().into_input().unwrap().image.unwrap(), fitted);
        // fitted pixels kept as a PNG decode to the same pixels
        let kept = Queued {
            params: params(),
            image: Some(QueuedImage::Fitted(fitted.clone())),
        };
        let again = Queued {
            params: params(),
            image: Some(QueuedImage::Encoded(kept.image_bytes())),
        };
        assert_eq!(again.into_input().unwrap().image.unwrap(), fitted);
        assert_eq!(encoded.image_bytes(), png);
        let broken = Queued {
            params: params(),
            image: Some(QueuedImage::Encoded(png[..png.len() / 2].to_vec())),
        };
        match broken.into_input() {
            Err(Outcome::Failed(TaskCode::MediaAccessFailed, _)) => {}
            other => panic!("{other:?}"),
        }
        let text = Queued {
            params: params(),
            image: None,
        };
        assert!(text.image_bytes().is_empty());
        assert!(text.into_input().unwrap().image.is_none());
    }

    #[test]
    fn backoff_doubles_up_to_five_seconds() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..9).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn uploads_belong_to_their_owner_and_tickets_are_kept_by_digest() {
        let mut u = Upload::new("x/../a b.png", "image/png", 1, "http://h");
        assert_eq!(u.owner(), ANONYMOUS);
        u.owner = "k".into();
        assert_eq!(
            (u.owner(), u.kind(), u.filename.as_str()),
            ("k", "image", "a_b.png")
        );
        assert_eq!(
            u.download_url(),
            format!("http://h/api/v3/media/files/{}/a_b.png", u.id)
        );
        // SHA-256 of "abc"
        assert_eq!(
            ticket_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn each_attempt_writes_its_own_file() {
        assert_eq!(worker::output_file("t", 1), "t.mp4");
        assert_eq!(worker::output_file("t", 2), "t-2.mp4");
    }
}
