//! Test helpers shared by every crate's tests (no candle, so the server's tests can use them):
//! where the repository's fixtures and tiny weights are, and copies of folders.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// The repository root: `SKYREELS_REPO` when set (test binaries run on another machine, see
/// `scripts/gpu_check.sh`), else where these helpers were built.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("SKYREELS_REPO") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests").join("fixtures").join(rel)
}

/// The bundled tiny pipeline, `weights/tiny`.
pub fn tiny_weights() -> PathBuf {
    repo_root().join("weights").join("tiny")
}

/// Copies the folder `src` into `dst` (created), subfolders too; a file `dst` already has is
/// kept (so several folders can be merged into one, the first copy of a name winning).
pub fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap_or_else(|e| panic!("{}: {e}", dst.display()));
    let entries = std::fs::read_dir(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    for entry in entries {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to);
        } else if !to.exists() {
            std::fs::copy(entry.path(), &to)
                .unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
        }
    }
}

/// A copy of the folder `src` in a new temporary folder.
pub fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(src, dir.path());
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_merge_and_keep_what_is_there() {
        let a = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(a.path().join("sub")).unwrap();
        std::fs::write(a.path().join("sub/x"), "a").unwrap();
        std::fs::write(a.path().join("secret"), "first").unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(b.path().join("secret"), "second").unwrap();
        std::fs::write(b.path().join("y"), "b").unwrap();
        let out = copy_dir(a.path());
        copy_tree(b.path(), out.path());
        let read = |p: &str| std::fs::read_to_string(out.path().join(p)).unwrap();
        assert_eq!(
            (read("sub/x"), read("secret"), read("y")),
            ("a".into(), "first".into(), "b".into())
        );
        assert!(fixture("x").ends_with("tests/fixtures/x"));
        assert!(tiny_weights().join("model_index.json").is_file());
    }
}
