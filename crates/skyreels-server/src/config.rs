//! What a server is told at start-up.

use crate::engine::worker::NsfwAction;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the server is told at start-up.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Videos, job records, uploads and the webhook secret live here.
    pub output_dir: PathBuf,
    /// Accepted bearer keys; empty: no authentication.
    pub api_keys: Vec<String>,
    /// Tasks accepted and not yet started, at most.
    pub max_queue: usize,
    /// Base of the absolute URLs handed out; `None`: from each request's Host.
    pub public_url: Option<String>,
    /// Let image URLs (and webhooks) reach loopback, private and link-local addresses.
    pub allow_private_urls: bool,
    /// How long a sync-mode submit waits before answering "still processing".
    pub sync_timeout: Duration,
    /// Finished tasks, their videos and uploads are deleted this long after they finish;
    /// `None` keeps them.
    pub retention: Option<Duration>,
    /// Largest request body (JSON with data: URIs, uploads).
    pub max_body_bytes: usize,
    /// Largest image, however it arrives (an upload, a URL, a data: URI): what a task keeps of
    /// it (in Redis mode the queued input) is at most this.
    pub max_upload_bytes: usize,
    /// `whsec_...`; `None`: generated once and kept in the output folder.
    pub webhook_secret: Option<String>,
    /// First webhook retry delay (doubles per retry).
    pub webhook_backoff: Duration,
    /// Timeout for fetching an image (and for one webhook attempt).
    pub fetch_timeout: Duration,
    /// On shutdown, how long the running task may take to finish before it is cancelled.
    pub shutdown_grace: Duration,
    /// Host names accepted besides the bound address and localhost (without `public_url`).
    pub allowed_hosts: Vec<String>,
    /// `/metrics`, `/docs` and `/openapi.json` need a key too.
    pub protect_ops: bool,
    /// Largest task, as width x height x frames x steps in millions.
    pub max_work: f64,
    /// A running task is stopped (failed, 5004) after this long; `None`: no limit.
    pub max_task_time: Option<Duration>,
    /// A client must send a request's headers within this time of connecting or of the
    /// previous response (an idle keep-alive connection closes after it too).
    pub header_timeout: Duration,
    /// A request's whole body must arrive within this time (408 otherwise).
    pub body_timeout: Duration,
    /// A connection where no byte moves either way for this long while no handler runs is
    /// closed (a client that stopped reading a response).
    pub idle_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Event streams (`/predictions/{id}/events`) open at once; each also holds one of the
    /// `max_connections`. More are refused (503) until one closes.
    pub max_event_streams: usize,
    /// Step caching of tasks whose submit has no `cache`.
    pub cache: skyreels_params::CacheSpec,
    /// CFG gating of tasks whose submit has no `cfg_gate` (None: off).
    pub cfg_gate: Option<f64>,
    /// Redis mode: tasks, queue, uploads and outputs shared with the other nodes; `None`: the
    /// in-memory engine of one process.
    pub redis: Option<crate::backend::redis::ClusterConfig>,
    /// Serve `/metrics` and `/health` only (`skyreels worker --metrics-port`).
    pub metrics_only: bool,
    /// LoRAs: how many a request may name, where names and downloads are, the download
    /// limit, whether URLs are accepted (`--max-loras`, `--lora-dir`, ...).
    pub loras: crate::loras::LoraConfig,
    /// Each worker runs one small generation per model after loading, before the node is
    /// ready (`--warmup`; see [`crate::warmup`]).
    pub warmup: bool,
    /// What a video the safety checker flagged becomes (`--nsfw-action`).
    pub nsfw_action: NsfwAction,
}

impl ServerConfig {
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
            api_keys: vec![],
            max_queue: 16,
            public_url: None,
            allow_private_urls: false,
            sync_timeout: Duration::from_secs(90),
            retention: Some(Duration::from_secs(24 * 3600)),
            max_body_bytes: 64 << 20,
            max_upload_bytes: 16 << 20,
            webhook_secret: None,
            webhook_backoff: Duration::from_secs(2),
            fetch_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            allowed_hosts: vec![],
            protect_ops: false,
            max_work: 3000.0,
            max_task_time: None,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_event_streams: 512,
            cache: skyreels_params::CacheSpec::None,
            cfg_gate: None,
            redis: None,
            metrics_only: false,
            loras: crate::loras::LoraConfig::default(),
            warmup: false,
            nsfw_action: NsfwAction::Flag,
        }
    }
}
