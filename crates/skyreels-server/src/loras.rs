//! A request's LoRAs: what each `path` names and where its file is. Three forms, told apart by
//! their text:
//!
//! - an http(s) URL (`http://` or `https://`, any case): downloaded through the image address
//!   policy, at most `--max-lora-mb`, into `<output dir>/loras/<sha256 of the URL>.safetensors`
//!   (written to a temporary and renamed, so a reader never sees half a file); a later request
//!   for the same URL uses that file and downloads nothing. `--no-lora-urls` refuses URLs.
//! - a hub file `OWNER/REPO/FILE.safetensors` (a Hugging Face repository id, then a path in it
//!   ending in `.safetensors`): handed to the generator, which fetches it into its hub cache.
//! - a name: a file of `--lora-dir`, `.safetensors` appended unless the name ends with it. A
//!   name is one path component: no `/` or `\`, not `.` or `..`, no leading `.`, no control
//!   characters.
//!
//! The submit checks what it can know early ([`Loras::precheck`]: the form, `--no-lora-urls`,
//! a literal internal address, a name missing from `--lora-dir`); the worker that takes the
//! task resolves the paths on its own disk ([`Loras::resolve`]) before its generator runs.
//! Every error names the LoRA (its index and its path; a URL without credentials or query).

use crate::generator::LoraSource;
use crate::media;
use sha2::{Digest, Sha256};
use skyreels_params::LoraSpec;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `--max-lora-mb`'s default.
pub const DEFAULT_MAX_LORA_MB: u64 = 1024;
/// `--lora-cache-mb`'s default: parsed adapters the generator keeps in memory.
pub const DEFAULT_LORA_CACHE_MB: u64 = 1024;
/// A LoRA download that moves no byte for this long fails.
pub const DOWNLOAD_STALL: Duration = Duration::from_secs(60);
/// The extension of every LoRA file.
pub const EXTENSION: &str = ".safetensors";

/// What a server is told about LoRAs at start-up.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Most LoRAs in one request (`--max-loras`; 0 refuses them).
    pub max: usize,
    /// The folder whose files requests may name (`--lora-dir`); `None`: names are refused.
    pub dir: Option<PathBuf>,
    /// Largest LoRA download, in bytes (`--max-lora-mb`).
    pub max_download_bytes: u64,
    /// http(s) URLs are accepted (`--no-lora-urls` turns this off).
    pub urls: bool,
    /// Bytes of parsed adapters the generator keeps in memory (`--lora-cache-mb`): read by
    /// the generator's setup (the CLI's), not by the server.
    pub cache_bytes: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            max: skyreels_params::MAX_LORAS,
            dir: None,
            max_download_bytes: DEFAULT_MAX_LORA_MB << 20,
            urls: true,
            cache_bytes: DEFAULT_LORA_CACHE_MB << 20,
        }
    }
}

/// What a LoRA's `path` names.
#[derive(Clone, Debug, PartialEq)]
enum LoraPath {
    /// A file name in `--lora-dir`, with its extension.
    Name(String),
    Url(url::Url),
    Hub {
        repo: String,
        file: String,
    },
}

/// What a LoRA path names on this server.
enum Target {
    /// A file of `--lora-dir`.
    Named {
        name: String,
        file: PathBuf,
    },
    Url(url::Url),
    Hub {
        repo: String,
        file: String,
    },
}

/// Why a LoRA cannot be used, naming it.
#[derive(Debug, thiserror::Error)]
#[error("loras[{index}] {shown}: {reason}")]
pub struct LoraError {
    /// Its position in the request's `loras`.
    pub index: usize,
    /// Its path as it may be shown (a URL without credentials or query).
    pub shown: String,
    pub reason: String,
    pub kind: LoraErrorKind,
}

/// What kind of failure a [`LoraError`] is (the worker's task code follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraErrorKind {
    /// The path breaks a rule or names nothing: a bad request (1401).
    Invalid,
    /// The URL could not be fetched, or is too large: media access failed (1402).
    Download,
    /// This server could not keep the download (its disk): execution failed (1403).
    Storage,
}

impl LoraError {
    /// The message without the `loras` prefix, for a 400 that names the field.
    pub fn rule(&self) -> String {
        format!("[{}] {}: {}", self.index, self.shown, self.reason)
    }
}

/// A LoRA path as it may be shown in errors, logs and labels, quoted: a URL without
/// credentials or query.
pub fn shown(path: &str) -> String {
    match parse(path) {
        Ok(LoraPath::Url(u)) => format!("{:?}", media::display_url(&u)),
        _ => format!("{path:?}"),
    }
}

