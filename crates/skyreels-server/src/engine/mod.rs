//! The job engine: every rule about tasks, written once, over a storage [`Backend`].
//!
//! The rules: which status changes are legal ([`task`]), what `DELETE` does to a task in each
//! state, what happens when a task ends (the [`Hook`]: metrics and the finished channel), the
//! queue bound and draining, uploads and their PUT tickets, output files, and what a worker
//! does with a task it took ([`worker`]). A backend only stores, compares and sets, queues and
//! leases: the in-memory one of a single process, or the Redis one a scale-out deployment
//! shares (the backends, `backend/`). The HTTP layer talks to [`Engine`] and never to a backend.

pub mod backend;
mod backoff;
mod errors;
pub mod files;
mod input;
pub mod queue;
pub mod task;
mod uploads;
pub mod worker;

pub use crate::generator::{Input, ModelInfo};
pub use crate::metrics::Overview;
pub use backend::{Backend, Consumer, Lease, Mark, Verdict};
pub use backoff::Backoff;
pub use errors::{is_full, AdmitError, CancelResult, EngineError, UploadRefused};
pub use files::{FolderError, Paths};
pub use input::{Blob, Content, Queued, QueuedImage, ReadRange};
pub use queue::{Priority, Unstartable};
pub use uploads::{
    ticket_digest, Upload, ANONYMOUS, MAX_OPEN_TICKETS, MAX_OPEN_TICKETS_PER_KEY, TICKET_TTL,
};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use task::{new_id, JobRecord, Status, TaskCode};

/// The longest a node waits for one command of a shared store (a hung Redis answers nothing:
/// the client gets its 503 after this, not after a TCP timeout).
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(2500);
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
            match self.backend.enqueue(id, model, &input).await {
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

    /// Waits up to `limit` for the task to move from `seen` (its status or step); a store that
    /// cannot be read is waited out as if nothing changed.
    pub async fn wait_change(&self, id: &str, seen: Mark, limit: Duration) {
        if self.backend.wait_change(id, seen, limit).await.is_err() {
            tokio::time::sleep(limit).await;
        }
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
    /// longer start fail: past their deadline with 5005, the others with 5003 (`stalled`: a
    /// task not queued this long after its admission was abandoned). How many failed.
    pub async fn sweep(&self, stalled: Duration) -> Result<usize, EngineError> {
        let unstartable = self.backend.sweep(stalled).await?;
        for u in &unstartable {
            self.fail_unstarted(&u.id, u.code, u.why.clone()).await;
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
    use super::task::Outcome;
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
            cfg_gate: None,
            flow_shift: None,
            loras: Vec::new(),
            riflex_freq_index: 0,
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
            image: Some(QueuedImage::Encoded(kept.image_bytes().into_owned())),
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
