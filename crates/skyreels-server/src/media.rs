//! Input images: http(s) URLs (with an address policy), data: URIs and our own uploads; decoding
//! with content sniffing and limits against decompression bombs.

use base64::Engine;
use image::RgbImage;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Largest image accepted, encoded.
pub const MAX_IMAGE_BYTES: usize = 50 << 20;
/// Largest decoded image side (the model reads at most 4096; bigger images are only shrunk).
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Decoder memory cap: 16 megapixels of RGBA (a 4096x4096 image), so a small file that
/// announces a huge image is refused before any pixel buffer exists.
pub const MAX_DECODE_ALLOC: u64 = 64 << 20;

/// The upload types accepted, recognised from their bytes.
pub const RASTER_TYPES: [&str; 5] = [
    "image/png",
    "image/jpeg",
    "image/webp",
    "image/gif",
    "image/bmp",
];

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("image URL {url} could not be fetched: {reason}")]
    Fetch { url: String, reason: String },
    #[error("image is larger than {} MiB", MAX_IMAGE_BYTES >> 20)]
    TooLarge,
    #[error("image data is not a supported image (PNG, JPEG, WebP, GIF or BMP)")]
    UnknownFormat,
    #[error(
        "image is too large to decode: at most {MAX_IMAGE_SIDE} pixels a side and {} megapixels",
        MAX_DECODE_ALLOC / 4 / 1_000_000
    )]
    TooManyPixels,
    #[error("image could not be decoded: {0}")]
    Decode(String),
    #[error("invalid data URI: {0}")]
    DataUri(String),
    #[error("uploaded file {0} no longer exists (expired or deleted)")]
    MissingUpload(String),
}

/// Where an image comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageSource {
    Url(url::Url),
    /// Bytes of a `data:image/...;base64,` URI, already decoded.
    Data(Vec<u8>),
    /// An upload this server stored (its id).
    Upload(String),
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

fn v4_is_global(v4: Ipv4Addr) -> bool {
    let [a, b, c, d] = v4.octets();
    !(a == 0                                   // "this network"
        || a == 10                             // private
        || (a == 100 && (64..128).contains(&b)) // CGNAT
        || a == 127                            // loopback
        || (a == 169 && b == 254)              // link-local (cloud metadata)
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)      // documentation
        || (a == 192 && b == 88 && c == 99)    // 6to4 relay anycast
        || (a == 192 && b == 168)              // private
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100)   // documentation
        || (a == 203 && b == 0 && c == 113)    // documentation
        || a >= 224                            // multicast, reserved, broadcast
        || (a, b, c, d) == (168, 63, 129, 16)) // Azure's host endpoint
}

fn v6_is_global(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // addresses that carry an IPv4 address are as global as that address
    if let Some(v4) = v6.to_ipv4_mapped() {
        return v4_is_global(v4);
    }
    if s[..6] == [0; 6] {
        // ::a.b.c.d (IPv4-compatible, deprecated), :: and ::1
        return v4_is_global(embedded(s[6], s[7]));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return v4_is_global(embedded(s[6], s[7])); // NAT64
    }
    if s[0] == 0x2002 {
        return v4_is_global(embedded(s[1], s[2])); // 6to4
    }
    // only global unicast (2000::/3), without Teredo and the other IETF assignments in
    // 2001::/23 and the documentation prefix
    (s[0] & 0xe000) == 0x2000
        && !(s[0] == 0x2001 && s[1] < 0x0200)
        && !(s[0] == 0x2001 && s[1] == 0x0db8)
}

/// Anything but a globally routable unicast address (loopback, private, link-local, CGNAT,
/// documentation, multicast, reserved, cloud metadata, and IPv6 forms that embed one of those):
/// places a public server must not be made to fetch from.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4_is_global(v4),
        IpAddr::V6(v6) => !v6_is_global(v6),
    }
}

/// Whether a URL names an internal address literally (names are checked when resolved).
pub fn url_is_internal_literal(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(v4)) => is_internal(v4.into()),
        Some(url::Host::Ipv6(v6)) => is_internal(v6.into()),
        _ => false,
    }
}