/// The form of a LoRA path (see the module's rules).
fn parse(path: &str) -> Result<LoraPath, String> {
    if path.chars().any(char::is_control) {
        return Err("a LoRA path may not contain control characters".into());
    }
    let lower = path.get(..8).unwrap_or(path).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let url = url::Url::parse(path).map_err(|e| format!("not a valid URL: {e}"))?;
        if url.host().is_none() {
            return Err("a URL needs a host".into());
        }
        return Ok(LoraPath::Url(url));
    }
    if let Some((scheme, _)) = path.split_once("://") {
        return Err(format!(
            "URL scheme {scheme:?} is not supported (http or https)"
        ));
    }
    if path.starts_with('/') || path.starts_with('\\') {
        return Err(
            "an absolute path is not accepted: give a file name in this server's --lora-dir, \
             an http(s) URL or a hub file OWNER/REPO/FILE.safetensors"
                .into(),
        );
    }
    let segments: Vec<&str> = path.split(['/', '\\']).collect();
    if segments.iter().any(|s| *s == ".." || *s == ".") {
        return Err("a LoRA path may not contain `.` or `..` components".into());
    }
    if segments.len() == 1 {
        if path.starts_with('.') {
            return Err("a name in --lora-dir may not start with `.`".into());
        }
        let name = if path.ends_with(EXTENSION) {
            path.to_string()
        } else {
            format!("{path}{EXTENSION}")
        };
        return Ok(LoraPath::Name(name));
    }
    let repo_part = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    let hub = !path.contains('\\')
        && segments.len() >= 3
        && repo_part(segments[0])
        && repo_part(segments[1])
        && segments[2..].iter().all(|s| !s.is_empty())
        && path.ends_with(EXTENSION);
    if !hub {
        return Err(format!(
            "a name in --lora-dir has no slashes, and a hub file is OWNER/REPO/FILE{EXTENSION} \
             (an http(s) URL is the third form)"
        ));
    }
    Ok(LoraPath::Hub {
        repo: segments[..2].join("/"),
        file: segments[2..].join("/"),
    })
}

/// The LoRA rules of one server: the submit's early check and the worker's resolution.
pub struct Loras {
    config: LoraConfig,
    /// Downloads go here (`<output dir>/loras`).
    cache_dir: PathBuf,
    allow_private: bool,
    agent: ureq::Agent,
}

