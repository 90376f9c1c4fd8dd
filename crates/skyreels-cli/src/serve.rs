//! `skyreels serve`: the HTTP server backed by the real pipeline.

use crate::generator::{loaders, SafetySettings};
use crate::{worker_groups, ModelArgs};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use skyreels_server::backend::redis::{ClusterConfig, OutputStore};
use skyreels_server::engine::worker::NsfwAction;
use skyreels_server::generator::GeneratorLoader;
use skyreels_server::loras::LoraConfig;
use skyreels_server::{Server, ServerConfig};
use std::path::PathBuf;
use std::time::Duration;

/// The id image-to-video models are served under (WaveSpeed's).
pub const I2V_MODEL_ID: &str = "wavespeed-ai/SkyReels-V1";
/// The id a text-to-video transformer is served under.
pub const T2V_MODEL_ID: &str = "wavespeed-ai/SkyReels-V1-T2V";

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// What every node takes, whether it serves HTTP (`serve`) or only runs workers (`worker`).
#[derive(Args)]
pub struct NodeArgs {
    /// Folder for videos, task records, uploads and the webhook secret (kept across restarts);
    /// in Redis mode only scratch space, or the shared folder of --output-store dir.
    #[arg(long, env = "SKYREELS_OUTPUT_DIR", default_value = "skyreels-outputs")]
    output_dir: PathBuf,
    /// Let image URLs and webhooks reach loopback, private and link-local addresses (a
    /// workstation on a private network; never on a public server).
    #[arg(long, env = "SKYREELS_ALLOW_PRIVATE_IMAGE_URLS")]
    allow_private_image_urls: bool,
    /// Hours finished tasks, their videos and uploads are kept; 0 keeps them forever.
    #[arg(
        long,
        env = "SKYREELS_RETENTION_HOURS",
        default_value_t = 24.0,
        allow_negative_numbers = true
    )]
    retention_hours: f64,
    /// Webhook signing secret (whsec_...) [default: generated once, kept in the output folder].
    #[arg(long, env = "SKYREELS_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// Seconds the running task may take to finish on SIGTERM before it is cancelled (in Redis
    /// mode: left for another worker to run again).
    #[arg(long, env = "SKYREELS_SHUTDOWN_GRACE", default_value_t = 30)]
    shutdown_grace: u64,
    /// Seconds a task may run before it is stopped (status failed, code 5004); 0: no limit.
    #[arg(long, env = "SKYREELS_MAX_TASK_SECONDS", default_value_t = 7200)]
    max_task_seconds: u64,
    /// Log lines as text or JSON (filter with RUST_LOG, default info).
    #[arg(long, env = "SKYREELS_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Redis mode: share task records, the queue, uploads, cancel requests, progress and
    /// outputs with the other nodes through this Redis 7 (redis://HOST:PORT/DB); any node then
    /// answers for any task. Without it, this process keeps its own queue.
    #[arg(
        long,
        env = "SKYREELS_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    redis: Option<String>,
    /// Redis mode: where finished videos are kept: redis (the MP4 bytes, expiring with the
    /// retention) or dir (files in --output-dir, which must then be a filesystem every node
    /// shares).
    #[arg(
        long,
        env = "SKYREELS_OUTPUT_STORE",
        value_enum,
        default_value = "redis"
    )]
    output_store: OutputStoreArg,
    /// Redis mode: seconds without a heartbeat after which a running task's worker is taken
    /// for dead and another worker starts the task again (after 3 attempts it fails, 5003).
    #[arg(long, env = "SKYREELS_CLAIM_TIMEOUT", default_value_t = 30.0)]
    claim_timeout: f64,
    /// Redis mode: hours a task may wait to start; past it the task fails (5003) instead of
    /// holding its queue place and its input in Redis.
    #[arg(long, env = "SKYREELS_QUEUE_TTL_HOURS", default_value_t = 6.0)]
    queue_ttl_hours: f64,
    /// Redis mode: minutes after the last live worker of a model left before the model is
    /// forgotten (its submits get 404 and its waiting tasks fail with 5003).
    #[arg(
        long,
        env = "SKYREELS_FORGET_MODELS_AFTER_MINUTES",
        default_value_t = 60.0
    )]
    forget_models_after_minutes: f64,
    /// Redis mode: PEM file of the certificate authority that signed a rediss:// server's
    /// certificate [default: the system's trusted authorities].
    #[arg(long, env = "SKYREELS_REDIS_CA", value_name = "FILE")]
    redis_ca: Option<PathBuf>,
    /// Redis mode: accept a --redis URL without a password on an address other than
    /// loopback (anyone who reaches that Redis can read every input and queue any task).
    #[arg(long, env = "SKYREELS_ALLOW_REDIS_WITHOUT_PASSWORD")]
    allow_redis_without_password: bool,
    /// Largest task accepted, as width x height x frames x steps in millions (SkyReels'
    /// default 960x544, 97 frames, 30 steps is 1,520); larger submits get a 400 that says so,
    /// and a worker refuses a queued task above its own limit.
    #[arg(long, env = "SKYREELS_MAX_WORK", default_value_t = 3000.0)]
    max_work: f64,
    /// Largest clip a worker takes, as width x height x frames (pixel-frames: the memory a task
    /// needs follows it, whatever its steps); larger submits get a 400 that says so, and a
    /// worker fails a larger task (1401) instead of running out of memory. [default: sized to
    /// each worker's device once the model is loaded: the clip whose estimated activations
    /// fit in 3/4 of the memory then free (GPU memory on CUDA; on the CPU the host's available
    /// memory, within the cgroup and `ulimit -v` limits, shared by the CPU workers); where that
    /// is unknown, 50,657,280 = 960x544x97, SkyReels' default clip]
    #[arg(long, env = "SKYREELS_MAX_PIXEL_FRAMES", value_name = "N")]
    max_pixel_frames: Option<u64>,
    /// Warm start: after loading, each worker runs one small generation (the model's smallest
    /// size, 1 step; no output kept, no task) before /ready answers 200, so the first client
    /// does not pay one-time costs; its time is logged and its failure fails the start.
    #[arg(long, env = "SKYREELS_WARMUP")]
    warmup: bool,
    #[command(flatten)]
    loras: LoraArgs,
    #[command(flatten)]
    pub(crate) safety: SafetyArgs,
}

