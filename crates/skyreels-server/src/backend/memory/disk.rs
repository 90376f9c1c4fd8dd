//! The memory backend's files: the records thread that writes and removes them in the order
//! of the changes, and reading records back at start.

use crate::engine::files::{folder_err, remove_files, write_private, FolderError};
use std::path::{Path, PathBuf};
use tokio::sync::oneshot;

/// A write for the records thread, in the order of the changes.
pub(super) enum Disk {
    Write {
        path: PathBuf,
        bytes: Vec<u8>,
        done: Option<oneshot::Sender<()>>,
    },
    Remove(Vec<PathBuf>),
    Flush(oneshot::Sender<()>),
}

pub(super) fn upload_files(dir: &Path, id: &str) -> Vec<PathBuf> {
    ["json", "bin", "part"]
        .iter()
        .map(|ext| dir.join("uploads").join(format!("{id}.{ext}")))
        .collect()
}

pub(super) fn remove_upload_files(dir: &Path, id: &str) {
    remove_files(upload_files(dir, id));
}

/// The `*.json` files of a folder.
pub(super) fn json_files(p: &Path) -> Result<Vec<PathBuf>, FolderError> {
    Ok(std::fs::read_dir(p)
        .map_err(folder_err(p))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect())
}

pub(super) fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// Moves a record that does not parse to `corrupt/`, so it is neither lost nor retried.
pub(super) fn move_aside(dir: &Path, path: &Path, why: &str) {
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
pub(super) fn write_records(rx: std::sync::mpsc::Receiver<Disk>) {
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
            Disk::Remove(paths) => remove_files(paths),
            Disk::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}