impl Loras {
    /// The rules of `config`, downloads cached under `output_dir`, URLs reaching internal
    /// addresses only with `allow_private` (`--allow-private-image-urls`).
    pub fn new(config: LoraConfig, output_dir: &Path, allow_private: bool) -> Self {
        Self {
            config,
            cache_dir: output_dir.join("loras"),
            allow_private,
            agent: media::download_agent(allow_private, DOWNLOAD_STALL),
        }
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Removes the URL downloads no task used for `unused` (the retention: a download's time
    /// is refreshed whenever a task uses it), so distinct URLs cannot fill the disk; returns
    /// how many. Blocking.
    pub fn sweep_downloads(&self, unused: Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.cache_dir) else {
            return 0;
        };
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > unused));
            if stale && path.extension().is_some_and(|e| e == "safetensors") {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(file = %path.display(), "LoRA download: {e}"),
                }
            }
        }
        removed
    }

    /// Where `loras[index]` points, with what can be checked without I/O: a URL while URLs
    /// are turned off or naming an internal address literally, a name without `--lora-dir`.
    fn classify(&self, index: usize, path: &str) -> Result<Target, LoraError> {
        let invalid = |reason: String| LoraError {
            index,
            shown: shown(path),
            reason,
            kind: LoraErrorKind::Invalid,
        };
        match parse(path).map_err(invalid)? {
            LoraPath::Url(_) if !self.config.urls => Err(invalid(
                "LoRA URLs are turned off on this server (--no-lora-urls): name a file in its \
                 --lora-dir or a hub file"
                    .into(),
            )),
            LoraPath::Url(u) if !self.allow_private && media::url_is_internal_literal(&u) => {
                Err(invalid(
                    "this address may not be fetched (start the server with \
                     --allow-private-image-urls for private networks)"
                        .into(),
                ))
            }
            LoraPath::Url(u) => Ok(Target::Url(u)),
            LoraPath::Name(name) => match &self.config.dir {
                Some(dir) => Ok(Target::Named {
                    file: dir.join(&name),
                    name,
                }),
                None => Err(invalid(
                    "this server has no --lora-dir, so a LoRA cannot be given by name: give an \
                     http(s) URL or a hub file OWNER/REPO/FILE.safetensors"
                        .into(),
                )),
            },
            LoraPath::Hub { repo, file } => Ok(Target::Hub { repo, file }),
        }
    }

    fn missing(index: usize, path: &str, name: &str) -> LoraError {
        LoraError {
            index,
            shown: shown(path),
            reason: format!("not found: no file {name} in this server's --lora-dir"),
            kind: LoraErrorKind::Invalid,
        }
    }

    /// What a submit can refuse before the task exists (a 400 naming `loras`): each path's
    /// form, URLs while `--no-lora-urls`, a literal internal address, a name that is not a
    /// file of `--lora-dir`. Reads the folder off the async runtime's threads.
    pub async fn precheck(&self, loras: &[LoraSpec]) -> Result<(), LoraError> {
        for (i, lora) in loras.iter().enumerate() {
            if let Target::Named { name, file } = self.classify(i, &lora.path)? {
                let is_file = tokio::fs::metadata(&file).await.is_ok_and(|m| m.is_file());
                if !is_file {
                    return Err(Self::missing(i, &lora.path, &name));
                }
            }
        }
        Ok(())
    }

    /// Where each of `loras` is, in order: a `--lora-dir` file, a URL's download (fetched
    /// now unless an earlier request's is kept), or a hub file for the generator. Blocking
    /// (the worker's thread).
    pub fn resolve(&self, loras: &[LoraSpec]) -> Result<Vec<LoraSource>, LoraError> {
        loras
            .iter()
            .enumerate()
            .map(|(i, lora)| match self.classify(i, &lora.path)? {
                Target::Named { name, file } => {
                    if file.is_file() {
                        Ok(LoraSource::File(file))
                    } else {
                        Err(Self::missing(i, &lora.path, &name))
                    }
                }
                Target::Url(url) => self.download(i, &url).map(LoraSource::File),
                Target::Hub { repo, file } => Ok(LoraSource::Hub { repo, file }),
            })
            .collect()
    }

    /// Where the download of `url` is kept: named by the SHA-256 of the URL.
    fn cached_path(&self, url: &url::Url) -> PathBuf {
        let digest: String = Sha256::digest(url.as_str().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.cache_dir.join(format!("{digest}{EXTENSION}"))
    }

    /// The file of `url`: the kept download, else fetched now, at most `--max-lora-mb` (the
    /// stream stops at the limit) into a temporary renamed into place.
    fn download(&self, index: usize, url: &url::Url) -> Result<PathBuf, LoraError> {
        let shown = format!("{:?}", media::display_url(url));
        let fail = |kind: LoraErrorKind, reason: String| LoraError {
            index,
            shown: shown.clone(),
            reason,
            kind,
        };
        let target = self.cached_path(url);
        if target.is_file() {
            // used now: the sweep keeps it another retention period
            let touched = std::fs::File::options()
                .append(true)
                .open(&target)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            if let Err(e) = touched {
                tracing::warn!(file = %target.display(), "LoRA download: {e}");
            }
            return Ok(target);
        }
        let max = self.config.max_download_bytes;
        let too_big = || {
            fail(
                LoraErrorKind::Download,
                format!(
                    "too big: larger than {} MiB, this server's limit (--max-lora-mb)",
                    max >> 20
                ),
            )
        };
        let response = self.agent.request_url("GET", url).call().map_err(|e| {
            tracing::debug!(url = %media::display_url(url), "LoRA download failed: {e}");
            fail(
                LoraErrorKind::Download,
                format!("download failed: {}", media::failure_reason(&e)),
            )
        })?;
        let announced = response
            .header("content-length")
            .and_then(|l| l.parse::<u64>().ok());
        if announced.is_some_and(|len| len > max) {
            return Err(too_big());
        }
        let storage = |e: std::io::Error| {
            tracing::error!(
                "cannot keep a LoRA download in {}: {e}",
                self.cache_dir.display()
            );
            fail(
                LoraErrorKind::Storage,
                "this server could not store the download".into(),
            )
        };
        std::fs::create_dir_all(&self.cache_dir).map_err(storage)?;
        let part = target.with_extension(format!("part{:08x}", rand::random::<u32>()));
        let written = (|| {
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            let mut out = o.open(&part).map_err(storage)?;
            let mut body = response.into_reader();
            let mut buf = vec![0u8; 64 << 10];
            let mut copied = 0u64;
            loop {
                let n = body.read(&mut buf).map_err(|_| {
                    fail(
                        LoraErrorKind::Download,
                        "download failed: the connection failed or timed out".into(),
                    )
                })?;
                if n == 0 {
                    break;
                }
                copied += n as u64;
                // stopped at the limit, whatever the response announced
                if copied > max {
                    return Err(too_big());
                }
                out.write_all(&buf[..n]).map_err(storage)?;
            }
            out.flush().and_then(|()| out.sync_all()).map_err(storage)?;
            std::fs::rename(&part, &target).map_err(storage)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&part);
        }
        written.map(|()| target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_told_apart_by_their_form() {
        let name = |s: &str| LoraPath::Name(s.into());
        assert_eq!(parse("style"), Ok(name("style.safetensors")));
        assert_eq!(parse("style.safetensors"), Ok(name("style.safetensors")));
        assert_eq!(parse("v1:anime"), Ok(name("v1:anime.safetensors")));
        assert_eq!(
            parse("owner/repo/sub/lora.safetensors"),
            Ok(LoraPath::Hub {
                repo: "owner/repo".into(),
                file: "sub/lora.safetensors".into()
            })
        );
        assert!(matches!(
            parse("HTTPS://example.com/a.safetensors?sig=1"),
            Ok(LoraPath::Url(_))
        ));
        for (bad, why) in [
            ("../x", "`..`"),
            ("a/b", "no slashes"),
            ("a/b/c.bin", "no slashes"),
            ("a//c.safetensors", "no slashes"),
            ("o w/r/f.safetensors", "no slashes"),
            ("a\\b\\c.safetensors", "no slashes"),
            ("/etc/passwd", "absolute"),
            ("..", "`..`"),
            (".hidden", "start with"),
            ("x\ny", "control"),
            ("ftp://h/x.safetensors", "scheme \"ftp\""),
            ("http://", "valid URL"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn urls_are_shown_without_credentials_or_query() {
        assert_eq!(
            shown("https://u:pw@example.com/a.safetensors?sig=secret"),
            "\"https://example.com/a.safetensors\""
        );
        assert_eq!(shown("style"), "\"style\"");
    }

    #[test]
    fn the_worker_resolves_names_urls_refused_and_hub_files() {
        let dir = tempfile::tempdir().unwrap();
        let loras = dir.path().join("loras-in");
        std::fs::create_dir(&loras).unwrap();
        std::fs::write(loras.join("style.safetensors"), b"x").unwrap();
        let config = LoraConfig {
            dir: Some(loras.clone()),
            urls: false,
            ..LoraConfig::default()
        };
        let r = Loras::new(config, dir.path(), false);
        let spec = |p: &str| LoraSpec {
            path: p.into(),
            scale: 1.0,
        };
        assert_eq!(
            r.resolve(&[spec("style"), spec("o/r/f.safetensors")])
                .unwrap(),
            [
                LoraSource::File(loras.join("style.safetensors")),
                LoraSource::Hub {
                    repo: "o/r".into(),
                    file: "f.safetensors".into()
                }
            ]
        );
        let e = r.resolve(&[spec("style"), spec("gone")]).unwrap_err();
        assert_eq!(
            (e.index, e.kind, e.to_string()),
            (
                1,
                LoraErrorKind::Invalid,
                "loras[1] \"gone\": not found: no file gone.safetensors in this server's \
                 --lora-dir"
                    .into()
            )
        );
        let e = r.resolve(&[spec("https://example.com/a")]).unwrap_err();
        assert!(e.reason.contains("--no-lora-urls"), "{e}");
        let no_dir = Loras::new(LoraConfig::default(), dir.path(), false);
        let e = no_dir.resolve(&[spec("style")]).unwrap_err();
        assert!(e.reason.contains("no --lora-dir"), "{e}");
        let e = no_dir
            .resolve(&[spec("http://127.0.0.1:9/a.safetensors")])
            .unwrap_err();
        assert!(e.reason.contains("--allow-private-image-urls"), "{e}");
    }

    #[test]
    fn downloads_unused_for_the_retention_are_swept_and_a_use_keeps_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = LoraConfig {
            urls: true,
            ..LoraConfig::default()
        };
        let r = Loras::new(config, dir.path(), false);
        assert_eq!(r.sweep_downloads(Duration::ZERO), 0, "no folder yet");
        std::fs::create_dir_all(&r.cache_dir).unwrap();
        let url = |p: &str| url::Url::parse(&format!("https://example.com/{p}")).unwrap();
        let (old, used, fresh) = (url("old"), url("used"), url("fresh"));
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for u in [&old, &used, &fresh] {
            std::fs::write(r.cached_path(u), b"x").unwrap();
        }
        for u in [&old, &used] {
            let f = std::fs::File::options()
                .append(true)
                .open(r.cached_path(u))
                .unwrap();
            f.set_modified(hour_ago).unwrap();
        }
        // a task uses `used` (a kept download: nothing fetched) before the sweep
        assert_eq!(r.download(0, &used).unwrap(), r.cached_path(&used));
        std::fs::write(r.cache_dir.join("note.txt"), b"not a download").unwrap();
        assert_eq!(r.sweep_downloads(Duration::from_secs(60)), 1);
        assert!(!r.cached_path(&old).exists());
        assert!(r.cached_path(&used).exists() && r.cached_path(&fresh).exists());
        assert!(r.cache_dir.join("note.txt").exists());
    }
}
