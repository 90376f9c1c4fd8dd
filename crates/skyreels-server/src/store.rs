//! Jobs, the FIFO queue the worker drains, uploads, and their files on disk.
//!
//! One mutex guards it all (every critical section is short: no I/O beyond writing a small
//! JSON record); the worker thread waits on a condition variable, HTTP handlers on per-job
//! `watch` channels.

use crate::generator::GenerationRequest;
use crate::job::{new_id, now_ms, JobRecord, Status, TaskCode};
use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use tokio::sync::{mpsc, watch};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the output folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a submit was not admitted.
#[derive(Debug, PartialEq)]
pub enum AdmitError {
    /// The queue holds `max_queue` unstarted tasks.
    QueueFull,
    /// The server is shutting down.
    Draining,
}

/// A job the worker took: what to run and how to stop it.
pub struct Work {
    pub id: String,
    pub request: GenerationRequest,
    pub cancel: Arc<AtomicBool>,
}

/// How a job the worker ran ended.
pub enum Outcome {
    Completed {
        output: String,
        timings: Vec<(String, u64)>,
    },
    Cancelled,
    Failed(TaskCode, String),
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

struct Job {
    record: JobRecord,
    request: Option<GenerationRequest>,
    cancel: Arc<AtomicBool>,
    watch: watch::Sender<Status>,
}

/// A file received through one of the upload flows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Upload {
    pub id: String,
    pub filename: String,
    pub content_type: String,
    pub size: usize,
    pub created_at: u64,
    /// `false` while a PUT ticket is open.
    pub complete: bool,
    /// The single-use secret of the PUT URL.
    #[serde(default)]
    pub put_token: Option<String>,
    pub base_url: String,
}

impl Upload {
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

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, Job>,
    /// Unstarted jobs in arrival order (their inputs may still be being prepared).
    queue: VecDeque<String>,
    running: Option<String>,
    uploads: HashMap<String, Upload>,
    draining: bool,
}

pub struct Store {
    inner: Mutex<Inner>,
    work: Condvar,
    dir: PathBuf,
    max_queue: usize,
    /// Counts finished tasks as they finish (under the store lock, so a client that sees a
    /// finished status also sees it counted).
    metrics: Arc<Metrics>,
    finished: mpsc::UnboundedSender<JobRecord>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Keeps only `[A-Za-z0-9._-]` of a client's file name.
pub fn safe_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let s: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "upload".into()
    } else {
        s
    }
}

impl Store {
    /// Opens (creating) the output folder and reloads its records: finished tasks keep being
    /// served; tasks that were queued or running when the server stopped become failed (5003).
    /// Tasks that finish from now on are counted in `metrics` and their records sent on the
    /// returned channel.
    pub fn open(
        dir: &Path,
        max_queue: usize,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<JobRecord>), StoreError> {
        for sub in ["jobs", "uploads", "videos"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let store = Store {
            inner: Mutex::new(Inner::default()),
            work: Condvar::new(),
            dir: dir.to_path_buf(),
            max_queue,
            metrics,
            finished: tx,
        };
        let mut inner = store.lock();
        for (sub, is_job) in [("jobs", true), ("uploads", false)] {
            let p = dir.join(sub);
            for entry in std::fs::read_dir(&p).map_err(io_err(&p))?.flatten() {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                let text = match std::fs::read_to_string(&path) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!("skipping {}: {e}", path.display());
                        continue;
                    }
                };
                if is_job {
                    match serde_json::from_str::<JobRecord>(&text) {
                        Ok(mut record) => {
                            if !record.status.is_finished() {
                                let _ = record.fail(
                                    TaskCode::Unavailable,
                                    "the server restarted before this task finished; submit it again",
                                );
                                store.persist(&record);
                            }
                            insert(&mut inner, record);
                        }
                        Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
                    }
                } else {
                    match serde_json::from_str::<Upload>(&text) {
                        Ok(u) if u.complete => {
                            inner.uploads.insert(u.id.clone(), u);
                        }
                        Ok(u) => remove_upload_files(dir, &u.id),
                        Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
                    }
                }
            }
        }
        drop(inner);
        Ok((store, rx))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panic while holding the lock cannot leave it half-updated in a way worse than
        // refusing service: keep going with the data
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder of finished videos (served at `/outputs`).
    pub fn video_dir(&self) -> PathBuf {
        self.dir.join("videos")
    }

    pub fn video_path(&self, file: &str) -> PathBuf {
        self.video_dir().join(file)
    }

    pub fn upload_data_path(&self, id: &str) -> PathBuf {
        self.dir.join("uploads").join(format!("{id}.bin"))
    }

    fn persist(&self, record: &JobRecord) {
        let path = self.dir.join("jobs").join(format!("{}.json", record.id));
        write_json(&path, record);
    }

