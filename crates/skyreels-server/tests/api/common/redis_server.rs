//! A real `redis-server` per test, and servers on the Redis engine in front of it.

use super::{start_with, Gate, Harness};
use axum::http::StatusCode;
use skyreels_server::backend::redis::{ClusterConfig, OutputStore};
use skyreels_server::ServerConfig;
use std::path::Path;
use std::time::Duration;

/// A real `redis-server` (Debian's package; `scripts/test.sh` installs it) on a free loopback
/// port in a temporary folder, stopped on drop.
pub(crate) struct RedisServer {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub(crate) fn start() -> Self {
        Self::start_with(false)
    }

    /// `tls`: only a TLS port, with a certificate for 127.0.0.1 signed by a test authority
    /// (`ca.crt` in its folder), made with the openssl command line.
    pub(crate) fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null());
        if tls {
            make_test_certificates(dir.path());
            let f = |name: &str| dir.path().join(name);
            cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(f("server.crt"))
                .arg("--tls-key-file")
                .arg(f("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(f("ca.crt"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &port.to_string()]);
        }
        let child = cmd
            .spawn()
            .expect("redis-server not found: install Debian's redis-server (scripts/test.sh does)");
        // owned (and so stopped) from here on, whatever happens next
        let scheme = if tls { "rediss" } else { "redis" };
        let server = Self {
            child,
            url: format!("{scheme}://127.0.0.1:{port}/0"),
            _dir: dir,
        };
        for _ in 0..200 {
            if let Ok(mut c) = server.client().get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return server;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer on port {port}");
    }

    fn ca(&self) -> std::path::PathBuf {
        self._dir.path().join("ca.crt")
    }

    fn client(&self) -> redis::Client {
        if self.url.starts_with("rediss:") {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(self.ca()).unwrap()),
            };
            redis::Client::build_with_tls(self.url.as_str(), certs).unwrap()
        } else {
            redis::Client::open(self.url.as_str()).unwrap()
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn conn(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }

    /// Sends a signal to the server process (STOP: it hangs with its sockets open).
    pub(crate) fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }
}

/// A test certificate authority and a certificate for 127.0.0.1 signed by it, in `dir`.
fn make_test_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command line");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=skyreels test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis-mode server (its own Redis) with one fake worker in the process.
pub(crate) async fn start_redis_with(
    cfg: impl FnOnce(&mut ServerConfig),
    gate: Gate,
    output_store: OutputStore,
) -> Harness {
    start_on_redis(RedisServer::start(), cfg, gate, output_store).await
}

/// [`start_redis_with`] on the given Redis.
pub(crate) async fn start_on_redis(
    redis: RedisServer,
    cfg: impl FnOnce(&mut ServerConfig),
    gate: Gate,
    output_store: OutputStore,
) -> Harness {
    let url = redis.url.clone();
    let ca = url.starts_with("rediss:").then(|| redis.ca());
    let mut h = start_with(
        tempfile::tempdir().unwrap(),
        |c| {
            c.redis = Some(ClusterConfig {
                output_store,
                ca_cert: ca,
                ..ClusterConfig::new(url)
            });
            cfg(c)
        },
        gate,
    )
    .await;
    // the worker announces its model on its first connection
    for _ in 0..200 {
        let (s, _) = h.json("GET", "/ready", None, None).await;
        if s == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.redis = Some(redis);
    h
}
