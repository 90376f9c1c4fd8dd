//! The job store seam: the HTTP layer talks to [`Jobs`] only, whichever engine holds the tasks.
//! `Memory` is the embedded default (one process: records on disk, the queue in memory);
//! `Redis` is the shared engine of a scale-out deployment (any node answers for any task). Each
//! call takes no lock a request handler holds while it waits on disk or the network.

use crate::cluster::Cluster;
use crate::generator::{GenerationRequest, ModelInfo};
use crate::job::{JobRecord, Status, TaskCode};
use crate::store::{AdmitError, CancelResult, Paths, Store, Upload};
use std::sync::Arc;
use std::time::Duration;

/// The engine cannot answer now (Redis unreachable): 503 for the client, retried by nodes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Why an upload (or an upload ticket) was not taken.
#[derive(Debug, thiserror::Error)]
pub enum UploadRefused {
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error("too many upload tickets are open; send or let some expire first")]
    Tickets,
    #[error(
        "this API key has {} upload tickets open; send them or let them expire (after {} minutes)",
        crate::store::MAX_OPEN_TICKETS_PER_KEY,
        crate::store::TICKET_TTL.as_secs() / 60
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

/// What `/metrics` reports of the tasks.
#[derive(Debug, Default)]
pub struct Overview {
    /// Tasks by status (the in-memory engine; Redis keeps no cluster-wide count).
    pub jobs: Vec<(Status, usize)>,
    /// Tasks waiting to start, per model (every known model, 0 when none waits).
    pub waiting: Vec<(String, usize)>,
    /// Live workers per model (this process's loaded ones in memory mode).
    pub workers: Vec<(String, usize)>,
}

/// Where tasks, the queue, uploads and outputs live.
pub enum Jobs {
    Memory(Arc<Store>),
    Redis(Arc<Cluster>),
}

impl Jobs {
    /// The local file layout (the output folder; scratch space in Redis mode).
    pub fn paths(&self) -> &Paths {
        match self {
            Jobs::Memory(s) => s.paths(),
            Jobs::Redis(c) => c.paths(),
        }
    }

    /// Outputs are files under [`Paths::video_dir`] (else bytes in Redis).
    pub fn outputs_on_disk(&self) -> bool {
        match self {
            Jobs::Memory(_) => true,
            Jobs::Redis(c) => c.outputs_on_disk(),
        }
    }

    pub fn is_draining(&self) -> bool {
        match self {
            Jobs::Memory(s) => s.is_draining(),
            Jobs::Redis(c) => c.is_draining(),
        }
    }

    /// Stops admitting and starting tasks on this node (memory: unstarted tasks fail with
    /// 5003; Redis: they stay queued for the other workers).
    pub fn drain(&self) {
        match self {
            Jobs::Memory(s) => s.drain(),
            Jobs::Redis(c) => c.drain(),
        }
    }

    /// Asks this node's running tasks to stop at their next step (memory: they end cancelled;
    /// Redis: they are left to be claimed by another worker).
    pub fn cancel_running(&self) {
        match self {
            Jobs::Memory(s) => s.cancel_running(),
            Jobs::Redis(c) => c.stop_running(),
        }
    }

    /// Resolves once every change so far is written.
    pub async fn flushed(&self) {
        if let Jobs::Memory(s) = self {
            s.flushed().await;
        }
    }

    /// The models a submit may name: loaded here (memory), or announced by any worker (Redis;
    /// a task for a model with no live worker waits for one). `None` while none is known.
    pub async fn models(
        &self,
        loaded: Option<&Vec<ModelInfo>>,
    ) -> Result<Option<Vec<ModelInfo>>, Unavailable> {
        match self {
            Jobs::Memory(_) => Ok(loaded.cloned()),
            Jobs::Redis(c) => {
                let known = c.known_models().await?;
                Ok((!known.is_empty()).then_some(known))
            }
        }
    }

    /// Accepts a new task (status created) once its record is stored.
    pub async fn admit(&self, record: JobRecord) -> Result<(), AdmitError> {
        match self {
            Jobs::Memory(s) => {
                let (_, written) = s.admit(record)?;
                let _ = written.await;
                Ok(())
            }
            Jobs::Redis(c) => c.admit(record).await,
        }
    }

    /// Waits up to `limit` for the task to finish; whether it did.
    pub async fn wait_finished(&self, id: &str, limit: Duration) -> bool {
        match self {
            Jobs::Memory(s) => match s.watch(id) {
                Some(mut w) => tokio::time::timeout(limit, w.wait_for(|st| st.is_finished()))
                    .await
                    .is_ok_and(|r| r.is_ok()),
                None => true,
            },
            Jobs::Redis(c) => c.wait_finished(id, limit).await,
        }
    }

    /// Whether queued tasks keep their image as it came (compressed; fitted by the worker)
    /// rather than fitted pixels: Redis, where queued inputs take shared memory.
    pub fn queues_source_images(&self) -> bool {
        matches!(self, Jobs::Redis(_))
    }

