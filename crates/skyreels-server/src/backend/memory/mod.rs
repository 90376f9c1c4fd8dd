//! The in-memory backend of one process: records, the queue (normal tasks in admission
//! order, then low ones), uploads and tickets in
//! memory, each record persisted as a JSON file in the output folder (reloaded at start: what
//! was finished keeps being served, what was not becomes failed 5003).
//!
//! One mutex guards the state (every critical section is short and does no I/O: records are
//! serialized under it, compactly, and written by the records thread in the order they
//! changed); workers wait on a condition variable, HTTP handlers on per-task `watch` channels.

use crate::engine::files::{folder_err, FolderError, Paths};
use crate::engine::task::{now_ms, JobRecord, Outcome, Status, TaskCode};
use crate::engine::{
    Backend, Blob, Consumer, Content, EngineError, Hook, Mark, ModelInfo, Overview, Priority,
    Queued, Unstartable, Upload, UploadRefused, MAX_OPEN_TICKETS, MAX_OPEN_TICKETS_PER_KEY,
    TICKET_TTL,
};
use disk::{
    json_files, move_aside, read_record, remove_upload_files, upload_files, write_records, Disk,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

mod consumer;
mod disk;

struct Job {
    record: JobRecord,
    /// Its input, once prepared and until a worker takes it.
    input: Option<Queued>,
    /// `DELETE` asked the running task to stop.
    cancel_asked: bool,
    /// Its status and step, for those waiting on it (result waits, event streams).
    watch: watch::Sender<Mark>,
}

/// An open PUT ticket.
struct Ticket {
    upload: String,
    owner: String,
    expires_at: u64,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, Job>,
    /// Unstarted jobs: the normal ones in arrival order, then the low ones (their inputs may
    /// still be being prepared). Positions and the take order are this order.
    queue: VecDeque<String>,
    /// Completed uploads, and open tickets' (not complete).
    uploads: HashMap<String, Upload>,
    /// Open tickets by the digest of their token.
    tickets: HashMap<String, Ticket>,
    /// No longer admitting or starting tasks.
    closed: bool,
}

struct Store {
    inner: Mutex<Inner>,
    work: Condvar,
    paths: Paths,
    /// Finished tasks and uploads are removed this long after they finish (0: kept).
    retention_ms: u64,
    hook: Arc<Hook>,
    disk: std::sync::mpsc::Sender<Disk>,
}

/// The in-memory backend (see the module doc).
#[derive(Clone)]
pub struct Memory(Arc<Store>);

impl Memory {
    /// Opens (creating) the output folder and reloads its records: finished tasks keep being
    /// served; tasks that were queued or running when the server stopped become failed (5003).
    /// Records that do not parse move to `corrupt/` (with a warning); files no record owns
    /// (videos, upload bytes, half-written temporaries) are removed.
    pub fn open(
        dir: &Path,
        retention: Option<Duration>,
        hook: Arc<Hook>,
    ) -> Result<Self, FolderError> {
        let paths = Paths::create(dir)?;
        let (disk, disk_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("skyreels-records".into())
            .spawn(move || write_records(disk_rx))
            .map_err(folder_err(dir))?;
        let store = Store {
            inner: Mutex::new(Inner::default()),
            work: Condvar::new(),
            paths,
            retention_ms: retention.map_or(0, |r| r.as_millis() as u64),
            hook,
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
            for entry in std::fs::read_dir(&p).map_err(folder_err(&p))?.flatten() {
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
        Ok(Memory(Arc::new(store)))
    }
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panic while holding the lock cannot leave it half-updated in a way worse than
        // refusing service: keep going with the data
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn to_disk(&self, op: Disk) {
        if self.disk.send(op).is_err() {
            tracing::error!("the records thread stopped: a record was not written");
        }
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.paths.dir().join("jobs").join(format!("{id}.json"))
    }

    /// Queues the record's write (compact JSON, serialized here, written by the records
    /// thread); `done` is told once it is on disk.
    fn persist(&self, record: &JobRecord, done: Option<oneshot::Sender<()>>) {
        match serde_json::to_vec(record) {
            Ok(bytes) => self.to_disk(Disk::Write {
                path: self.record_path(&record.id),
                bytes,
                done,
            }),
            Err(e) => tracing::error!(id = %record.id, "cannot serialize the record: {e}"),
        }
    }

    /// Changes a job; when its status moved, persists it, tells its watchers and, for an
    /// outcome, the hook (under the lock: whoever sees the status sees it counted).
    fn commit(&self, inner: &mut Inner, id: &str, f: impl FnOnce(&mut JobRecord)) {
        let Some(job) = inner.jobs.get_mut(id) else {
            return;
        };
        let before = job.record.status;
        f(&mut job.record);
        if job.record.status != before {
            self.persist(&job.record, None);
            job.watch.send_replace((job.record.status, job.record.step));
            if job.record.status.is_finished() {
                job.input = None;
            }
            self.hook.committed(&job.record);
        }
    }

    /// Removes finished tasks (and their files) and uploads past the retention.
    fn sweep(&self) -> usize {
        if self.retention_ms == 0 {
            return 0;
        }
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
                        .saturating_add(self.retention_ms)
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
            .filter(|u| u.created_at.saturating_add(self.retention_ms) <= now)
            .map(|u| u.id.clone())
            .collect();
        for id in &old_uploads {
            inner.uploads.remove(id);
        }
        inner
            .tickets
            .retain(|_, t| old_uploads.iter().all(|id| *id != t.upload));
        expire_tickets(&mut inner, now);
        drop(inner);
        let mut files = vec![];
        for r in &old {
            files.extend(self.paths.output_files(&r.outputs));
            files.push(self.record_path(&r.id));
        }
        for id in &old_uploads {
            files.extend(upload_files(self.paths.dir(), id));
        }
        self.to_disk(Disk::Remove(files));
        old.len() + old_uploads.len()
    }
}

#[async_trait::async_trait]
impl Backend for Memory {
    fn shared(&self) -> bool {
        false
    }

    fn outputs_on_disk(&self) -> bool {
        true
    }

    fn paths(&self) -> &Paths {
        &self.0.paths
    }

    async fn models(&self) -> Result<Option<Vec<ModelInfo>>, EngineError> {
        Ok(None)
    }

    async fn live_workers(&self) -> Result<Option<Vec<(String, usize)>>, EngineError> {
        Ok(None)
    }

    async fn admit(&self, record: &JobRecord, max_queue: usize) -> Result<bool, EngineError> {
        let written = {
            let mut inner = self.0.lock();
            if inner.closed {
                return Err(EngineError::Closed);
            }
            // the queue holds exactly the unstarted (created) tasks
            if inner.queue.len() >= max_queue {
                return Ok(false);
            }
            let (done, written) = oneshot::channel();
            self.0.persist(record, Some(done));
            // a normal task goes ahead of every low one
            let low = |id: &String| {
                let j = inner.jobs.get(id);
                j.is_some_and(|j| j.record.priority == Priority::Low)
            };
            let place = match record.priority {
                Priority::Normal => inner.queue.iter().position(low),
                Priority::Low => None,
            };
            let place = place.unwrap_or(inner.queue.len());
            inner.queue.insert(place, record.id.clone());
            insert(&mut inner, record.clone());
            written
        };
        let _ = written.await;
        Ok(true)
    }

    async fn enqueue(&self, id: &str, _model: &str, input: &Queued) -> Result<(), EngineError> {
        let mut inner = self.0.lock();
        if let Some(job) = inner
            .jobs
            .get_mut(id)
            .filter(|j| j.record.status == Status::Created)
        {
            job.input = Some(input.clone());
            drop(inner);
            self.0.work.notify_all();
        }
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<(JobRecord, Option<usize>)>, EngineError> {
        let inner = self.0.lock();
        let Some(job) = inner.jobs.get(id) else {
            return Ok(None);
        };
        let position = (job.record.status == Status::Created)
            .then(|| inner.queue.iter().position(|q| q == id).unwrap_or_default());
        Ok(Some((job.record.clone(), position)))
    }

    async fn replace(&self, from: &JobRecord, to: &JobRecord) -> Result<bool, EngineError> {
        let mut inner = self.0.lock();
        match inner.jobs.get(&from.id) {
            Some(job) if job.record.status == from.status => {}
            _ => return Ok(false),
        }
        if from.status == Status::Created && to.status != Status::Created {
            inner.queue.retain(|q| *q != from.id);
        }
        self.0.commit(&mut inner, &from.id, |r| *r = to.clone());
        Ok(true)
    }

    async fn request_cancel(&self, id: &str) -> Result<(), EngineError> {
        if let Some(job) = self.0.lock().jobs.get_mut(id) {
            job.cancel_asked = true;
        }
        Ok(())
    }

    async fn wait_finished(&self, id: &str, limit: Duration) -> Result<bool, EngineError> {
        let watch = self.0.lock().jobs.get(id).map(|j| j.watch.subscribe());
        let Some(mut w) = watch else {
            return Ok(true);
        };
        Ok(
            tokio::time::timeout(limit, w.wait_for(|(st, _)| st.is_finished()))
                .await
                .is_ok_and(|r| r.is_ok()),
        )
    }

    async fn wait_change(&self, id: &str, seen: Mark, limit: Duration) -> Result<(), EngineError> {
        let watch = self.0.lock().jobs.get(id).map(|j| j.watch.subscribe());
        if let Some(mut w) = watch {
            let _ = tokio::time::timeout(limit, w.wait_for(|m| *m != seen)).await;
        }
        Ok(())
    }

    async fn overview(&self) -> Result<Overview, EngineError> {
        let inner = self.0.lock();
        let mut jobs: HashMap<Status, usize> = Status::ALL.iter().map(|s| (*s, 0)).collect();
        for j in inner.jobs.values() {
            *jobs.entry(j.record.status).or_default() += 1;
        }
        let mut waiting = BTreeMap::<String, usize>::new();
        for job in inner.queue.iter().filter_map(|id| inner.jobs.get(id)) {
            *waiting.entry(job.record.model.clone()).or_default() += 1;
        }
        Ok(Overview {
            jobs: Status::ALL.iter().map(|s| (s.as_str(), jobs[s])).collect(),
            waiting: waiting.into_iter().collect(),
            workers: vec![],
        })
    }

    async fn store_upload(&self, upload: &Upload, _bytes: &Path) -> Result<(), UploadRefused> {
        // the bytes are in place (this backend's uploads live at upload_data_path)
        match serde_json::to_vec(upload) {
            Ok(bytes) => self.0.to_disk(Disk::Write {
                path: self
                    .0
                    .paths
                    .dir()
                    .join("uploads")
                    .join(format!("{}.json", upload.id)),
                bytes,
                done: None,
            }),
            Err(e) => tracing::error!(id = %upload.id, "cannot serialize the upload: {e}"),
        }
        self.0
            .lock()
            .uploads
            .insert(upload.id.clone(), upload.clone());
        Ok(())
    }

    async fn upload(&self, id: &str) -> Result<Option<Upload>, EngineError> {
        Ok(self.0.lock().uploads.get(id).cloned())
    }

    async fn open_ticket(&self, upload: &Upload, digest: &str) -> Result<(), UploadRefused> {
        let now = now_ms();
        let mut inner = self.0.lock();
        expire_tickets(&mut inner, now);
        let owner = upload.owner();
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
        inner.tickets.insert(digest.to_string(), ticket);
        inner.uploads.insert(upload.id.clone(), upload.clone());
        Ok(())
    }

    async fn take_ticket(&self, digest: &str) -> Result<Option<Upload>, EngineError> {
        let mut inner = self.0.lock();
        expire_tickets(&mut inner, now_ms());
        let Some(t) = inner.tickets.remove(digest) else {
            return Ok(None);
        };
        Ok(inner.uploads.remove(&t.upload))
    }

    async fn content(&self, blob: Blob<'_>) -> Result<Option<Content>, EngineError> {
        let path = match blob {
            Blob::Upload(id) => {
                let complete = self.0.lock().uploads.get(id).is_some_and(|u| u.complete);
                if !complete {
                    return Ok(None);
                }
                self.0.paths.upload_data_path(id)
            }
            Blob::Output(file) => self.0.paths.video_path(file),
        };
        Ok(path.is_file().then_some(Content::File(path)))
    }

    async fn claim_webhook(&self, _record: &JobRecord) -> bool {
        true
    }

    fn close(&self) -> Vec<String> {
        let mut inner = self.0.lock();
        inner.closed = true;
        let waiting = inner.queue.iter().cloned().collect();
        drop(inner);
        self.0.work.notify_all();
        waiting
    }

    async fn flushed(&self) {
        let (tx, rx) = oneshot::channel();
        self.0.to_disk(Disk::Flush(tx));
        let _ = rx.await;
    }

    /// Retention, and the waiting tasks past their deadline (a task here never stalls: its
    /// input is prepared in this process).
    async fn sweep(&self, _stalled: Duration) -> Result<Vec<Unstartable>, EngineError> {
        let store = self.0.clone();
        let removed = tokio::task::spawn_blocking(move || store.sweep())
            .await
            .map_err(|_| EngineError::Closed)?;
        if removed > 0 {
            tracing::info!("retention: removed {removed} expired tasks and uploads");
        }
        let now = now_ms();
        let inner = self.0.lock();
        let late = inner.queue.iter().filter_map(|id| inner.jobs.get(id));
        Ok(late
            .filter(|j| j.record.is_past_deadline(now))
            .map(|j| Unstartable::past_deadline(&j.record))
            .collect())
    }

    async fn sync_secret(&self, mine: &str, _force: bool) -> Result<String, EngineError> {
        Ok(mine.to_string())
    }

    async fn setup_problem(&self) -> Option<String> {
        None
    }

    fn consumer(&self, _models: &[ModelInfo], _index: usize) -> Box<dyn Consumer> {
        Box::new(self.clone())
    }
}

/// Drops the tickets (and their unfinished uploads) past their expiry.
fn expire_tickets(inner: &mut Inner, now: u64) {
    let expired: Vec<String> = inner
        .tickets
        .iter()
        .filter(|(_, t)| t.expires_at <= now)
        .map(|(d, _)| d.clone())
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
fn insert(inner: &mut Inner, record: JobRecord) {
    let (watch, _) = watch::channel((record.status, record.step));
    inner.jobs.insert(
        record.id.clone(),
        Job {
            record,
            input: None,
            cancel_asked: false,
            watch,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_tickets_take_their_unfinished_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let (hook, _finished) = Hook::new(Arc::default());
        let m = Memory::open(dir.path(), None, hook).unwrap();
        let upload = Upload::new("a.png", "image/png", 10, "http://x");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(m.open_ticket(&upload, "d1")).unwrap();
        let later = now_ms() + TICKET_TTL.as_millis() as u64 + 1;
        expire_tickets(&mut m.0.lock(), later);
        assert!(m.0.lock().tickets.is_empty());
        assert!(
            m.0.lock().uploads.is_empty(),
            "their unfinished uploads go too"
        );
        assert!(rt.block_on(m.take_ticket("d1")).unwrap().is_none());
    }
}
