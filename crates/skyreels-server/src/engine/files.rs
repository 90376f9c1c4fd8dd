//! The files of the output folder: finished videos (served at `/outputs`), their base64
//! copies, upload bytes and their part files, and how they are written. (The memory backend
//! keeps its records there too; a Redis node uses the same layout as its scratch space, or as
//! the shared folder of `--output-store dir`.)

use super::task::new_id;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot use the output folder {path}: {source}")]
pub struct FolderError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// `map_err` for an I/O failure on `path`.
pub fn folder_err(path: &Path) -> impl FnOnce(std::io::Error) -> FolderError + '_ {
    move |source| FolderError {
        path: path.to_path_buf(),
        source,
    }
}

/// The layout under one folder.
#[derive(Clone, Debug)]
pub struct Paths {
    dir: PathBuf,
}

impl Paths {
    /// The layout under `dir`, creating its folders.
    pub fn create(dir: &Path) -> Result<Self, FolderError> {
        for sub in ["jobs", "uploads", "videos", "base64"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(folder_err(&p))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
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

    /// A finished task's files: its videos and their base64 copies.
    pub fn output_files(&self, outputs: &[String]) -> Vec<PathBuf> {
        outputs
            .iter()
            .flat_map(|f| [self.video_path(f), self.base64_path(f)])
            .collect()
    }
}

/// Removes files, ignoring those already gone.
pub fn remove_files(files: impl IntoIterator<Item = PathBuf>) {
    for f in files {
        let _ = std::fs::remove_file(f);
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
    fn file_names_are_cut_to_a_safe_alphabet() {
        assert_eq!(safe_filename("../../etc/passwd"), "passwd");
        assert_eq!(safe_filename("C:\\a b\\ça.png"), "_a.png");
        assert_eq!(safe_filename("..."), "upload");
        assert_eq!(safe_filename(&"x".repeat(300)).len(), 100);
    }

    #[test]
    fn private_writes_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary left");
        let paths = Paths::create(dir.path()).unwrap();
        assert_eq!(
            paths.output_files(&["v.mp4".into()]),
            [paths.video_path("v.mp4"), paths.base64_path("v.mp4")]
        );
    }
}
