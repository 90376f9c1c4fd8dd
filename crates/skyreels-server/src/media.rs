//! Input images: http(s) URLs (with an address policy), data: URIs and our own uploads; decoding
//! with content sniffing and limits against decompression bombs.

use base64::Engine;
use image::RgbImage;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Largest image accepted, encoded.
pub const MAX_IMAGE_BYTES: usize = 50 << 20;
/// Largest decoded image side.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Decoder memory cap.
const MAX_DECODE_ALLOC: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("image URL {url} could not be fetched: {reason}")]
    Fetch { url: String, reason: String },
    #[error("image is larger than {} MiB", MAX_IMAGE_BYTES >> 20)]
    TooLarge,
    #[error("image data is not a supported image (PNG, JPEG, WebP, GIF or BMP)")]
    UnknownFormat,
    #[error("image could not be decoded: {0}")]
    Decode(String),
    #[error("invalid data URI: {0}")]
    DataUri(String),
    #[error("uploaded file {0} does not exist (expired or deleted?)")]
    MissingUpload(String),
}

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageSource {
    Url(String),
    /// Bytes of a `data:image/...;base64,` URI, already decoded.
    Data(Vec<u8>),
    /// A file this server stored for an upload.
    Upload(PathBuf),
}

/// Bytes of a `data:[<mime>][;base64],<data>` URI (only base64 image URIs).
pub fn parse_data_uri(uri: &str) -> Result<Vec<u8>, MediaError> {
    let rest = uri
        .strip_prefix("data:")
        .ok_or_else(|| MediaError::DataUri("does not start with data:".into()))?;
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| MediaError::DataUri("no comma before the data".into()))?;
    let mut parts = meta.split(';');
    let mime = parts.next().unwrap_or_default();
    if !(mime.is_empty() || mime.starts_with("image/") || mime == "application/octet-stream") {
        return Err(MediaError::DataUri(format!(
            "media type {mime:?} is not an image"
        )));
    }
    if !parts.any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err(MediaError::DataUri(
            "only ;base64 data URIs are accepted".into(),
        ));
    }
    if data.len() > MAX_IMAGE_BYTES / 3 * 4 + 4 {
        return Err(MediaError::TooLarge);
    }
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(cleaned.as_bytes()))
        .map_err(|e| MediaError::DataUri(format!("bad base64: {e}")))
}

/// Loopback, private, link-local, unspecified, CGNAT, multicast or broadcast addresses: places
/// a public server must not be made to fetch from.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Resolves host names and drops internal addresses (checked on every connection, so redirects
/// and DNS tricks cannot reach them either).
struct PublicOnly;

impl ureq::Resolver for PublicOnly {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        let all: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        let public: Vec<SocketAddr> = all
            .iter()
            .copied()
            .filter(|a| !is_internal(a.ip()))
            .collect();
        if public.is_empty() && !all.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{netloc} resolves to a private, loopback or link-local address \
                     (start the server with --allow-private-image-urls to allow it)"
                ),
            ));
        }
        Ok(public)
    }
}

/// A blocking HTTP client for images and webhooks.
pub fn http_agent(allow_private: bool, timeout: Duration) -> ureq::Agent {
    let b = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10).min(timeout))
        .timeout(timeout)
        .redirects(5)
        .user_agent(concat!("skyreels-server/", env!("CARGO_PKG_VERSION")));
    if allow_private {
        b.build()
    } else {
        b.resolver(PublicOnly).build()
    }
}

/// Downloads at most [`MAX_IMAGE_BYTES`] from an http(s) URL. Blocking.
pub fn fetch(agent: &ureq::Agent, url: &str) -> Result<Vec<u8>, MediaError> {
    let err = |reason: String| MediaError::Fetch {
        url: url.to_string(),
        reason,
    };
    let response = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, _) => err(format!("HTTP {code}")),
        ureq::Error::Transport(t) => err(t.to_string()),
    })?;
    if let Some(len) = response
        .header("content-length")
        .and_then(|l| l.parse::<usize>().ok())
    {
        if len > MAX_IMAGE_BYTES {
            return Err(MediaError::TooLarge);
        }
    }
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(MAX_IMAGE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(MediaError::TooLarge);
    }
    Ok(bytes)
}

/// Decodes by content (not by name or declared type), within size and memory limits.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, MediaError> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(MediaError::TooLarge);
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| MediaError::Decode(e.to_string()))?;
    if reader.format().is_none() {
        return Err(MediaError::UnknownFormat);
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| MediaError::Decode(e.to_string()))?;
    Ok(img.to_rgb8())
}

/// Fetches (if needed) and decodes an image. Blocking: run it off the async runtime.
pub fn load(agent: &ureq::Agent, source: &ImageSource) -> Result<RgbImage, MediaError> {
    match source {
        ImageSource::Url(url) => decode(&fetch(agent, url)?),
        ImageSource::Data(bytes) => decode(bytes),
        ImageSource::Upload(path) => {
            let bytes = std::fs::read(path)
                .map_err(|_| MediaError::MissingUpload(path.display().to_string()))?;
            decode(&bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(w, h)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn data_uris() {
        let bytes = png(3, 2);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        assert_eq!(
            parse_data_uri(&format!("data:image/png;base64,{b64}")).unwrap(),
            bytes
        );
        assert_eq!(
            parse_data_uri(&format!("data:;base64,{b64}")).unwrap(),
            bytes
        );
        for bad in [
            "data:image/png,abc".to_string(),
            "data:text/plain;base64,aGk=".into(),
            "data:image/png;base64".into(),
            "data:image/png;base64,@@@".into(),
            "image/png;base64,aGk=".into(),
        ] {
            assert!(parse_data_uri(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decoding_sniffs_and_limits() {
        assert_eq!(decode(&png(5, 4)).unwrap().dimensions(), (5, 4));
        assert!(matches!(
            decode(b"GIF89a not really"),
            Err(MediaError::Decode(_))
        ));
        assert!(matches!(
            decode(b"hello world"),
            Err(MediaError::UnknownFormat)
        ));
        // a PNG header announcing 100000 x 100000 pixels (a decompression bomb) is refused
        let mut bomb = png(1, 1);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(matches!(decode(&bomb), Err(MediaError::Decode(_))));
    }

    #[test]
    fn internal_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "100.128.0.1"] {
            assert!(!is_internal(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn private_urls_are_refused_unless_allowed() {
        let agent = http_agent(false, Duration::from_secs(2));
        let e = fetch(&agent, "http://127.0.0.1:9/x.png")
            .unwrap_err()
            .to_string();
        assert!(e.contains("private, loopback or link-local"), "{e}");
        let e = fetch(&agent, "http://localhost:9/x.png")
            .unwrap_err()
            .to_string();
        assert!(e.contains("private, loopback or link-local"), "{e}");
        // allowed: the connection itself is attempted (and refused: nothing listens on port 9)
        let e = fetch(
            &http_agent(true, Duration::from_secs(2)),
            "http://127.0.0.1:9/x.png",
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("private"), "{e}");
    }
}
