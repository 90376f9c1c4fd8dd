//! `skyreels-server`: a WaveSpeed `/api/v3` compatible HTTP server for video generation.
//!
//! Layers: [`generator::Generator`] (the model, behind a trait; no candle here) -> worker
//! threads, one per device, each owning its own generator -> [`jobs::Jobs`], the job store seam:
//! [`store::Store`] (one process: jobs, FIFO queue, uploads, records on disk) or
//! [`cluster::Cluster`] (Redis, shared by many API nodes and workers) -> [`api::router`] (axum,
//! its contract typed in [`contract`]) -> connections served with timeouts and a cap (`http`).
//! Finished tasks flow to an async task that logs them and sends webhooks. The HTTP contract is
//! `docs/API.md`.

pub mod api;
pub mod cluster;
pub mod contract;
pub mod generator;
mod http;
pub mod job;
pub mod jobs;
pub mod media;
pub mod metrics;
pub mod openapi;
pub mod store;
mod view;
pub mod webhook;
mod worker;

/// Compares two digests in constant time.
pub(crate) fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

use cluster::{Cluster, ClusterConfig};
use generator::{GeneratorLoader, ModelInfo};
use jobs::Jobs;
use metrics::Metrics;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use store::Store;

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
    /// Step caching of tasks whose submit has no `cache`.
    pub cache: skyreels_params::CacheSpec,
    /// Redis mode: tasks, queue, uploads and outputs shared with the other nodes; `None`: the
    /// in-memory engine of one process.
    pub redis: Option<ClusterConfig>,
    /// Serve `/metrics` and `/health` only (`skyreels worker --metrics-port`).
    pub metrics_only: bool,
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
            cache: skyreels_params::CacheSpec::None,
            redis: None,
            metrics_only: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot set up the webhook secret in {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the model failed: {0}")]
    Load(String),
    #[error("{0}")]
    Redis(String),
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Shared by all handlers.
pub struct AppState {
    pub config: ServerConfig,
    /// Tasks, the queue, uploads and outputs.
    pub jobs: Jobs,
    pub metrics: Arc<Metrics>,
    /// Set by the first worker whose generator is loaded.
    pub models: OnceLock<Vec<ModelInfo>>,
    /// Workers whose generator is loaded.
    pub workers_loaded: std::sync::atomic::AtomicUsize,
    /// The signing secret (in Redis mode the cluster's, re-read while the node runs).
    webhook_secret: std::sync::RwLock<String>,
    /// Blocking HTTP client for images and webhooks (address policy applied).
    pub agent: ureq::Agent,
    pub(crate) key_hashes: Vec<[u8; 32]>,
    /// Image downloads in flight at once.
    pub(crate) fetches: tokio::sync::Semaphore,
    /// Image decodes at once (each may hold up to `media::MAX_DECODE_ALLOC`).
    pub(crate) decodes: tokio::sync::Semaphore,
    /// Webhook attempts in flight at once.
    pub(crate) webhooks: tokio::sync::Semaphore,
}

impl AppState {
    fn new(config: ServerConfig, jobs: Jobs, metrics: Arc<Metrics>, secret: String) -> Arc<Self> {
        Arc::new(AppState {
            key_hashes: config
                .api_keys
                .iter()
                .map(|k| Sha256::digest(k.trim().as_bytes()).into())
                .collect(),
            agent: media::http_agent(config.allow_private_urls, config.fetch_timeout),
            config,
            jobs,
            metrics,
            models: OnceLock::new(),
            workers_loaded: Default::default(),
            webhook_secret: std::sync::RwLock::new(secret),
            fetches: tokio::sync::Semaphore::new(CONCURRENT_FETCHES),
            decodes: tokio::sync::Semaphore::new(CONCURRENT_DECODES),
            webhooks: tokio::sync::Semaphore::new(webhook::CONCURRENT_DELIVERIES),
        })
    }
}

impl AppState {
    /// The webhook signing secret in use.
    pub fn webhook_secret(&self) -> String {
        self.webhook_secret
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The configured webhook secret, else the one kept in the output folder (created once).
fn local_secret(config: &ServerConfig) -> Result<String, ServerError> {
    webhook::load_or_create_secret(config.webhook_secret.clone(), &config.output_dir).map_err(
        |source| ServerError::Secret {
            path: config.output_dir.clone(),
            source,
        },
    )
}

/// Image downloads and decodes at once.
pub const CONCURRENT_FETCHES: usize = 8;
pub const CONCURRENT_DECODES: usize = 2;

/// A running server's parts, before it is bound to a socket (tests drive the router directly).
pub struct Server {
    pub state: Arc<AppState>,
    workers: Vec<std::thread::JoinHandle<()>>,
    loaded: Vec<tokio::sync::oneshot::Receiver<Result<(), String>>>,
}

impl Server {
    /// Opens the output folder (recovering earlier records), starts the worker thread (which
    /// loads the generator), the finished-task consumer (log, webhooks) and the retention
    /// sweeper. Call inside a tokio runtime.
    pub fn start(config: ServerConfig, loader: GeneratorLoader) -> Result<Self, ServerError> {
        Self::start_workers(config, vec![loader])
    }

    /// [`Server::start`] with one worker thread per loader (one per device, each with its own
    /// copy of the model), all taking tasks from the same FIFO queue. In-memory engine only
    /// (see [`Server::start_node`]).
    pub fn start_workers(
        config: ServerConfig,
        loaders: Vec<GeneratorLoader>,
    ) -> Result<Self, ServerError> {
        if loaders.is_empty() {
            return Err(ServerError::Load("no device to run a worker on".into()));
        }
        let metrics = Arc::<Metrics>::default();
        let (store, finished) = Store::open(&config.output_dir, config.max_queue, metrics.clone())?;
        let store = Arc::new(store);
        let secret = local_secret(&config)?;
        let state = AppState::new(config, Jobs::Memory(store.clone()), metrics, secret);
        let mut workers = Vec::with_capacity(loaders.len());
        let mut loaded = Vec::with_capacity(loaders.len());
        for (i, loader) in loaders.into_iter().enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            workers.push(worker::spawn(state.clone(), store.clone(), loader, tx, i)?);
            loaded.push(rx);
        }
        tokio::spawn(worker::finished_tasks(state.clone(), finished));
        if let Some(retention) = state.config.retention {
            tokio::spawn(async move {
                let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
                loop {
                    tokio::time::sleep(every).await;
                    let store = store.clone();
                    let ms = retention.as_millis() as u64;
                    if let Ok(n) = tokio::task::spawn_blocking(move || store.sweep(ms)).await {
                        if n > 0 {
                            tracing::info!("retention: removed {n} expired tasks and uploads");
                        }
                    }
                }
            });
        }
        Ok(Self {
            state,
            workers,
            loaded,
        })
    }

    /// A node of either engine: [`Server::start_workers`] without `config.redis`; with it, a
    /// node of the Redis engine whose workers (one per loader; none for an API-only node) take
    /// tasks from the shared queues. The webhook secret is the cluster's (kept in Redis).
    pub async fn start_node(
        config: ServerConfig,
        loaders: Vec<GeneratorLoader>,
    ) -> Result<Self, ServerError> {
        let Some(redis) = config.redis.clone() else {
            return Self::start_workers(config, loaders);
        };
        let metrics = Arc::<Metrics>::default();
        let paths = store::Paths::create(&config.output_dir)?;
        let (cluster, finished) = Cluster::open(
            redis,
            paths,
            config.max_queue,
            config.retention,
            metrics.clone(),
        )
        .map_err(ServerError::Redis)?;
        let cluster = Arc::new(cluster);
        let mine = local_secret(&config)?;
        let configured = config.webhook_secret.is_some();
        let secret = cluster
            .shared_secret(mine, configured)
            .await
            .map_err(ServerError::Redis)?;
        if let Some(problem) = cluster.memory_policy_problem().await {
            tracing::warn!("{problem}");
        }
        let state = AppState::new(config, Jobs::Redis(cluster.clone()), metrics, secret);
        let mut workers = Vec::with_capacity(loaders.len());
        let mut loaded = Vec::with_capacity(loaders.len());
        for (i, loader) in loaders.into_iter().enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            workers.push(cluster::worker::spawn(
                state.clone(),
                cluster.clone(),
                loader,
                tx,
                i,
            )?);
            loaded.push(rx);
        }
        tokio::spawn(worker::finished_tasks(state.clone(), finished));
        tokio::spawn(housekeeping(state.clone(), cluster, configured));
        Ok(Self {
            state,
            workers,
            loaded,
        })
    }

    /// The router as a socket-less caller sees it (tests): Host names other than loopback,
    /// localhost and the allowed ones are refused.
    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone(), api::HostPolicy::new(&self.state, None))
    }

    /// Waits until every worker's generator is loaded (or one failed to load).
    pub async fn wait_loaded(&mut self) -> Result<(), ServerError> {
        let many = self.loaded.len() > 1;
        for (i, rx) in self.loaded.iter_mut().enumerate() {
            let worker = if many {
                format!("worker {i}: ")
            } else {
                String::new()
            };
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(ServerError::Load(format!("{worker}{e}"))),
                Err(_) => {
                    return Err(ServerError::Load(format!(
                        "{worker}the worker thread stopped"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Stops admitting, fails unstarted tasks (5003), lets the running ones finish within the
    /// grace period and cancels them after that, then waits for the workers.
    pub async fn drain(self) {
        let Server { state, workers, .. } = self;
        state.jobs.drain();
        let handle = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        });
        tokio::pin!(handle);
        if tokio::time::timeout(state.config.shutdown_grace, &mut handle)
            .await
            .is_err()
        {
            tracing::warn!(
                "the running tasks did not finish within the grace period: cancelling them"
            );
            state.jobs.cancel_running();
            // a step or the VAE decode can take a while; past a second grace period the process
            // exits anyway and the record (still "processing") reads as failed after a restart
            if tokio::time::timeout(state.config.shutdown_grace, &mut handle)
                .await
                .is_err()
            {
                tracing::error!("the running task did not stop; leaving it");
            }
        }
        state.jobs.flushed().await;
    }

    /// Serves on `listener` until `shutdown` resolves (or the model fails to load), then
    /// drains. Logs `listening on http://HOST:PORT` once the socket accepts connections.
    pub async fn run(
        mut self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let addr = listener.local_addr()?;
        let router = if self.state.config.metrics_only {
            api::metrics_router(self.state.clone())
        } else {
            api::router(
                self.state.clone(),
                api::HostPolicy::new(&self.state, Some(addr.ip())),
            )
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stop_http = stop_rx.clone();
        let limits = http::Limits::of(&self.state.config);
        let http = tokio::spawn(http::serve(listener, router, limits, async move {
            let _ = stop_http.wait_for(|s| *s).await;
        }));
        if self.state.key_hashes.is_empty() && !self.state.config.metrics_only {
            tracing::warn!("no API key configured: anyone who can reach this port can use the API");
        }
        if self.state.config.metrics_only {
            tracing::info!("listening on http://{addr} (metrics at /metrics)");
        } else {
            tracing::info!(
                "listening on http://{addr} (API at /api/v3, playground at http://{addr}/playground)"
            );
        }
        tokio::pin!(shutdown);
        let load = tokio::select! {
            r = self.wait_loaded() => Some(r),
            () = &mut shutdown => None,
        };
        let finished_loading = load.is_some();
        match load.unwrap_or(Ok(())) {
            Ok(()) => {
                if finished_loading {
                    if self.loaded.is_empty() {
                        tracing::info!("API node ready (no workers here)");
                    } else {
                        tracing::info!("model loaded; ready");
                    }
                    shutdown.await;
                }
                tracing::info!("shutting down: draining");
                self.drain().await;
                let _ = stop_tx.send(true);
                http.await.map_err(std::io::Error::other)?;
                Ok(())
            }
            Err(e) => {
                let _ = stop_tx.send(true);
                let _ = http.await;
                Err(e)
            }
        }
    }
}

/// What every node of a Redis deployment does in the background: once a minute, the sweep of
/// the shared bookkeeping ([`Cluster::sweep`]); every 30 seconds, the webhook secret put back
/// into a Redis that lost its data (or taken from it when another node's is there).
async fn housekeeping(state: Arc<AppState>, cluster: Arc<Cluster>, configured: bool) {
    // a task whose input a dead API node was preparing would hold its queue slot forever
    let stalled = (state.config.fetch_timeout * 4).max(Duration::from_secs(600));
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 0u64.. {
        tick.tick().await;
        let current = state.webhook_secret();
        match cluster.sync_secret(&current, configured).await {
            Ok(s) if s != current => {
                tracing::warn!("the cluster's webhook secret is another node's: using it");
                *state
                    .webhook_secret
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = s;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("webhook secret: redis: {e}"),
        }
        if round % 2 == 1 {
            match cluster.sweep(stalled).await {
                Ok(n) if n > 0 => tracing::warn!("failed {n} tasks that could not start"),
                Ok(_) => {}
                Err(e) => tracing::warn!("sweep: {e}"),
            }
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
