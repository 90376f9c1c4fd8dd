//! Live progress (`GET /api/v3/predictions/{id}/events`) on a real socket, read by a real HTTP
//! client (ureq): every step in order and the outcome on both engines, `Last-Event-ID`, the
//! bound, unknown ids and keys, and 500 open streams during a running task.

use crate::common::{body, start_redis_with, start_with, Gate, Harness, Listening, KEY};
use axum::http::StatusCode;
use serde_json::Value;
use skyreels_server::backend::redis::OutputStore;
use skyreels_server::ServerConfig;
use std::io::BufRead;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

/// A harness's server on a loopback socket.
struct Live {
    addr: SocketAddr,
    server: Listening,
    /// Keeps the data folder, the Redis and the request helpers.
    h: Harness,
}

async fn live(mut h: Harness) -> Live {
    let server = Listening::start(h.server.take().unwrap()).await;
    Live {
        addr: server.addr,
        server,
        h,
    }
}

async fn memory(gate: Gate, cfg: impl FnOnce(&mut ServerConfig)) -> Live {
    live(start_with(tempfile::tempdir().unwrap(), cfg, gate).await).await
}

impl Live {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn submit(&self) -> String {
        let (s, v) = self.h.submit(body("a cat")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["data"]["id"].as_str().unwrap().to_string()
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

/// One event as a client reads it.
#[derive(Debug)]
struct Told {
    id: u64,
    data: Value,
}

impl Told {
    fn status(&self) -> &str {
        self.data["data"]["status"].as_str().unwrap()
    }
    fn step(&self) -> u64 {
        self.data["data"]["progress"]["step"].as_u64().unwrap()
    }
}

/// An event stream opened with ureq on a thread: the HTTP status (and body of an error), and
/// the events as they come; the channel closes when the response ends.
fn follow(
    url: String,
    key: Option<&str>,
    last: Option<&str>,
) -> (u16, String, UnboundedReceiver<Told>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (status_tx, status_rx) = std::sync::mpsc::channel();
    let (key, last) = (key.map(str::to_string), last.map(str::to_string));
    std::thread::spawn(move || {
        let agent = ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(30))
            .build();
        let mut req = agent.get(&url);
        if let Some(k) = &key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        if let Some(l) = &last {
            req = req.set("Last-Event-ID", l);
        }
        let response = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let _ = status_tx.send((code, r.into_string().unwrap_or_default()));
                return;
            }
            Err(e) => panic!("{url}: {e}"),
        };
        let content_type = response.content_type().to_string();
        let _ = status_tx.send((response.status(), content_type));
        let (mut id, mut data) = (None, String::new());
        for line in std::io::BufReader::new(response.into_reader()).lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().parse().unwrap());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                let told = Told {
                    id: id.take().expect("every event has an id"),
                    data: serde_json::from_str(&std::mem::take(&mut data)).unwrap(),
                };
                if tx.send(told).is_err() {
                    break;
                }
            }
        }
    });
    let (status, text) = status_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    (status, text, rx)
}

/// The next event within a few seconds (`None`: the stream ended).
async fn next(rx: &mut UnboundedReceiver<Told>) -> Option<Told> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event or the end of the stream within 10 s")
}

/// Reads a stream to its end: every event.
async fn rest(rx: &mut UnboundedReceiver<Told>) -> Vec<Told> {
    let mut all = vec![];
    while let Some(t) = next(rx).await {
        all.push(t);
    }
    all
}

/// Waits until the task is held at the gate (processing, step 0).
async fn held(l: &Live, id: &str) {
    l.h.wait(id, &["processing"]).await;
}