    /// Changes a job and, when its status moved, persists it and tells the watchers.
    fn update(&self, inner: &mut Inner, id: &str, f: impl FnOnce(&mut JobRecord)) {
        let Some(job) = inner.jobs.get_mut(id) else {
            return;
        };
        let before = job.record.status;
        f(&mut job.record);
        if job.record.status != before {
            self.persist(&job.record);
            job.watch.send_replace(job.record.status);
            if matches!(
                job.record.status,
                Status::Completed | Status::Failed | Status::Cancelled
            ) {
                job.request = None;
                self.metrics.finished(job.record.status.as_str());
                let _ = self.finished.send(job.record.clone());
            }
        }
    }

    /// Accepts a new task (status created) if the queue has room.
    pub fn admit(&self, record: JobRecord) -> Result<watch::Receiver<Status>, AdmitError> {
        let mut inner = self.lock();
        if inner.draining {
            return Err(AdmitError::Draining);
        }
        // the queue holds exactly the unstarted (created) tasks
        if inner.queue.len() >= self.max_queue {
            return Err(AdmitError::QueueFull);
        }
        self.persist(&record);
        inner.queue.push_back(record.id.clone());
        Ok(insert(&mut inner, record))
    }

    /// Its input is ready: the worker may take it (unless it was cancelled meanwhile).
    pub fn enqueue(&self, id: &str, request: GenerationRequest) {
        let mut inner = self.lock();
        let Some(job) = inner.jobs.get_mut(id) else {
            return;
        };
        if job.record.status != Status::Created {
            return;
        }
        job.request = Some(request);
        drop(inner);
        self.work.notify_all();
    }

    /// Fails a task that has not started (its input could not be prepared).
    pub fn fail_unstarted(&self, id: &str, code: TaskCode, error: String) {
        let mut inner = self.lock();
        inner.queue.retain(|q| q != id);
        self.update(&mut inner, id, |r| {
            if r.status == Status::Created {
                let _ = r.fail(code, error);
            }
        });
    }