/// A URL as it may be shown and logged: scheme, host, port and path; no credentials, no query.
pub fn display_url(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{}://{host}:{p}{}", url.scheme(), url.path()),
        None => format!("{}://{host}{}", url.scheme(), url.path()),
    }
}

/// The resolver refused every address of a name: they are all internal.
#[derive(Debug)]
pub struct AddressRefused;

impl std::fmt::Display for AddressRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("every address of the host is internal")
    }
}

impl std::error::Error for AddressRefused {}

/// Whether a ureq error is the address policy refusing the host (never worth retrying).
pub fn is_refused(e: &ureq::Error) -> bool {
    use std::error::Error;
    let mut cur = e.source();
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|i| i.is::<AddressRefused>()) {
                return true;
            }
        }
        if err.is::<AddressRefused>() {
            return true;
        }
        cur = err.source();
    }
    false
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
            tracing::warn!(host = ?netloc, "refused a URL that resolves to internal addresses");
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                AddressRefused,
            ));
        }
        Ok(public)
    }
}

/// A blocking HTTP client for images and webhooks: each request done within `timeout`.
pub fn http_agent(allow_private: bool, timeout: Duration) -> ureq::Agent {
    guarded(
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10).min(timeout))
            .timeout(timeout),
        allow_private,
    )
}

/// A blocking HTTP client for large downloads (LoRA files) under the same address policy:
/// no limit on a whole transfer, but a connection that moves no byte for `stall` fails.
pub fn download_agent(allow_private: bool, stall: Duration) -> ureq::Agent {
    guarded(
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10).min(stall))
            .timeout_read(stall)
            .timeout_write(stall),
        allow_private,
    )
}

fn guarded(b: ureq::AgentBuilder, allow_private: bool) -> ureq::Agent {
    let b = b
        .redirects(5)
        .user_agent(concat!("skyreels-server/", env!("CARGO_PKG_VERSION")));
    if allow_private {
        b.build()
    } else {
        b.resolver(PublicOnly).build()
    }
}

/// Why a request failed, in words that do not tell a refused internal address from a host that
/// does not resolve or does not answer, nor repeat transport details.
pub fn failure_reason(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, _) => format!("HTTP {code}"),
        ureq::Error::Transport(t) => match t.kind() {
            ureq::ErrorKind::Dns | ureq::ErrorKind::ConnectionFailed => {
                "cannot connect (the host does not resolve or answer, or is an address this \
                 server may not reach; private networks need --allow-private-image-urls)"
                    .into()
            }
            ureq::ErrorKind::Io => "the connection failed or timed out".into(),
            kind => kind.to_string(),
        },
    }
}

/// Downloads at most [`MAX_IMAGE_BYTES`] from an http(s) URL. Blocking.
pub fn fetch(agent: &ureq::Agent, url: &url::Url) -> Result<Vec<u8>, MediaError> {
    let err = |reason: String| MediaError::Fetch {
        url: display_url(url),
        reason,
    };
    let response = agent.request_url("GET", url).call().map_err(|e| {
        tracing::debug!(url = %display_url(url), "image fetch failed: {e}");
        err(failure_reason(&e))
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
        .map_err(|_| err("the connection failed or timed out".into()))?;
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(MediaError::TooLarge);
    }
    Ok(bytes)
}

/// The raster type of some bytes (PNG, JPEG, WebP, GIF, BMP), by content only.
pub fn sniff_raster(bytes: &[u8]) -> Option<&'static str> {
    use image::ImageFormat as F;
    match image::guess_format(bytes).ok()? {
        F::Png => Some("image/png"),
        F::Jpeg => Some("image/jpeg"),
        F::WebP => Some("image/webp"),
        F::Gif => Some("image/gif"),
        F::Bmp => Some("image/bmp"),
        _ => None,
    }
}

