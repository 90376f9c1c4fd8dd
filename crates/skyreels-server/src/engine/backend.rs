//! What the engine asks of a storage backend: primitives only (store, compare and set, queue,
//! lease). Every rule about tasks (which changes are legal, what DELETE does, when a task
//! counts as finished, what a worker does with a lease) is the engine's; a backend implements
//! these two traits and nothing else. (In the spirit of apalis' storage trait: a backend
//! consumes, acknowledges and keeps alive; it does not decide.)

use super::task::{JobRecord, Outcome};
use super::{Content, EngineError, Priority, Queued, Unstartable, UploadRefused};
use super::{Overview, Upload};
use crate::generator::{Input, ModelInfo};
use std::path::Path;
use std::time::Duration;

/// One engine's storage (the API side: async, called from request handlers).
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// Tasks outlive this process: other nodes and workers share them, so a node that shuts
    /// down leaves its queued and running tasks to the others (instead of failing them), and a
    /// queued task keeps its image as it came (compressed; see [`Queued`]).
    fn shared(&self) -> bool;

    /// Finished videos are files under [`super::Paths::video_dir`] (else [`Content`] of
    /// [`Blob::Output`](super::Blob)).
    fn outputs_on_disk(&self) -> bool;

    /// The local file layout (the output folder; scratch space of a shared backend).
    fn paths(&self) -> &super::Paths;

    /// The models workers announced (`None`: the backend does not know them; the process's
    /// own loaded models are the ones).
    async fn models(&self) -> Result<Option<Vec<ModelInfo>>, EngineError>;

    /// Live workers per model (`None`: the process's own).
    async fn live_workers(&self) -> Result<Option<Vec<(String, usize)>>, EngineError>;

    /// Stores a new task (status created) unless `max_queue` tasks wait; once stored, it
    /// survives a crash. `false`: the queue is full.
    async fn admit(&self, record: &JobRecord, max_queue: usize) -> Result<bool, EngineError>;

    /// Hands a created task's input to the queue (nothing when it no longer waits).
    async fn enqueue(&self, id: &str, model: &str, input: &Queued) -> Result<(), EngineError>;

    /// A task's record and, while it waits, its queue position.
    async fn get(&self, id: &str) -> Result<Option<(JobRecord, Option<usize>)>, EngineError>;

    /// Compare and set: replaces the record `from` with `to` if the task's status is still
    /// `from.status`. Leaving `created` takes it off the queue; a change to an outcome drops
    /// its input and starts its retention; `deleted` drops the outputs `from` lists where the
    /// backend stores them. Whether it was replaced. A committed change to an outcome is told
    /// to the [`Hook`](super::Hook) before this returns.
    async fn replace(&self, from: &JobRecord, to: &JobRecord) -> Result<bool, EngineError>;

    /// Asks the worker running the task to stop at its next step.
    async fn request_cancel(&self, id: &str) -> Result<(), EngineError>;

    /// Waits up to `limit` for the task to finish; whether it did (or is gone).
    async fn wait_finished(&self, id: &str, limit: Duration) -> Result<bool, EngineError>;

    /// Waits up to `limit` for the task's status or step to differ from `seen` (or for it to
    /// be gone); returns at once when they already differ.
    async fn wait_change(&self, id: &str, seen: Mark, limit: Duration) -> Result<(), EngineError>;

    /// Tasks by status (where the backend keeps count) and waiting per model.
    async fn overview(&self) -> Result<Overview, EngineError>;

    /// Stores a checked upload whose bytes are in `bytes` (the file is the backend's now),
    /// within the backend's quotas.
    async fn store_upload(&self, upload: &Upload, bytes: &Path) -> Result<(), UploadRefused>;

    /// A stored upload (complete or an open ticket's) by id.
    async fn upload(&self, id: &str) -> Result<Option<Upload>, EngineError>;

    /// Keeps an open ticket, found later by the digest of its token, within the bounds on
    /// open tickets (in all and per owner).
    async fn open_ticket(&self, upload: &Upload, digest: &str) -> Result<(), UploadRefused>;

    /// Takes the ticket of a token digest (single use).
    async fn take_ticket(&self, digest: &str) -> Result<Option<Upload>, EngineError>;

    /// A stored large value (an upload's bytes, a finished video).
    async fn content(&self, blob: super::Blob<'_>) -> Result<Option<Content>, EngineError>;

    /// Whether this process delivers the webhook of this record's state (a shared backend
    /// makes it once per task and state across the nodes).
    async fn claim_webhook(&self, record: &JobRecord) -> bool;

    /// Stops admitting tasks; the ids of the queued tasks that will now never start (those of
    /// a backend that is not shared: their queue ends with the process).
    fn close(&self) -> Vec<String>;

    /// Resolves once every change so far is durable.
    async fn flushed(&self);

    /// Periodic upkeep (retention, expired tickets, dead workers); the waiting tasks that can
    /// no longer start, with the reason: past their deadline, or (`stalled`: a task not queued
    /// this long after its admission was abandoned by the node preparing its input) others.
    async fn sweep(&self, stalled: Duration) -> Result<Vec<Unstartable>, EngineError>;

    /// The webhook secret every node uses: `mine` where the backend keeps none (or, `force`,
    /// always).
    async fn sync_secret(&self, mine: &str, force: bool) -> Result<String, EngineError>;

    /// A problem with the backend's setup worth a warning at start.
    async fn setup_problem(&self) -> Option<String>;

    /// The task source of one worker serving `models` (its own connection, heartbeat...).
    fn consumer(&self, models: &[ModelInfo], index: usize) -> Box<dyn Consumer>;
}

