//! How a node reaches Redis: `--redis` and its options, and the client they make (refused
//! without a password on an address other than this machine's).

use std::time::Duration;

/// Where finished videos live in Redis mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStore {
    /// MP4 bytes in Redis (with the retention as their TTL).
    Redis,
    /// Files under `--output-dir`, a filesystem every node shares.
    Dir,
}

/// How a node reaches the shared engine.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `redis://[USER:PASSWORD@]HOST:PORT/DB`, or `rediss://` for TLS.
    pub url: String,
    /// A running task whose worker sent no heartbeat for this long is taken over.
    pub claim_timeout: Duration,
    pub output_store: OutputStore,
    /// Bytes of uploads Redis keeps, per API key and in all.
    pub quotas: Quotas,
    /// A task not started this long after it was accepted fails (5003).
    pub queue_ttl: Duration,
    /// A model no live worker has served for this long is forgotten: submits naming it are
    /// refused (404) instead of waiting for a worker that will not come.
    pub forget_models_after: Duration,
    /// PEM of the authority that signed a `rediss://` server's certificate (else the system's).
    pub ca_cert: Option<std::path::PathBuf>,
    /// Accept a URL without a password on an address other than loopback.
    pub allow_no_password: bool,
}

impl ClusterConfig {
    /// The defaults: 30 s claim timeout, videos in Redis, [`Quotas::default`], tasks waiting
    /// at most 6 hours, models forgotten an hour after their last worker.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            claim_timeout: Duration::from_secs(30),
            output_store: OutputStore::Redis,
            quotas: Quotas::default(),
            queue_ttl: Duration::from_secs(6 * 3600),
            forget_models_after: Duration::from_secs(3600),
            ca_cert: None,
            allow_no_password: false,
        }
    }
}

/// Upload bytes kept in Redis (where they live in RAM until the retention ends).
#[derive(Clone, Copy, Debug)]
pub struct Quotas {
    /// Per API key (all clients together when no key is configured).
    pub uploads_per_key: u64,
    /// Over every key.
    pub uploads_total: u64,
}

impl Default for Quotas {
    /// 256 MiB per key, 2 GiB in all.
    fn default() -> Self {
        Self {
            uploads_per_key: 256 << 20,
            uploads_total: 2 << 30,
        }
    }
}

/// Why `--redis` (and its TLS authority) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--redis {0:?}: {1}")]
    Url(String, String),
    #[error(
        "--redis {0:?} has no password and is not on this machine: anyone who reaches that \
         Redis could read every input and queue any task. Give it a password \
         (redis://:PASSWORD@HOST:PORT/DB, or an ACL user: docs/scale-out.md), or pass \
         --allow-redis-without-password on a network only these nodes reach"
    )]
    NoPassword(String),
    #[error("--redis-ca {}: {source}", path.display())]
    Ca {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--redis-ca is for TLS: the URL must start with rediss://, got {0:?}")]
    CaWithoutTls(String),
}

/// The client of `--redis`: refused without a password on a non-loopback address (unless
/// allowed), with the `--redis-ca` authority for `rediss://`.
pub(super) fn client(config: &ClusterConfig) -> Result<redis::Client, ConfigError> {
    let shown = redacted(&config.url);
    let bad = |e: &dyn std::fmt::Display| ConfigError::Url(shown.clone(), e.to_string());
    let url = url::Url::parse(&config.url).map_err(|e| bad(&e))?;
    let local = match url.host() {
        // redis: is not a special scheme to the URL parser: addresses come as names
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => true,
    };
    if !local && url.password().is_none() && !config.allow_no_password {
        return Err(ConfigError::NoPassword(shown));
    }
    match (&config.ca_cert, url.scheme()) {
        (Some(ca), "rediss") => {
            let root = std::fs::read(ca).map_err(|source| ConfigError::Ca {
                path: ca.clone(),
                source,
            })?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root),
            };
            redis::Client::build_with_tls(config.url.as_str(), certs).map_err(|e| bad(&e))
        }
        (Some(_), _) => Err(ConfigError::CaWithoutTls(shown)),
        (None, _) => redis::Client::open(config.url.as_str()).map_err(|e| bad(&e)),
    }
}

/// A Redis URL without its password, for messages.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_elsewhere_needs_a_password() {
        // Client::open connects to nothing: these only parse
        let cfg = ClusterConfig::new;
        let err = client(&cfg("redis://redis.internal:6379/0"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no password") && err.contains("--allow-redis-without-password"));
        for ok in [
            "redis://:pw@redis.internal:6379/0",
            "redis://skyreels:pw@redis.internal/0",
            "rediss://:pw@redis.internal/0",
            "redis://127.0.0.1:6379/0",
            "redis://localhost/0",
            "redis://[::1]:6379/0",
            "redis+unix:///run/redis.sock",
        ] {
            assert!(client(&cfg(ok)).is_ok(), "{ok}");
        }
        let allowed = ClusterConfig {
            allow_no_password: true,
            ..cfg("redis://redis.internal/0")
        };
        assert!(client(&allowed).is_ok());
        let ca_without_tls = ClusterConfig {
            ca_cert: Some("/nonexistent.pem".into()),
            ..cfg("redis://127.0.0.1/0")
        };
        assert!(client(&ca_without_tls)
            .err()
            .unwrap()
            .to_string()
            .contains("rediss://"));
        let missing_ca = ClusterConfig {
            ca_cert: Some("/nonexistent.pem".into()),
            ..cfg("rediss://127.0.0.1/0")
        };
        assert!(client(&missing_ca)
            .err()
            .unwrap()
            .to_string()
            .contains("/nonexistent.pem"));
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redacted("redis://:hunter2@10.0.0.5:6379/0"),
            "redis://:***@10.0.0.5:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1/"), "redis://127.0.0.1/");
    }
}