/// Decodes by content (not by name or declared type), within size and memory limits.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, MediaError> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(MediaError::TooLarge);
    }
    if sniff_raster(bytes).is_none() {
        return Err(MediaError::UnknownFormat);
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| MediaError::Decode(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => MediaError::TooManyPixels,
        e => MediaError::Decode(e.to_string()),
    })?;
    // no copy when it is RGB already
    Ok(img.into_rgb8())
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

    /// CRC-32 (IEEE), as PNG chunks carry it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn decoding_sniffs_and_limits() {
        assert_eq!(decode(&png(5, 4)).unwrap().dimensions(), (5, 4));
        assert!(matches!(
            decode(b"GIF89a\x01\x00\x01\x00 truncated"),
            Err(MediaError::Decode(_))
        ));
        assert!(matches!(
            decode(b"hello world"),
            Err(MediaError::UnknownFormat)
        ));
        assert!(matches!(
            decode(b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
            Err(MediaError::UnknownFormat)
        ));
        // a PNG header announcing 100000 x 100000 or 8192 x 8192 pixels (decompression bombs)
        // is refused before a pixel buffer exists
        for side in [100_000u32, 8192] {
            let mut bomb = png(1, 1);
            bomb[16..20].copy_from_slice(&side.to_be_bytes());
            bomb[20..24].copy_from_slice(&side.to_be_bytes());
            // the IHDR chunk's CRC (over its type and data, bytes 12..29) must match
            let crc = crc32(&bomb[12..29]);
            bomb[29..33].copy_from_slice(&crc.to_be_bytes());
            assert!(
                matches!(decode(&bomb), Err(MediaError::TooManyPixels)),
                "{side}"
            );
        }
        assert_eq!(sniff_raster(&png(1, 1)), Some("image/png"));
        assert_eq!(sniff_raster(b"<html><script>"), None);
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
            "192.0.0.8",
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "168.63.129.16",
            "192.0.2.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:db8::1",
            "100::1",
        ] {
            assert!(is_internal(a.parse().unwrap()), "{a}");
        }
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "100.128.0.1",
            "168.63.129.17",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2a00:1450:4001::1",
        ] {
            assert!(!is_internal(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn urls_are_shown_without_credentials_or_query() {
        let u = url::Url::parse("https://user:secret@example.com:8443/a/b.png?sig=abc#x").unwrap();
        assert_eq!(display_url(&u), "https://example.com:8443/a/b.png");
        let literal = |s: &str| url_is_internal_literal(&url::Url::parse(s).unwrap());
        assert!(
            literal("http://127.0.0.1/x")
                && literal("http://[::1]/x")
                && literal("http://[::ffff:10.0.0.1]/")
        );
        assert!(!literal("http://example.com/x") && !literal("http://8.8.8.8/x"));
    }

    #[test]
    fn private_urls_are_refused_unless_allowed_and_the_error_says_nothing_more() {
        let agent = http_agent(false, Duration::from_secs(2));
        let url = |s: &str| url::Url::parse(s).unwrap();
        let refused = fetch(&agent, &url("http://u:pw@127.0.0.1:9/x.png?k=1"))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--allow-private-image-urls"), "{refused}");
        assert!(
            !refused.contains("pw") && !refused.contains("k=1"),
            "{refused}"
        );
        let refused_name = match agent.get("http://localhost:9/x.png").call() {
            Err(e) => {
                assert!(is_refused(&e), "{e}");
                failure_reason(&e)
            }
            Ok(_) => panic!("localhost was fetched"),
        };
        // an unresolvable name reads exactly like a refused one
        let unresolvable = fetch(&agent, &url("http://no-such-host.invalid/x.png"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            unresolvable.replace("no-such-host.invalid", "H"),
            refused.replace("127.0.0.1:9", "H"),
        );
        assert!(unresolvable.ends_with(&refused_name), "{unresolvable}");
        // allowed: the connection itself is attempted (and refused: nothing listens on port 9)
        let allowed = http_agent(true, Duration::from_secs(2));
        match allowed
            .request_url("GET", &url("http://127.0.0.1:9/x.png"))
            .call()
        {
            Err(e) => assert!(!is_refused(&e), "{e}"),
            Ok(_) => panic!("something listens on port 9"),
        }
    }
}