/// The NSFW safety checker each worker runs on its videos (docs/safety-checker.md).
#[derive(Args)]
pub(crate) struct SafetyArgs {
    /// A safety checker in the layout of diffusers' StableDiffusionSafetyChecker: a hub repo id
    /// (e.g. CompVis/stable-diffusion-safety-checker) or a folder (config.json,
    /// model.safetensors, preprocessor_config.json; or a Stable Diffusion folder's
    /// safety_checker/ and feature_extractor/). Each worker loads it after the model and checks
    /// --safety-frames frames of every video whose task leaves enable_safety_checker on;
    /// has_nsfw_contents says what it found. Without it no checker runs (has_nsfw_contents
    /// stays false).
    #[arg(long, env = "SKYREELS_SAFETY_CHECKER", value_name = "REPO_ID|DIR")]
    pub(crate) safety_checker: Option<String>,
    /// Frames of each video the checker looks at, spread evenly (the first and the last among
    /// them); a video is flagged when any of them is.
    #[arg(
        long,
        env = "SKYREELS_SAFETY_FRAMES",
        value_name = "N",
        default_value_t = 8
    )]
    pub(crate) safety_frames: usize,
    /// What a flagged video becomes: flag (the task completes with has_nsfw_contents [true])
    /// or block (the task fails with code 1451 and its video is deleted).
    #[arg(long, env = "SKYREELS_NSFW_ACTION", value_enum, default_value_t = NsfwActionArg::Flag)]
    nsfw_action: NsfwActionArg,
}

