//! The tiny random-weight pipeline embedded in the binary (`weights/tiny` at build time),
//! unpacked once into a cache folder named by its content hash.

use std::path::PathBuf;

include!(concat!(env!("OUT_DIR"), "/tiny_files.rs"));

/// FNV-1a over every path and file, so a rebuilt binary with other weights unpacks anew.
fn content_hash() -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for (path, bytes) in TINY_FILES {
        for b in path.bytes().chain(bytes.iter().copied()) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("skyreels")
}

/// The unpacked pipeline folder (written on first use; concurrent callers are safe: each writes
/// a private folder and renames it into place).
pub fn extract() -> std::io::Result<PathBuf> {
    let dir = cache_root().join(format!("tiny-{:016x}", content_hash()));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    for (rel, bytes) in TINY_FILES {
        let path = tmp.join(rel);
        std::fs::create_dir_all(path.parent().expect("files are inside the folder"))?;
        std::fs::write(path, bytes)?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // another process won the race
        Err(_) if dir.join("model_index.json").is_file() => {
            std::fs::remove_dir_all(&tmp).ok();
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}
