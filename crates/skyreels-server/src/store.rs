//! Jobs, the FIFO queue the worker drains, uploads, and their files on disk.
//!
//! One mutex guards the state (every critical section is short and does no I/O: records are
//! serialized under it, compactly, and written by the records thread in the order they
//! changed); the worker thread waits on a condition variable, HTTP handlers on per-job `watch`
//! channels.

use crate::ct_eq;
use crate::generator::GenerationRequest;
use crate::job::{new_id, now_ms, JobRecord, Status, TaskCode};
use crate::jobs::UploadRefused;
use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot, watch};

/// PUT tickets open at once, at most (each is a little memory until it expires).
pub const MAX_OPEN_TICKETS: usize = 1024;
/// PUT tickets one API key may hold open at once (one key cannot lock the others out).
pub const MAX_OPEN_TICKETS_PER_KEY: usize = 64;
/// A PUT ticket not used within this long expires.
pub const TICKET_TTL: std::time::Duration = std::time::Duration::from_secs(600);

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
    /// The job store cannot be reached (Redis).
    Unavailable(String),
}

/// A job the worker took: what to run and how to stop it.
pub struct Work {
    pub id: String,
    /// The video's file name in the videos folder.
    pub file: String,
    pub request: GenerationRequest,
    pub cancel: Arc<AtomicBool>,
    /// Outputs are answered as data: URIs: encode them once, when done.
    pub base64: bool,
}

/// How a job the worker ran ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    Completed {
        output: String,
        timings: Vec<(String, u64)>,
        counts: Vec<(String, u64)>,
    },
    Cancelled,
    Failed(TaskCode, String),
}

