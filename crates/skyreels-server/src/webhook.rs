//! Signed webhooks (Standard Webhooks style, WaveSpeed's `v3` signature), delivered
//! asynchronously with retries: a bounded number of attempts run at a time, waits between
//! attempts are timers (no thread sleeps), and an address the guard refused is not retried.

use crate::engine::task::{hex, new_id};
use crate::media;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Delivery attempts in flight at once, server-wide.
pub const CONCURRENT_DELIVERIES: usize = 8;

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
    crate::engine::files::write_private(&path, secret.as_bytes())?;
    Ok(secret)
}

/// How a delivery ended.
#[derive(Debug, PartialEq)]
pub enum Delivery {
    /// A 2xx answer after this many attempts.
    Delivered(u32),
    /// Every attempt failed.
    GaveUp(u32),
    /// The address policy refused the host: not retried.
    Refused,
}

/// Delivers one event: POST the body, retrying non-2xx answers and connection errors up to
/// [`RETRIES`] times with exponential backoff from `backoff`. Each attempt holds a permit of
/// `permits` while it runs on the blocking pool.
pub async fn deliver(
    agent: &ureq::Agent,
    url: &str,
    secret: &str,
    body: Arc<Vec<u8>>,
    backoff: Duration,
    permits: &Semaphore,
) -> Delivery {
    let id = format!("msg_{}", new_id());
    let shown = url::Url::parse(url).map_or_else(|_| "?".into(), |u| media::display_url(&u));
    for attempt in 0..=RETRIES {
        if attempt > 0 {
            tokio::time::sleep(backoff * 2u32.pow(attempt - 1)).await;
        }
        let Ok(_permit) = permits.acquire().await else {
            return Delivery::GaveUp(attempt);
        };
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (agent, url, id, sig, body) = (
            agent.clone(),
            url.to_string(),
            id.clone(),
            format!("v3,{}", signature(secret, &id, ts, &body)),
            body.clone(),
        );
        let result = tokio::task::spawn_blocking(move || {
            agent
                .post(&url)
                .set("content-type", "application/json")
                .set("webhook-id", &id)
                .set("webhook-timestamp", &ts.to_string())
                .set("webhook-signature", &sig)
                .send_bytes(&body)
                .map(|_| ())
                .map_err(|e| (media::is_refused(&e), media::failure_reason(&e)))
        })
        .await;
        match result {
            Ok(Ok(())) => return Delivery::Delivered(attempt + 1),
            Ok(Err((true, _))) => {
                tracing::warn!(url = %shown, "webhook refused: the host is an internal address");
                return Delivery::Refused;
            }
            Ok(Err((false, reason))) => tracing::warn!(
                url = %shown,
                attempt = attempt + 1,
                "webhook delivery failed: {reason}"
            ),
            Err(e) => tracing::error!(url = %shown, "webhook attempt did not run: {e}"),
        }
    }
    Delivery::GaveUp(RETRIES + 1)
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

    #[tokio::test]
    async fn a_refused_address_is_not_retried() {
        let permits = Semaphore::new(1);
        let send = |allow_private: bool, url: &'static str, backoff: Duration| {
            let agent = media::http_agent(allow_private, Duration::from_secs(2));
            let permits = &permits;
            async move {
                let body = Arc::new(b"{}".to_vec());
                deliver(&agent, url, "whsec_x", body, backoff, permits).await
            }
        };
        // with a minute of backoff a retry would hold this test for minutes; a refusal returns
        // after the one attempt the guard stopped
        let start = std::time::Instant::now();
        let got = send(false, "http://localhost:9/hook", Duration::from_secs(60)).await;
        assert_eq!(got, Delivery::Refused);
        assert!(start.elapsed() < Duration::from_secs(30));
        // an allowed but dead receiver is retried (backoff 1 ms): every attempt made
        let got = send(true, "http://127.0.0.1:9/hook", Duration::from_millis(1)).await;
        assert_eq!(got, Delivery::GaveUp(RETRIES + 1));
    }
}