/// Where a task is: its status and denoising steps done (what live progress follows).
pub type Mark = (super::task::Status, usize);

/// A task a worker took: what to run, or how to end it without running.
pub struct Lease {
    pub id: String,
    pub model: String,
    /// 1 for the first start; more after the workers of earlier attempts stopped.
    pub attempt: u32,
    /// The record asks for base64 outputs.
    pub base64_output: bool,
    /// The record asks for the safety checker (`enable_safety_checker`).
    pub safety_check: bool,
    /// The queue it was taken from.
    pub priority: Priority,
    /// Its deadline (ms since the epoch): the worker stops it there.
    pub cancel_at: Option<u64>,
    /// The input (image decoded and fitted), or the outcome the task ends with unrun (its
    /// input is gone or corrupt, or too many attempts were made).
    pub input: Result<Input, Outcome>,
    /// The backend's handle of the lease (a stream entry).
    pub handle: String,
}

/// What a backend answers to a running task's step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    GoOn,
    /// `DELETE` asked it to stop: it ends cancelled.
    CancelAsked,
    /// The task is no longer this worker's (another one took it over): stop, write nothing.
    Lost,
}

/// One worker's task source (the worker side: synchronous, on the worker's thread).
pub trait Consumer: Send {
    /// The next task to run, waiting a little (about a second) for one: a normal task of the
    /// worker's models first, a low one only while none waits. A waiting task whose deadline
    /// passed is not started: it fails (5005) and the next one is looked for.
    fn take(&mut self) -> Result<Option<Lease>, EngineError>;

    /// A running task's step (stored where clients read it).
    fn progress(&mut self, lease: &Lease, step: usize, total: usize) -> Verdict;

    /// Ends a started task with `outcome` (its video at `video` when completed) if this attempt
    /// still owns it; whether it did (`false`: the task ended otherwise first). A committed
    /// outcome is told to the [`Hook`](super::Hook).
    fn finish(
        &mut self,
        lease: &Lease,
        outcome: &Outcome,
        video: &Path,
    ) -> Result<bool, EngineError>;

    /// Gives the task up without an outcome (another worker takes it over).
    fn abandon(&mut self, lease: &Lease);
}
