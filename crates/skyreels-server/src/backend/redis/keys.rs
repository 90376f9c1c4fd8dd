//! The key names (prefix `skyreels:`; the module doc of `backend::redis` lists them).

use crate::engine::task::Status;
use crate::engine::{Blob, Priority};

/// The key names.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: &'static str,
}

impl Keys {
    pub(super) fn key(&self, kind: &str, id: &str) -> String {
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
    /// The stream of a model's low-priority tasks (read while its `queue` has none).
    pub fn queue_low(&self, model: &str) -> String {
        self.key("queue_low", model)
    }
    /// The stream a task of `priority` waits on.
    pub fn stream(&self, model: &str, priority: Priority) -> String {
        match priority {
            Priority::Normal => self.queue(model),
            Priority::Low => self.queue_low(model),
        }
    }
    pub(super) fn upload(&self, id: &str) -> String {
        self.key("upload", id)
    }
    /// An upload's bytes (a string, so they can be read in windows).
    pub(super) fn upload_data(&self, id: &str) -> String {
        self.key("upload_data", id)
    }
    pub(super) fn ticket(&self, digest: &str) -> String {
        self.key("ticket", digest)
    }
    pub(super) fn hook(&self, id: &str, status: Status) -> String {
        self.key("hook", &format!("{id}:{}", status.as_str()))
    }
    pub fn waiting(&self) -> String {
        format!("{}waiting", self.prefix)
    }
    pub(super) fn seq(&self) -> String {
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
    pub(super) fn tickets(&self) -> String {
        format!("{}tickets", self.prefix)
    }
    /// Open tickets of one API key (sorted set: digest -> expiry ms).
    pub(super) fn key_tickets(&self, owner: &str) -> String {
        self.key("tickets", owner)
    }
    /// Upload bytes kept per API key (hash: key -> bytes; `*`: all keys).
    pub(super) fn upload_usage(&self) -> String {
        format!("{}upload_usage", self.prefix)
    }
    /// When kept uploads expire (sorted set: `key|id|bytes` -> expiry ms).
    pub(super) fn upload_expiry(&self) -> String {
        format!("{}upload_expiry", self.prefix)
    }
    /// When each model last had a live worker (hash: model id -> ms).
    pub fn models_seen(&self) -> String {
        format!("{}models_seen", self.prefix)
    }
    pub(super) fn secret(&self) -> String {
        format!("{}secret", self.prefix)
    }
}

pub(crate) const KEYS: Keys = Keys {
    prefix: "skyreels:",
};

impl Keys {
    /// The key of a large value.
    pub(super) fn blob(&self, blob: Blob<'_>) -> String {
        match blob {
            Blob::Upload(id) => self.upload_data(id),
            Blob::Output(file) => self.output(file),
        }
    }
}