    /// The first queued task whose input is ready, marked processing; waits while there is
    /// none. `None` once
    /// the server is draining.
    pub fn next_work(&self) -> Option<Work> {
        let mut inner = self.lock();
        loop {
            if inner.draining {
                return None;
            }
            let ready = inner
                .queue
                .iter()
                .position(|id| inner.jobs.get(id).is_some_and(|j| j.request.is_some()));
            if let Some(i) = ready {
                let id = inner.queue.remove(i).expect("index from position");
                let job = inner.jobs.get_mut(&id).expect("queued jobs exist");
                let request = job.request.take().expect("checked above");
                let cancel = job.cancel.clone();
                self.update(&mut inner, &id, |r| {
                    let _ = r.transition(Status::Processing);
                    r.total_steps = request.steps;
                });
                inner.running = Some(id.clone());
                return Some(Work {
                    id,
                    request,
                    cancel,
                });
            }
            inner = self.work.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn progress(&self, id: &str, step: usize, total: usize) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.get_mut(id) {
            job.record.step = step;
            job.record.total_steps = total;
        }
    }

    /// Records how the running task ended.
    pub fn finish(&self, id: &str, outcome: Outcome) {
        let mut inner = self.lock();
        inner.running = None;
        self.update(&mut inner, id, |r| match outcome {
            Outcome::Completed { output, timings } => {
                r.outputs = vec![output];
                r.timings = timings;
                r.step = r.total_steps;
                let _ = r.transition(Status::Completed);
            }
            Outcome::Cancelled => {
                let _ = r.transition(Status::Cancelled);
            }
            Outcome::Failed(code, error) => {
                let _ = r.fail(code, error);
            }
        });
        drop(inner);
        self.work.notify_all();
    }

    /// `DELETE`: dequeue, cancel or delete.
    pub fn cancel_or_delete(&self, id: &str) -> Option<CancelResult> {
        let mut inner = self.lock();
        let job = inner.jobs.get(id)?;
        let status = job.record.status;
        Some(match status {
            Status::Created => {
                inner.queue.retain(|q| q != id);
                self.update(&mut inner, id, |r| {
                    let _ = r.transition(Status::Cancelled);
                });
                CancelResult::Dequeued
            }
            Status::Processing => {
                job.cancel.store(true, Ordering::SeqCst);
                CancelResult::Cancelling
            }
            Status::Deleted => CancelResult::AlreadyDeleted,
            Status::Completed | Status::Failed | Status::Cancelled => {
                let outputs = job.record.outputs.clone();
                self.update(&mut inner, id, |r| {
                    let _ = r.transition(Status::Deleted);
                    r.outputs.clear();
                });
                drop(inner);
                for f in outputs {
                    let _ = std::fs::remove_file(self.video_path(&f));
                }
                CancelResult::Deleted
            }
        })
    }

    pub fn get(&self, id: &str) -> Option<(JobRecord, Option<usize>)> {
        let inner = self.lock();
        let job = inner.jobs.get(id)?;
        let position = (job.record.status == Status::Created)
            .then(|| inner.queue.iter().position(|q| q == id).unwrap_or_default());
        Some((job.record.clone(), position))
    }

    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Status>> {
        self.lock().jobs.get(id).map(|j| j.watch.subscribe())
    }

    /// Jobs per status and the number of tasks waiting to start.
    pub fn counts(&self) -> (Vec<(Status, usize)>, usize) {
        let inner = self.lock();
        let by = Status::ALL
            .iter()
            .map(|s| {
                (
                    *s,
                    inner
                        .jobs
                        .values()
                        .filter(|j| j.record.status == *s)
                        .count(),
                )
            })
            .collect();
        (by, inner.queue.len())
    }

    /// Stops admitting and starting tasks; those not started fail with 5003.
    pub fn drain(&self) {
        let mut inner = self.lock();
        inner.draining = true;
        let waiting: Vec<String> = inner.queue.drain(..).collect();
        for id in waiting {
            self.update(&mut inner, &id, |r| {
                let _ = r.fail(
                    TaskCode::Unavailable,
                    "the server shut down before this task started; submit it again",
                );
            });
        }
        drop(inner);
        self.work.notify_all();
    }

    pub fn is_draining(&self) -> bool {
        self.lock().draining
    }

    /// Asks the running task (if any) to stop at its next step.
    pub fn cancel_running(&self) {
        let inner = self.lock();
        if let Some(job) = inner.running.as_ref().and_then(|id| inner.jobs.get(id)) {
            job.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Removes finished tasks (and their files) and uploads older than `retention_ms`.
    pub fn sweep(&self, retention_ms: u64) -> usize {
        let now = now_ms();
        let mut inner = self.lock();
        let old: Vec<JobRecord> = inner
            .jobs
            .values()
            .filter(|j| {
                j.record.status.is_finished()
                    && j.record
                        .completed_at
                        .unwrap_or(j.record.created_at)
                        .saturating_add(retention_ms)
                        <= now
            })
            .map(|j| j.record.clone())
            .collect();
        for r in &old {
            inner.jobs.remove(&r.id);
        }
        let old_uploads: Vec<String> = inner
            .uploads
            .values()
            .filter(|u| u.created_at.saturating_add(retention_ms) <= now)
            .map(|u| u.id.clone())
            .collect();
        for id in &old_uploads {
            inner.uploads.remove(id);
        }
        drop(inner);
        for r in &old {
            for f in &r.outputs {
                let _ = std::fs::remove_file(self.video_path(f));
            }
            let _ = std::fs::remove_file(self.dir.join("jobs").join(format!("{}.json", r.id)));
        }
        for id in &old_uploads {
            remove_upload_files(&self.dir, id);
        }
        old.len() + old_uploads.len()
    }

    /// A new upload record; with `put` it waits for its bytes on a single-use PUT URL.
    pub fn new_upload(
        &self,
        filename: &str,
        content_type: &str,
        size: usize,
        base_url: &str,
        put: bool,
    ) -> Upload {
        let upload = Upload {
            id: new_id(),
            filename: safe_filename(filename),
            content_type: content_type.to_string(),
            size,
            created_at: now_ms(),
            complete: false,
            put_token: put.then(new_id),
            base_url: base_url.to_string(),
        };
        if put {
            self.lock()
                .uploads
                .insert(upload.id.clone(), upload.clone());
        }
        upload
    }

    /// Stores the bytes of an upload and marks it complete.
    pub fn complete_upload(&self, mut upload: Upload, bytes: &[u8]) -> std::io::Result<Upload> {
        std::fs::write(self.upload_data_path(&upload.id), bytes)?;
        upload.complete = true;
        upload.put_token = None;
        upload.size = bytes.len();
        write_json(
            &self.dir.join("uploads").join(format!("{}.json", upload.id)),
            &upload,
        );
        self.lock()
            .uploads
            .insert(upload.id.clone(), upload.clone());
        Ok(upload)
    }

    /// Takes the open ticket of a PUT token (single use).
    pub fn take_ticket(&self, token: &str) -> Option<Upload> {
        let mut inner = self.lock();
        let id = inner
            .uploads
            .values()
            .find(|u| !u.complete && u.put_token.as_deref() == Some(token))?
            .id
            .clone();
        inner.uploads.remove(&id)
    }

    /// A completed upload by id.
    pub fn upload(&self, id: &str) -> Option<Upload> {
        self.lock().uploads.get(id).filter(|u| u.complete).cloned()
    }
}

/// Adds a job record, returning a watcher of its status.
fn insert(inner: &mut Inner, record: JobRecord) -> watch::Receiver<Status> {
    let (watch, rx) = watch::channel(record.status);
    inner.jobs.insert(
        record.id.clone(),
        Job {
            record,
            request: None,
            cancel: Arc::default(),
            watch,
        },
    );
    rx
}

fn remove_upload_files(dir: &Path, id: &str) {
    for ext in ["json", "bin"] {
        let _ = std::fs::remove_file(dir.join("uploads").join(format!("{id}.{ext}")));
    }
}

/// Writes JSON atomically (temporary file, then rename); failures are logged, not fatal.
fn write_json<T: Serialize>(path: &Path, value: &T) {
    let tmp = path.with_extension("json.tmp");
    let result = serde_json::to_vec_pretty(value)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::error!("cannot write {}: {e}", path.display());
    }
}