    /// Its input is ready: a worker may take it. `source`: the image's bytes as they came
    /// (with [`Jobs::queues_source_images`]; else the request holds the fitted image).
    pub async fn enqueue(&self, id: &str, request: GenerationRequest, source: Option<Vec<u8>>) {
        match self {
            Jobs::Memory(s) => s.enqueue(id, request),
            Jobs::Redis(c) => c.enqueue(id, request, source).await,
        }
    }

    /// Fails a task that has not started (its input could not be prepared).
    pub async fn fail_unstarted(&self, id: &str, code: TaskCode, error: String) {
        match self {
            Jobs::Memory(s) => s.fail_unstarted(id, code, error),
            Jobs::Redis(c) => c.fail_unstarted(id, code, error).await,
        }
    }

    /// A task's record and, while it waits, its queue position.
    pub async fn get(&self, id: &str) -> Result<Option<(JobRecord, Option<usize>)>, Unavailable> {
        match self {
            Jobs::Memory(s) => Ok(s.get(id)),
            Jobs::Redis(c) => c.get(id).await,
        }
    }

    /// `DELETE`: dequeue, cancel or delete (answered once a deleted task's files are gone).
    pub async fn cancel_or_delete(&self, id: &str) -> Result<Option<CancelResult>, Unavailable> {
        match self {
            Jobs::Memory(s) => {
                let r = s.cancel_or_delete(id);
                if matches!(r, Some(CancelResult::Deleted)) {
                    s.flushed().await;
                }
                Ok(r)
            }
            Jobs::Redis(c) => c.cancel_or_delete(id).await,
        }
    }

    pub async fn overview(&self, loaded: Option<&Vec<ModelInfo>>, workers: usize) -> Overview {
        match self {
            Jobs::Memory(s) => {
                let Overview { jobs, waiting, .. } = s.counts();
                let mut waiting: std::collections::BTreeMap<String, usize> =
                    waiting.into_iter().collect();
                for m in loaded.into_iter().flatten() {
                    waiting.entry(m.id.clone()).or_default();
                }
                let waiting = waiting.into_iter().collect();
                let workers = loaded
                    .into_iter()
                    .flatten()
                    .map(|m| (m.id.clone(), workers))
                    .collect();
                Overview {
                    jobs,
                    waiting,
                    workers,
                }
            }
            Jobs::Redis(c) => c.overview().await.unwrap_or_default(),
        }
    }

    /// A completed upload by id.
    pub async fn upload(&self, id: &str) -> Result<Option<Upload>, Unavailable> {
        match self {
            Jobs::Memory(s) => Ok(s.upload(id)),
            Jobs::Redis(c) => c.upload(id).await,
        }
    }

    /// A completed upload's bytes.
    pub async fn upload_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, Unavailable> {
        match self {
            Jobs::Memory(s) => Ok(tokio::fs::read(s.paths().upload_data_path(id)).await.ok()),
            Jobs::Redis(c) => c.upload_bytes(id).await,
        }
    }

    /// Stores an upload whose checked bytes are at [`Paths::upload_data_path`], complete (in
    /// Redis, within its owner's and the cluster's quotas).
    pub async fn complete_upload(&self, upload: Upload) -> Result<Upload, UploadRefused> {
        match self {
            Jobs::Memory(s) => Ok(s.complete_upload(upload)),
            Jobs::Redis(c) => c.complete_upload(upload).await,
        }
    }

    /// Opens a PUT ticket for `owner` (refused when too many are open, in all or the owner's).
    pub async fn open_ticket(
        &self,
        filename: &str,
        content_type: &str,
        size: u64,
        base_url: &str,
        owner: &str,
    ) -> Result<(Upload, String), UploadRefused> {
        match self {
            Jobs::Memory(s) => s.open_ticket(filename, content_type, size, base_url, owner),
            Jobs::Redis(c) => {
                c.open_ticket(filename, content_type, size, base_url, owner)
                    .await
            }
        }
    }

    /// Takes the open ticket of a PUT token (single use).
    pub async fn take_ticket(&self, token: &str) -> Result<Option<Upload>, Unavailable> {
        match self {
            Jobs::Memory(s) => Ok(s.take_ticket(token)),
            Jobs::Redis(c) => c.take_ticket(token).await,
        }
    }

    /// A finished video's data: URI.
    pub async fn output_base64(&self, file: &str) -> Option<String> {
        match self {
            Jobs::Memory(s) => read_base64(s.paths(), file).await,
            Jobs::Redis(c) => c.output_base64(file).await,
        }
    }

    /// Whether this node delivers the webhook of this terminal state (the Redis-side guard
    /// makes it once per task and state across the cluster).
    pub async fn claim_webhook(&self, record: &JobRecord) -> bool {
        match self {
            Jobs::Memory(_) => true,
            Jobs::Redis(c) => c.claim_webhook(record).await,
        }
    }
}

/// The base64 copy the worker wrote once when the task completed.
pub(crate) async fn read_base64(paths: &Paths, file: &str) -> Option<String> {
    match tokio::fs::read_to_string(paths.base64_path(file)).await {
        Ok(text) => Some(text),
        Err(e) => {
            tracing::error!("cannot read the base64 copy of {file}: {e}");
            None
        }
    }
}
