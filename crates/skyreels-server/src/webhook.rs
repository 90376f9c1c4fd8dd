//! Signed webhooks (Standard Webhooks style, WaveSpeed's `v3` signature), delivered off the
//! worker with retries.

use crate::job::{hex, new_id};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;
use std::time::Duration;

/// Attempts after the first one.
pub const RETRIES: u32 = 3;

/// `hex(HMAC-SHA256(secret without "whsec_", "{id}.{timestamp}.{body}"))`: the secret's text is
/// the key, as UTF-8 bytes (not base64-decoded).
pub fn signature(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = secret.strip_prefix("whsec_").unwrap_or(secret);
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// The configured secret, else the one saved in the output folder, else a new one (saved).
pub fn load_or_create_secret(configured: Option<String>, dir: &Path) -> std::io::Result<String> {
    if let Some(s) = configured.filter(|s| !s.is_empty()) {
        return Ok(if s.starts_with("whsec_") {
            s
        } else {
            format!("whsec_{s}")
        });
    }
    let path = dir.join("webhook_secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if s.starts_with("whsec_") && s.len() > 6 {
            return Ok(s.to_string());
        }
    }
    let secret = format!("whsec_{}{}", new_id(), new_id());
    std::fs::write(&path, &secret)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(secret)
}

/// Delivers one event: POST the body, retrying non-2xx answers and connection errors up to
/// [`RETRIES`] times with exponential backoff from `backoff`. Blocking; returns the attempts
/// made and whether one succeeded.
pub fn deliver(
    agent: &ureq::Agent,
    url: &str,
    secret: &str,
    body: &[u8],
    backoff: Duration,
) -> (u32, bool) {
    let id = format!("msg_{}", new_id());
    for attempt in 0..=RETRIES {
        if attempt > 0 {
            std::thread::sleep(backoff * 2u32.pow(attempt - 1));
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let result = agent
            .post(url)
            .set("content-type", "application/json")
            .set("webhook-id", &id)
            .set("webhook-timestamp", &ts.to_string())
            .set(
                "webhook-signature",
                &format!("v3,{}", signature(secret, &id, ts, body)),
            )
            .send_bytes(body);
        match result {
            Ok(_) => return (attempt + 1, true),
            Err(e) => tracing::warn!(%url, attempt = attempt + 1, "webhook delivery failed: {e}"),
        }
    }
    (RETRIES + 1, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_vectors() {
        // independent check: printf '%s' 'msg_1.1700000000.{"a":1}' |
        //   openssl dgst -sha256 -hmac 'secret123'
        assert_eq!(
            signature("whsec_secret123", "msg_1", 1_700_000_000, br#"{"a":1}"#),
            "442f915c9352d238eadc7805b0087419cbc1da21964b7875d2c70fa7ece503c4"
        );
        // printf '%s' 'x.1.' | openssl dgst -sha256 -hmac 'abc'
        let v = "6176de8f7ab210c9d6be2013ce564fb7f65a28e9b360920fd0b90965978f4a2b";
        assert_eq!(signature("whsec_abc", "x", 1, b""), v);
        assert_eq!(signature("abc", "x", 1, b""), v);
    }
}