/// A stream read through a whole task: one event per step in order (ids growing), then the
/// completed prediction, equal to what /result answers; then the stream ends.
async fn a_stream_tells_every_step_then_the_outcome(l: Live, gate: Gate) {
    let id = l.submit().await;
    held(&l, &id).await;
    let (status, content_type, mut rx) = follow(
        l.url(&format!("/api/v3/predictions/{id}/events")),
        Some(KEY),
        None,
    );
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let first = next(&mut rx).await.unwrap();
    assert_eq!(
        (first.status(), first.step(), first.id),
        ("processing", 0, 1)
    );
    assert_eq!(first.data["code"], 200);
    assert_eq!(first.data["data"]["id"], id.as_str());
    gate.open();
    let events = rest(&mut rx).await;
    let told: Vec<(&str, u64, u64)> = events
        .iter()
        .map(|t| (t.status(), t.step(), t.id))
        .collect();
    assert_eq!(
        told,
        [
            ("processing", 1, 2),
            ("processing", 2, 3),
            ("processing", 3, 4),
            ("processing", 4, 5),
            ("completed", 4, 6)
        ],
        "every step once, in order, then the outcome"
    );
    let end = &events.last().unwrap().data;
    assert_eq!(
        end["data"],
        l.h.get(&id).await,
        "the outcome's event is /result's prediction"
    );
    assert_eq!(end["data"]["outputs"].as_array().unwrap().len(), 1);
    // a client that saw the outcome is told there is nothing more (EventSource stops)
    let (status, _, _) = follow(
        l.url(&format!("/api/v3/predictions/{id}/events")),
        Some(KEY),
        Some("6"),
    );
    assert_eq!(status, 204);
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_a_stream_tells_every_step_then_the_outcome() {
    let gate = Gate::closed();
    let l = memory(gate.clone(), |_| {}).await;
    a_stream_tells_every_step_then_the_outcome(l, gate).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_a_stream_tells_every_step_then_the_outcome() {
    let gate = Gate::closed();
    let h = start_redis_with(|_| {}, gate.clone(), OutputStore::Redis).await;
    a_stream_tells_every_step_then_the_outcome(live(h).await, gate).await;
}

/// `Last-Event-ID` resumes after that event; one that is not a number is refused; a queued
/// task's stream starts at created with its queue position.
#[tokio::test(flavor = "multi_thread")]
async fn last_event_id_resumes_after_the_event() {
    let gate = Gate::closed();
    let l = memory(gate.clone(), |_| {}).await;
    let running = l.submit().await;
    held(&l, &running).await;
    let queued = l.submit().await;
    let url = |id: &str| l.url(&format!("/api/v3/predictions/{id}/events"));
    let (_, _, mut waiting) = follow(url(&queued), Some(KEY), None);
    let first = next(&mut waiting).await.unwrap();
    assert_eq!((first.status(), first.id), ("created", 0));
    assert_eq!(first.data["data"]["queue_position"], 0);
    // resumed after step 0 (event 1): steps 1.. and the outcome, nothing before
    let (status, _, mut resumed) = follow(url(&running), Some(KEY), Some("1"));
    assert_eq!(status, 200);
    let (status, text, _) = follow(url(&running), Some(KEY), Some("one"));
    assert_eq!(status, 400);
    assert!(text.contains("Last-Event-ID: "), "{text}");
    gate.open();
    let ids: Vec<u64> = rest(&mut resumed).await.iter().map(|t| t.id).collect();
    assert_eq!(ids, [2, 3, 4, 5, 6]);
    // the queued task ran next: its stream went on from created to the end
    let statuses: Vec<String> = rest(&mut waiting)
        .await
        .iter()
        .map(|t| format!("{}:{}", t.status(), t.step()))
        .collect();
    assert_eq!(
        statuses,
        [
            "processing:0",
            "processing:1",
            "processing:2",
            "processing:3",
            "processing:4",
            "completed:4"
        ]
    );
    l.stop().await;
}

/// The key rules of /result apply, an unknown id is 404, and the streams open at once are
/// bounded: one more is 503 with Retry-After until one closes.
#[tokio::test(flavor = "multi_thread")]
async fn streams_need_a_key_and_are_bounded() {
    let gate = Gate::closed();
    let l = memory(gate.clone(), |c| {
        c.max_event_streams = 2;
        // keep-alive comments every second: a closed client is noticed quickly
        c.idle_timeout = Duration::from_secs(2);
    })
    .await;
    let id = l.submit().await;
    held(&l, &id).await;
    let url = l.url(&format!("/api/v3/predictions/{id}/events"));
    let (status, text, _) = follow(url.clone(), None, None);
    assert_eq!(status, 401, "{text}");
    let (status, text, _) = follow(l.url("/api/v3/predictions/nope/events"), Some(KEY), None);
    assert_eq!(status, 404, "{text}");
    let path = format!("/api/v3/predictions/{id}/events");
    let a = open_raw(l.addr, &path).await;
    let b = open_raw(l.addr, &path).await;
    let metrics = crate::common::metrics_text(&l.h).await;
    assert!(metrics.contains("skyreels_event_streams 2\n"), "{metrics}");
    let (status, text, _) = follow(url.clone(), Some(KEY), None);
    assert_eq!(status, 503);
    assert!(text.contains("--max-event-streams"), "{text}");
    // a client goes away: its stream is freed once the server notices (at a keep-alive)
    drop(a);
    let start = Instant::now();
    let mut c = loop {
        let (status, _, rx) = follow(url.clone(), Some(KEY), None);
        if status == 200 {
            break rx;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the stream was never freed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    gate.open();
    assert!(read_to_end(b).await.contains("\"status\":\"completed\""));
    assert_eq!(rest(&mut c).await.last().unwrap().status(), "completed");
    let metrics = crate::common::metrics_text(&l.h).await;
    assert!(metrics.contains("skyreels_event_streams 0\n"), "{metrics}");
    l.stop().await;
}

/// A stream opened on a raw connection (`Connection: close`), read up to its first event.
async fn open_raw(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let (mut buf, mut got) = (vec![0u8; 8192], Vec::new());
    while !String::from_utf8_lossy(&got).contains("data:") {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("the first event")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

/// What a raw stream sends until the server closes it (within a minute).
async fn read_to_end(mut s: tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut rest))
        .await
        .expect("the stream closes after the outcome")
        .unwrap();
    String::from_utf8_lossy(&rest).into_owned()
}

/// The 99th percentile of `n` GET /result on one keep-alive connection, in milliseconds.
fn result_p99(addr: SocketAddr, id: &str, n: usize) -> f64 {
    let agent = ureq::AgentBuilder::new().build();
    let url = format!("http://{addr}/api/v3/predictions/{id}/result");
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            let start = Instant::now();
            let r = agent
                .get(&url)
                .set("Authorization", &format!("Bearer {KEY}"))
                .call()
                .unwrap();
            assert_eq!(r.status(), 200);
            r.into_string().unwrap();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[(n * 99).div_ceil(100) - 1]
}

/// 500 streams open on a running task (each on its own connection): every one of them is told
/// the whole task and closes; the result route keeps answering meanwhile (its p99 before and
/// with the streams open is printed: `--nocapture`).
#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_streams_during_a_running_task() {
    const STREAMS: usize = 500;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    assert!(
        open_files >= 2 * STREAMS as u64 + 200,
        "this test holds both ends of {STREAMS} connections: raise `ulimit -n` (is {open_files})"
    );
    let gate = Gate::closed();
    let l = memory(gate.clone(), |_| {}).await;
    let id = l.submit().await;
    held(&l, &id).await;
    let (addr, rid) = (l.addr, id.clone());
    let before = tokio::task::spawn_blocking(move || result_p99(addr, &rid, 300))
        .await
        .unwrap();
    let path = format!("/api/v3/predictions/{id}/events");
    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        streams.push(open_raw(addr, &path).await);
    }
    let rid = id.clone();
    let during = tokio::task::spawn_blocking(move || result_p99(addr, &rid, 300))
        .await
        .unwrap();
    gate.open();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|s| {
            tokio::spawn(async move { read_to_end(s).await.contains("\"status\":\"completed\"") })
        })
        .collect();
    let mut completed = 0;
    for r in readers {
        completed += usize::from(r.await.unwrap());
    }
    assert_eq!(completed, STREAMS, "every stream was told the outcome");
    println!(
        "GET /result p99 over 300 requests: {before:.2} ms with no stream open, \
         {during:.2} ms with {STREAMS} event streams open on the running task"
    );
    assert_eq!(l.h.get(&id).await["status"], "completed");
    l.stop().await;
}