impl Outcome {
    /// The record's end: its outputs, timings and final status.
    pub fn apply(self, r: &mut JobRecord) {
        match self {
            Outcome::Completed {
                output,
                timings,
                counts,
            } => {
                r.outputs = vec![output];
                r.timings = timings;
                r.counts = counts;
                r.step = r.total_steps;
                let _ = r.transition(Status::Completed);
            }
            Outcome::Cancelled => {
                let _ = r.transition(Status::Cancelled);
            }
            Outcome::Failed(code, error) => {
                let _ = r.fail(code, error);
            }
        }
    }
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
    pub size: u64,
    pub created_at: u64,
    /// `false` while a PUT ticket is open.
    pub complete: bool,
    pub base_url: String,
    /// Who uploaded it ([`crate::api::middleware::Owner`]): the quotas and ticket bounds are
    /// per owner.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
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

/// An open PUT ticket of the memory engine.
struct Ticket {
    upload: String,
    owner: String,
    expires_at: u64,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, Job>,
    /// Unstarted jobs in arrival order (their inputs may still be being prepared).
    queue: VecDeque<String>,
    /// Started and not finished (one per worker).
    running: HashSet<String>,
    /// Completed uploads, and open tickets (not complete).
    uploads: HashMap<String, Upload>,
    /// SHA-256 of an open ticket's PUT token -> the ticket.
    tickets: HashMap<[u8; 32], Ticket>,
    draining: bool,
}

/// A write for the records thread, in the order of the changes.
enum Disk {
    Write {
        path: PathBuf,
        bytes: Vec<u8>,
        done: Option<oneshot::Sender<()>>,
    },
    Remove(Vec<PathBuf>),
    Flush(oneshot::Sender<()>),
}

/// The files of the output folder: finished videos (served at `/outputs`), their base64
/// copies, upload bytes and their part files. (A scale-out node uses the same layout as its
/// scratch space, or as the shared folder of `--output-store dir`.)
#[derive(Clone, Debug)]
pub struct Paths {
    dir: PathBuf,
}

impl Paths {
    /// The layout under `dir`, creating its folders.
    pub fn create(dir: &Path) -> Result<Self, StoreError> {
        for sub in ["jobs", "uploads", "videos", "base64"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn video_dir(&self) -> PathBuf {
        self.dir.join("videos")
    }

    pub fn video_path(&self, file: &str) -> PathBuf {
        self.video_dir().join(file)
    }

    /// The data: URI of a finished video, written once when it completed with base64 output.
    pub fn base64_path(&self, file: &str) -> PathBuf {
        self.dir.join("base64").join(format!("{file}.b64"))
    }

    pub fn upload_data_path(&self, id: &str) -> PathBuf {
        self.dir.join("uploads").join(format!("{id}.bin"))
    }

    /// Where an upload's bytes stream to before they are checked.
    pub fn upload_part_path(&self, id: &str) -> PathBuf {
        self.dir.join("uploads").join(format!("{id}.part"))
    }
}

pub struct Store {
    inner: Mutex<Inner>,
    work: Condvar,
    dir: PathBuf,
    paths: Paths,
    max_queue: usize,
    /// Counts finished tasks as they finish (under the store lock, so a client that sees a
    /// finished status also sees it counted).
    metrics: Arc<Metrics>,
    finished: mpsc::UnboundedSender<JobRecord>,
    disk: std::sync::mpsc::Sender<Disk>,
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
    /// Records that do not parse move to `corrupt/` (with a warning); files no record owns
    /// (videos, upload bytes, half-written temporaries) are removed. Tasks that finish from
    /// now on are counted in `metrics` and their records sent on the returned channel.
    pub fn open(
        dir: &Path,
        max_queue: usize,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, mpsc::UnboundedReceiver<JobRecord>), StoreError> {
        let paths = Paths::create(dir)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (disk, disk_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("skyreels-records".into())
            .spawn(move || write_records(disk_rx))
            .map_err(io_err(dir))?;
        let store = Store {
            inner: Mutex::new(Inner::default()),
            work: Condvar::new(),
            dir: dir.to_path_buf(),
            paths,
            max_queue,
            metrics,
            finished: tx,
            disk,
        };
        let mut inner = store.lock();
        let jobs = dir.join("jobs");
        for path in json_files(&jobs)? {
            match read_record::<JobRecord>(&path) {
                Ok(mut record) => {
                    if !record.status.is_finished() {
                        let _ = record.fail(
                            TaskCode::Unavailable,
                            "the server restarted before this task finished; submit it again",
                        );
                        store.persist(&record, None);
                    }
                    insert(&mut inner, record);
                }
                Err(e) => move_aside(dir, &path, &e),
            }
        }
        let uploads = dir.join("uploads");
        for path in json_files(&uploads)? {
            match read_record::<Upload>(&path) {
                Ok(u) if u.complete => {
                    inner.uploads.insert(u.id.clone(), u);
                }
                Ok(u) => remove_upload_files(dir, &u.id),
                Err(e) => move_aside(dir, &path, &e),
            }
        }
        // files no record owns: outputs of tasks whose records are gone, upload bytes without
        // a record, and temporaries of writes that never finished
        let outputs: HashSet<String> = inner
            .jobs
            .values()
            .flat_map(|j| j.record.outputs.iter().cloned())
            .collect();
        let mut orphans = 0;
        for sub in ["videos", "base64", "uploads", "jobs"] {
            let p = dir.join(sub);
            for entry in std::fs::read_dir(&p).map_err(io_err(&p))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let owned = match sub {
                    "videos" => outputs.contains(&name),
                    "base64" => name
                        .strip_suffix(".b64")
                        .is_some_and(|n| outputs.contains(n)),
                    "uploads" => {
                        name.ends_with(".json")
                            || name
                                .strip_suffix(".bin")
                                .is_some_and(|id| inner.uploads.contains_key(id))
                    }
                    _ => name.ends_with(".json"),
                };
                if entry.path().is_file() && !owned {
                    let _ = std::fs::remove_file(entry.path());
                    orphans += 1;
                }
            }
        }
        if orphans > 0 {
            tracing::info!("removed {orphans} files no task or upload owns");
        }
        drop(inner);
        Ok((store, rx))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panic while holding the lock cannot leave it half-updated in a way worse than
        // refusing service: keep going with the data
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where this store's files live.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    fn to_disk(&self, op: Disk) {
        if self.disk.send(op).is_err() {
            tracing::error!("the records thread stopped: a record was not written");
        }
    }

    /// Queues the record's write (compact JSON, serialized here, written by the records
    /// thread); `done` is told once it is on disk.
    fn persist(&self, record: &JobRecord, done: Option<oneshot::Sender<()>>) {
        match serde_json::to_vec(record) {
            Ok(bytes) => self.to_disk(Disk::Write {
                path: self.dir.join("jobs").join(format!("{}.json", record.id)),
                bytes,
                done,
            }),
            Err(e) => tracing::error!(id = %record.id, "cannot serialize the record: {e}"),
        }
    }

    /// Resolves once every record change and file removal so far is done on disk.
    pub async fn flushed(&self) {
        let (tx, rx) = oneshot::channel();
        self.to_disk(Disk::Flush(tx));
        let _ = rx.await;
    }

    /// Changes a job and, when its status moved, persists it and tells the watchers.
    fn update(&self, inner: &mut Inner, id: &str, f: impl FnOnce(&mut JobRecord)) {
        let Some(job) = inner.jobs.get_mut(id) else {
            return;
        };
        let before = job.record.status;
        f(&mut job.record);
        if job.record.status != before {
            self.persist(&job.record, None);
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

    /// Accepts a new task (status created) if the queue has room: a watcher of its status, and
    /// a receiver told once its record is on disk.
    pub fn admit(
        &self,
        record: JobRecord,
    ) -> Result<(watch::Receiver<Status>, oneshot::Receiver<()>), AdmitError> {
        let mut inner = self.lock();
        if inner.draining {
            return Err(AdmitError::Draining);
        }
        // the queue holds exactly the unstarted (created) tasks
        if inner.queue.len() >= self.max_queue {
            return Err(AdmitError::QueueFull);
        }
        let (done, written) = oneshot::channel();
        self.persist(&record, Some(done));
        inner.queue.push_back(record.id.clone());
        Ok((insert(&mut inner, record), written))
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
                let base64 = job.record.base64_output;
                self.update(&mut inner, &id, |r| {
                    let _ = r.transition(Status::Processing);
                    r.total_steps = request.steps;
                    r.attempts += 1;
                });
                inner.running.insert(id.clone());
                return Some(Work {
                    file: format!("{id}.mp4"),
                    id,
                    request,
                    cancel,
                    base64,
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

    /// Records how a running task ended.
    pub fn finish(&self, id: &str, outcome: Outcome) {
        let mut inner = self.lock();
        inner.running.remove(id);
        self.update(&mut inner, id, |r| outcome.apply(r));
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
                self.to_disk(Disk::Remove(self.output_files(&outputs)));
                CancelResult::Deleted
            }
        })
    }

    /// A watcher of a task's status.
    pub fn watch(&self, id: &str) -> Option<watch::Receiver<Status>> {
        Some(self.lock().jobs.get(id)?.watch.subscribe())
    }

    pub fn get(&self, id: &str) -> Option<(JobRecord, Option<usize>)> {
        let inner = self.lock();
        let job = inner.jobs.get(id)?;
        let position = (job.record.status == Status::Created)
            .then(|| inner.queue.iter().position(|q| q == id).unwrap_or_default());
        Some((job.record.clone(), position))
    }

    /// Jobs per status, and the tasks waiting to start per model (no workers: the store does
    /// not know them).
    pub fn counts(&self) -> crate::jobs::Overview {
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
        let mut waiting = std::collections::BTreeMap::<String, usize>::new();
        for job in inner.queue.iter().filter_map(|id| inner.jobs.get(id)) {
            *waiting.entry(job.record.model.clone()).or_default() += 1;
        }
        crate::jobs::Overview {
            jobs: by,
            waiting: waiting.into_iter().collect(),
            workers: vec![],
        }
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

    /// Asks the running tasks (if any) to stop at their next step.
    pub fn cancel_running(&self) {
        let inner = self.lock();
        for job in inner.running.iter().filter_map(|id| inner.jobs.get(id)) {
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
        let tickets: Vec<[u8; 32]> = inner
            .tickets
            .iter()
            .filter(|(_, t)| !inner.uploads.contains_key(&t.upload))
            .map(|(t, _)| *t)
            .collect();
        for t in &tickets {
            inner.tickets.remove(t);
        }
        expire_tickets(&mut inner, now);
        drop(inner);
        let mut files = vec![];
        for r in &old {
            files.extend(self.output_files(&r.outputs));
            files.push(self.dir.join("jobs").join(format!("{}.json", r.id)));
        }
        for id in &old_uploads {
            files.extend(upload_files(&self.dir, id));
        }
        self.to_disk(Disk::Remove(files));
        old.len() + old_uploads.len()
    }

    /// A finished task's files: its videos and their base64 copies.
    fn output_files(&self, outputs: &[String]) -> Vec<PathBuf> {
        outputs
            .iter()
            .flat_map(|f| [self.paths.video_path(f), self.paths.base64_path(f)])
            .collect()
    }

    /// Opens a PUT ticket for `owner`: the upload and the single-use secret of its URL;
    /// refused when [`MAX_OPEN_TICKETS`] are open, or [`MAX_OPEN_TICKETS_PER_KEY`] of the
    /// owner's. Unused tickets expire after [`TICKET_TTL`].
    pub fn open_ticket(
        &self,
        filename: &str,
        content_type: &str,
        size: u64,
        base_url: &str,
        owner: &str,
    ) -> Result<(Upload, String), UploadRefused> {
        let (upload, token) = new_ticket(filename, content_type, size, base_url, owner);
        let now = now_ms();
        let mut inner = self.lock();
        expire_tickets(&mut inner, now);
        if inner.tickets.values().filter(|t| t.owner == owner).count() >= MAX_OPEN_TICKETS_PER_KEY {
            return Err(UploadRefused::KeyTickets);
        }
        if inner.tickets.len() >= MAX_OPEN_TICKETS {
            return Err(UploadRefused::Tickets);
        }
        let ticket = Ticket {
            upload: upload.id.clone(),
            owner: owner.to_string(),
            expires_at: now + TICKET_TTL.as_millis() as u64,
        };
        inner
            .tickets
            .insert(Sha256::digest(token.as_bytes()).into(), ticket);
        inner.uploads.insert(upload.id.clone(), upload.clone());
        Ok((upload, token))
    }

    /// Takes the open ticket of a PUT token (single use): found by the token's digest, and the
    /// digest compared in constant time.
    pub fn take_ticket(&self, token: &str) -> Option<Upload> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut inner = self.lock();
        expire_tickets(&mut inner, now_ms());
        let (key, t) = inner.tickets.remove_entry(&digest)?;
        if !ct_eq(&key, &digest) {
            return None;
        }
        inner.uploads.remove(&t.upload).filter(|u| !u.complete)
    }

    /// Stores the record of an upload whose bytes are in place, and marks it complete.
    pub fn complete_upload(&self, mut upload: Upload) -> Upload {
        upload.complete = true;
        match serde_json::to_vec(&upload) {
            Ok(bytes) => self.to_disk(Disk::Write {
                path: self.dir.join("uploads").join(format!("{}.json", upload.id)),
                bytes,
                done: None,
            }),
            Err(e) => tracing::error!(id = %upload.id, "cannot serialize the upload: {e}"),
        }
        self.lock()
            .uploads
            .insert(upload.id.clone(), upload.clone());
        upload
    }

    /// A completed upload by id.
    pub fn upload(&self, id: &str) -> Option<Upload> {
        self.lock().uploads.get(id).filter(|u| u.complete).cloned()
    }
}

/// A new upload (not stored until it is complete).
pub fn new_upload(filename: &str, content_type: &str, size: u64, base_url: &str) -> Upload {
    Upload {
        id: new_id(),
        filename: safe_filename(filename),
        content_type: content_type.to_string(),
        size,
        created_at: now_ms(),
        complete: false,
        base_url: base_url.to_string(),
        owner: String::new(),
    }
}

/// A PUT ticket's upload and the single-use secret of its URL.
pub fn new_ticket(
    filename: &str,
    content_type: &str,
    size: u64,
    base_url: &str,
    owner: &str,
) -> (Upload, String) {
    let upload = Upload {
        owner: owner.to_string(),
        ..new_upload(filename, content_type, size, base_url)
    };
    (upload, format!("{}{}", new_id(), new_id()))
}

/// Drops the tickets (and their unfinished uploads) past their expiry.
fn expire_tickets(inner: &mut Inner, now: u64) {
    let expired: Vec<[u8; 32]> = inner
        .tickets
        .iter()
        .filter(|(_, t)| t.expires_at <= now)
        .map(|(d, _)| *d)
        .collect();
    for d in expired {
        if let Some(t) = inner.tickets.remove(&d) {
            if inner.uploads.get(&t.upload).is_some_and(|u| !u.complete) {
                inner.uploads.remove(&t.upload);
            }
        }
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

fn upload_files(dir: &Path, id: &str) -> Vec<PathBuf> {
    ["json", "bin", "part"]
        .iter()
        .map(|ext| dir.join("uploads").join(format!("{id}.{ext}")))
        .collect()
}

fn remove_upload_files(dir: &Path, id: &str) {
    for f in upload_files(dir, id) {
        let _ = std::fs::remove_file(f);
    }
}

/// The `*.json` files of a folder.
fn json_files(p: &Path) -> Result<Vec<PathBuf>, StoreError> {
    Ok(std::fs::read_dir(p)
        .map_err(io_err(p))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect())
}

fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// Moves a record that does not parse to `corrupt/`, so it is neither lost nor retried.
fn move_aside(dir: &Path, path: &Path, why: &str) {
    let corrupt = dir.join("corrupt");
    let to = corrupt.join(path.file_name().unwrap_or_default());
    let moved = std::fs::create_dir_all(&corrupt).and_then(|()| std::fs::rename(path, &to));
    match moved {
        Ok(()) => tracing::warn!(
            "record {} does not parse ({why}); moved to {}",
            path.display(),
            to.display()
        ),
        Err(e) => tracing::warn!(
            "record {} does not parse ({why}) and cannot be moved aside: {e}",
            path.display()
        ),
    }
}

/// The records thread: writes and removes files in the order the changes happened.
fn write_records(rx: std::sync::mpsc::Receiver<Disk>) {
    for op in rx {
        match op {
            Disk::Write { path, bytes, done } => {
                if let Err(e) = write_private(&path, &bytes) {
                    tracing::error!("cannot write {}: {e}", path.display());
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Disk::Remove(paths) => {
                for p in paths {
                    let _ = std::fs::remove_file(p);
                }
            }
            Disk::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Writes a file only its owner can read, atomically: a fresh temporary (mode 0600), synced
/// to disk, then renamed over the target.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", &new_id()[..8]));
    let result = (|| {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let mut f = o.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_bounded_per_owner_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _finished) = Store::open(dir.path(), 4, Arc::default()).unwrap();
        let open = |owner: &str| store.open_ticket("a.png", "image/png", 10, "http://x", owner);
        let mut tokens = vec![];
        for _ in 0..MAX_OPEN_TICKETS_PER_KEY {
            tokens.push(open("a").expect("below the bound").1);
        }
        assert!(matches!(open("a"), Err(UploadRefused::KeyTickets)));
        // one key does not lock the others out
        let (_, other) = open("b").expect("another key");
        // a used ticket frees its place
        assert!(store.take_ticket(&tokens[0]).is_some());
        assert!(open("a").is_ok());
        // unused ones expire after TICKET_TTL
        let later = now_ms() + TICKET_TTL.as_millis() as u64 + 1;
        expire_tickets(&mut store.lock(), later);
        assert!(store.lock().tickets.is_empty());
        assert!(
            store.lock().uploads.is_empty(),
            "their unfinished uploads go too"
        );
        assert!(store.take_ticket(&other).is_none());
    }
}