impl SafetyArgs {
    /// The checker each worker loads, and the frames it looks at.
    fn settings(&self) -> Option<SafetySettings> {
        self.safety_checker.clone().map(|source| SafetySettings {
            source,
            frames: self.safety_frames,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum NsfwActionArg {
    Flag,
    Block,
}

/// A request's LoRAs (`loras: [{"path", "scale"}]`): a worker finds and applies them, an API
/// node checks submits against the same rules (give every node of a deployment the same).
#[derive(Args)]
struct LoraArgs {
    /// Most LoRAs one request may name (WaveSpeed's 3); more is a 400 naming `loras`. 0 refuses
    /// every request with a LoRA.
    #[arg(long, env = "SKYREELS_MAX_LORAS", default_value_t = skyreels_params::MAX_LORAS)]
    max_loras: usize,
    /// Folder of LoRA files requests may name: a `loras` path with no slash is a file here
    /// (".safetensors" appended unless it ends so; no "..", no leading ".", no subfolders). A
    /// name that is not here is a 400. Without this flag names are refused; URLs and hub files
    /// (OWNER/REPO/FILE.safetensors) need no folder.
    #[arg(long, env = "SKYREELS_LORA_DIR", value_name = "DIR")]
    lora_dir: Option<PathBuf>,
    /// Largest LoRA downloaded from an http(s) URL, in MiB: the download stops there and the
    /// task fails (1402). Downloads are kept in the output folder's loras/ (named by the URL's
    /// SHA-256), so a URL is fetched once; they reach only public addresses unless
    /// --allow-private-image-urls.
    #[arg(long, env = "SKYREELS_MAX_LORA_MB", default_value_t = skyreels_server::loras::DEFAULT_MAX_LORA_MB)]
    max_lora_mb: u64,
    /// Refuse LoRAs given as URLs (a 400 naming `loras`); names in --lora-dir and hub files
    /// still work.
    #[arg(long, env = "SKYREELS_NO_LORA_URLS")]
    no_lora_urls: bool,
    /// MiB of parsed LoRA adapters each worker keeps in memory (least recently used dropped
    /// first, keyed by file content), so a LoRA used again is not read and parsed again.
    #[arg(long, env = "SKYREELS_LORA_CACHE_MB", default_value_t = skyreels_server::loras::DEFAULT_LORA_CACHE_MB)]
    lora_cache_mb: u64,
}

impl LoraArgs {
    fn config(self) -> Result<LoraConfig> {
        if self.max_lora_mb == 0 {
            anyhow::bail!("--max-lora-mb must be at least 1");
        }
        if let Some(dir) = &self.lora_dir {
            if !dir.is_dir() {
                anyhow::bail!("--lora-dir {}: not a folder", dir.display());
            }
        }
        Ok(LoraConfig {
            max: self.max_loras,
            dir: self.lora_dir,
            max_download_bytes: self.max_lora_mb.min(1 << 30) << 20,
            urls: !self.no_lora_urls,
            cache_bytes: self.lora_cache_mb.min(1 << 30) << 20,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputStoreArg {
    Redis,
    Dir,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    node: NodeArgs,
    /// Workers this node runs, one per --device entry (or --parallel group) from the first
    /// [default: all of them]; 0 makes an API-only node of a Redis deployment.
    #[arg(long, env = "SKYREELS_WORKERS")]
    workers: Option<usize>,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, env = "SKYREELS_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (logged).
    #[arg(long, env = "SKYREELS_PORT", default_value_t = 8000)]
    port: u16,
    /// Accepted API key (repeat the flag, or comma-separate in the env var). Without any key
    /// the API is open to whoever reaches the port.
    #[arg(
        long = "api-key",
        env = "SKYREELS_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Tasks accepted and waiting at most; beyond it submits get 429 with Retry-After.
    #[arg(long, env = "SKYREELS_MAX_QUEUE", default_value_t = 16)]
    max_queue: usize,
    /// Base of the URLs handed out (e.g. https://video.example.com) [default: from each
    /// request's Host header].
    #[arg(long, env = "SKYREELS_PUBLIC_URL")]
    public_url: Option<String>,
    /// Seconds a sync-mode submit waits before answering "still processing" (code 5004).
    #[arg(long, env = "SKYREELS_SYNC_TIMEOUT", default_value_t = 90)]
    sync_timeout: u64,
    /// Largest request body in MiB (JSON with data: URI images, uploads).
    #[arg(long, env = "SKYREELS_MAX_BODY_MIB", default_value_t = 64)]
    max_body_mib: usize,
    /// Largest image in MiB, however it arrives (an upload, a URL, a data: URI).
    #[arg(long, env = "SKYREELS_MAX_UPLOAD_MB", default_value_t = 16)]
    max_upload_mb: usize,
    /// Redis mode: MiB of uploads one API key may keep (they live in Redis' memory until the
    /// retention ends).
    #[arg(long, env = "SKYREELS_UPLOAD_QUOTA_MB", default_value_t = 256)]
    upload_quota_mb: u64,
    /// Redis mode: MiB of uploads kept over all keys.
    #[arg(long, env = "SKYREELS_UPLOAD_TOTAL_MB", default_value_t = 2048)]
    upload_total_mb: u64,
    /// A host name clients may use besides the bound address and localhost (repeat the flag, or
    /// comma-separate in the env var). Without --public-url, requests naming any other Host
    /// are refused (a web page cannot drive the API through DNS rebinding).
    #[arg(
        long = "allowed-host",
        env = "SKYREELS_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    allowed_hosts: Vec<String>,
    /// Require an API key for /metrics, /docs and /openapi.json too (they are open by default,
    /// for scrapers).
    #[arg(long, env = "SKYREELS_PROTECT_OPS")]
    protect_ops: bool,
    /// Step caching of tasks whose submit has no `cache` field: `none`, `first-block:T`,
    /// `teacache:T`, `magcache[:T[,max_skip=K][,retention=R]]` (with --cache-ratios) or
    /// `taylorseer[:interval=I][,order=O][,warmup=W][,stop=S]` (see `skyreels generate --help`).
    #[arg(
        long,
        env = "SKYREELS_CACHE",
        value_name = "SPEC",
        default_value = "none"
    )]
    cache: skyreels_params::CacheSpec,
    /// CFG gating of tasks whose submit has no `cfg_gate` field: F above 0 and below 1 (see
    /// `skyreels generate --help`) [default: off].
    #[arg(
        long,
        env = "SKYREELS_CFG_GATE",
        value_name = "F",
        value_parser = skyreels_params::parse_cfg_gate
    )]
    cfg_gate: Option<f64>,
    /// Seconds a client has to send a request's headers, from connecting or from the previous
    /// response (idle keep-alive connections close after it too).
    #[arg(long, env = "SKYREELS_HEADER_TIMEOUT", default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a request's whole body may take to arrive (408 after).
    #[arg(long, env = "SKYREELS_BODY_TIMEOUT", default_value_t = 120)]
    body_timeout: u64,
    /// Seconds a connection may sit with no bytes moving while no request is being handled.
    #[arg(long, env = "SKYREELS_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout: u64,
    /// Connections served at once; more wait to be accepted.
    #[arg(long, env = "SKYREELS_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Live-progress streams (GET /api/v3/predictions/{id}/events) open at once; each also
    /// holds one of --max-connections, so keep it below that. More are answered 503 (clients
    /// poll /result meanwhile). 0 turns the route off.
    #[arg(long, env = "SKYREELS_MAX_EVENT_STREAMS", default_value_t = 512)]
    max_event_streams: usize,
}

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    node: NodeArgs,
    /// Serve /metrics (and /health) on this port; no other HTTP.
    #[arg(long, env = "SKYREELS_METRICS_PORT")]
    metrics_port: Option<u16>,
    /// Address of the metrics port.
    #[arg(long, env = "SKYREELS_METRICS_HOST", default_value = "127.0.0.1")]
    metrics_host: String,
}

/// Logging, and the configuration every node shares (the engine, retention, webhooks, task
/// limits).
fn node_config(node: NodeArgs) -> Result<ServerConfig> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // colours only for a terminal: a log file gets plain text
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match node.log_format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().init(),
    }
    if !(node.retention_hours.is_finite() && node.retention_hours >= 0.0) {
        anyhow::bail!(
            "--retention-hours must be >= 0, got {}",
            node.retention_hours
        );
    }
    for (flag, v) in [
        ("--claim-timeout", node.claim_timeout),
        ("--queue-ttl-hours", node.queue_ttl_hours),
        (
            "--forget-models-after-minutes",
            node.forget_models_after_minutes,
        ),
        ("--max-work", node.max_work),
    ] {
        if !(v.is_finite() && v > 0.0 && v < 1e9) {
            anyhow::bail!("{flag} must be a positive number, got {v}");
        }
    }
    let mut config = ServerConfig::new(&node.output_dir);
    config.loras = node.loras.config()?;
    config.allow_private_urls = node.allow_private_image_urls;
    config.retention = (node.retention_hours > 0.0)
        .then(|| Duration::from_secs_f64(node.retention_hours * 3600.0));
    config.webhook_secret = node.webhook_secret;
    config.shutdown_grace = Duration::from_secs(node.shutdown_grace);
    config.max_task_time =
        (node.max_task_seconds > 0).then(|| Duration::from_secs(node.max_task_seconds));
    config.max_work = node.max_work;
    config.warmup = node.warmup;
    if node.safety.safety_frames == 0 {
        anyhow::bail!("--safety-frames must be at least 1");
    }
    config.nsfw_action = match node.safety.nsfw_action {
        NsfwActionArg::Flag => NsfwAction::Flag,
        NsfwActionArg::Block => NsfwAction::Block,
    };
    config.redis = node.redis.map(|url| ClusterConfig {
        claim_timeout: Duration::from_secs_f64(node.claim_timeout),
        output_store: match node.output_store {
            OutputStoreArg::Redis => OutputStore::Redis,
            OutputStoreArg::Dir => OutputStore::Dir,
        },
        queue_ttl: Duration::from_secs_f64(node.queue_ttl_hours * 3600.0),
        forget_models_after: Duration::from_secs_f64(node.forget_models_after_minutes * 60.0),
        ca_cert: node.redis_ca,
        allow_no_password: node.allow_redis_without_password,
        ..ClusterConfig::new(url)
    });
    Ok(config)
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let max_pixel_frames = args.node.max_pixel_frames;
    let safety = args.node.safety.settings();
    let mut config = node_config(args.node)?;
    if args.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    for (flag, v) in [
        ("--max-upload-mb", args.max_upload_mb as u64),
        ("--upload-quota-mb", args.upload_quota_mb),
        ("--upload-total-mb", args.upload_total_mb),
        ("--header-timeout", args.header_timeout),
        ("--body-timeout", args.body_timeout),
        ("--idle-timeout", args.idle_timeout),
        ("--max-connections", args.max_connections as u64),
    ] {
        if v == 0 {
            anyhow::bail!("{flag} must be at least 1");
        }
    }
    if args.max_event_streams >= args.max_connections {
        anyhow::bail!(
            "--max-event-streams {} must be below --max-connections {}: every stream holds a \
             connection, and the other requests need some",
            args.max_event_streams,
            args.max_connections
        );
    }
    config.api_keys = args
        .api_keys
        .into_iter()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    config.max_queue = args.max_queue;
    config.public_url = args.public_url;
    config.sync_timeout = Duration::from_secs(args.sync_timeout);
    config.max_body_bytes = args.max_body_mib << 20;
    config.max_upload_bytes = args.max_upload_mb.min(4096) << 20;
    if let Some(r) = config.redis.as_mut() {
        r.quotas.uploads_per_key = args.upload_quota_mb.min(1 << 30) << 20;
        r.quotas.uploads_total = args.upload_total_mb.min(1 << 30) << 20;
    }
    config.allowed_hosts = args.allowed_hosts;
    config.protect_ops = args.protect_ops;
    config.cache = args.cache;
    config.cfg_gate = args.cfg_gate;
    config.header_timeout = Duration::from_secs(args.header_timeout);
    config.body_timeout = Duration::from_secs(args.body_timeout);
    config.idle_timeout = Duration::from_secs(args.idle_timeout);
    config.max_connections = args.max_connections;
    config.max_event_streams = args.max_event_streams;
    let groups = worker_groups(&args.model)?.len();
    match args.workers {
        Some(0) if config.redis.is_none() => anyhow::bail!(
            "--workers 0 (an API-only node) needs --redis: without it nothing would run the tasks"
        ),
        Some(n) if n > groups => anyhow::bail!(
            "--workers {n}: this node has {groups} device entries (--device) to run workers on"
        ),
        _ => {}
    }
    let loaders = loaders(
        args.model,
        args.workers.unwrap_or(groups),
        max_pixel_frames,
        config.loras.cache_bytes,
        safety,
    )?;
    run_node(config, loaders, (args.host, args.port))
}

/// `skyreels worker`: workers of a Redis deployment, no API (only /metrics with
/// --metrics-port).
pub fn worker(args: WorkerArgs) -> Result<()> {
    let max_pixel_frames = args.node.max_pixel_frames;
    let safety = args.node.safety.settings();
    let mut config = node_config(args.node)?;
    if config.redis.is_none() {
        anyhow::bail!(
            "skyreels worker takes its tasks from Redis: pass --redis redis://HOST:PORT/DB (or \
             set SKYREELS_REDIS_URL); `skyreels serve` runs API and workers in one process"
        );
    }
    config.metrics_only = true;
    let loaders = loaders(
        args.model,
        usize::MAX,
        max_pixel_frames,
        config.loras.cache_bytes,
        safety,
    )?;
    match args.metrics_port {
        Some(port) => run_node(config, loaders, (args.metrics_host, port)),
        None => {
            let runtime = runtime()?;
            runtime.block_on(async move {
                let mut server = Server::start_node(config, loaders).await?;
                tokio::select! {
                    r = server.wait_loaded() => r?,
                    () = skyreels_server::shutdown_signal() => {}
                }
                tracing::info!("workers running; stop with SIGTERM");
                skyreels_server::shutdown_signal().await;
                tracing::info!("shutting down: draining");
                server.drain().await;
                anyhow::Ok(())
            })
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Starts the node's engine and workers and serves HTTP on `host:port` until SIGTERM.
fn run_node(
    config: ServerConfig,
    loaders: Vec<GeneratorLoader>,
    (host, port): (String, u16),
) -> Result<()> {
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}"))?;
        let server = Server::start_node(config, loaders).await?;
        server
            .run(listener, skyreels_server::shutdown_signal())
            .await?;
        anyhow::Ok(())
    })
}
