//! Uploads and the PUT tickets that bring them: their record, their owner, and the bounds on
//! open tickets.

use super::files;
use super::task::{hex, new_id, now_ms};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// PUT tickets open at once, at most (each is a little memory until it expires).
pub const MAX_OPEN_TICKETS: usize = 1024;
/// PUT tickets one API key may hold open at once (one key cannot lock the others out).
pub const MAX_OPEN_TICKETS_PER_KEY: usize = 64;
/// A PUT ticket not used within this long expires.
pub const TICKET_TTL: Duration = Duration::from_secs(600);
/// The owner of uploads made without an API key (no keys configured).
pub const ANONYMOUS: &str = "anonymous";
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
    hex(&Sha256::digest(token.as_bytes()))
}
