//! Why the engine, an admission or an upload was refused, and what DELETE did.

use super::uploads::{MAX_OPEN_TICKETS_PER_KEY, TICKET_TTL};

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
