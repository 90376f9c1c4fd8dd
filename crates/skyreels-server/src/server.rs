//! Bootstrap: opens the engine on its backend, starts the worker threads (one per device,
//! each loading its own generator), the finished-task consumer (logs and webhooks) and the
//! housekeeping task, and serves HTTP until shutdown, then drains.

use crate::backend::{memory::Memory, redis::Redis};
use crate::config::ServerConfig;
use crate::engine::files::{FolderError, Paths};
use crate::engine::task::JobRecord;
use crate::engine::worker::{panic_message, WorkerLimits};
use crate::engine::{Engine, EngineError, Hook};
use crate::generator::{Generator, GeneratorLoader};
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::webhook::{self, Delivery};
use crate::{api, http};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error("cannot set up the webhook secret in {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the model failed: {0}")]
    Load(String),
    #[error(transparent)]
    RedisConfig(#[from] crate::backend::redis::ConfigError),
    #[error("redis is not reachable: {0}")]
    Engine(#[from] EngineError),
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A running server's parts, before it is bound to a socket (tests drive the router directly).
pub struct Server {
    pub state: Arc<AppState>,
    workers: Vec<std::thread::JoinHandle<()>>,
    loaded: Vec<tokio::sync::oneshot::Receiver<Result<(), String>>>,
}

impl Server {
    /// A server on the in-memory engine with one worker: opens the output folder (recovering
    /// earlier records) and starts everything. Call inside a tokio runtime.
    pub fn start(config: ServerConfig, loader: GeneratorLoader) -> Result<Self, ServerError> {
        Self::start_workers(config, vec![loader])
    }

    /// [`Server::start`] with one worker thread per loader (one per device, each with its own
    /// copy of the model), all taking tasks from the same FIFO queue. The in-memory engine:
    /// `config.redis` needs [`Server::start_node`].
    pub fn start_workers(
        config: ServerConfig,
        loaders: Vec<GeneratorLoader>,
    ) -> Result<Self, ServerError> {
        if loaders.is_empty() {
            return Err(ServerError::Load("no device to run a worker on".into()));
        }
        if config.redis.is_some() {
            return Err(ServerError::Load(
                "a Redis node is started with Server::start_node".into(),
            ));
        }
        let metrics = Arc::<Metrics>::default();
        let (hook, finished) = Hook::new(metrics.clone());
        let backend = Memory::open(&config.output_dir, config.retention, hook)?;
        let engine = Engine::new(Box::new(backend), config.max_queue, metrics.clone());
        let secret = local_secret(&config)?;
        Self::launch(config, engine, metrics, finished, secret, loaders)
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
        let (hook, finished) = Hook::new(metrics.clone());
        let paths = Paths::create(&config.output_dir)?;
        let backend = Redis::open(redis, paths, config.retention, hook)?;
        let engine = Engine::new(Box::new(backend), config.max_queue, metrics.clone());
        let mine = local_secret(&config)?;
        let secret = engine
            .shared_secret(&mine, config.webhook_secret.is_some())
            .await?;
        if let Some(problem) = engine.setup_problem().await {
            tracing::warn!("{problem}");
        }
        Self::launch(config, engine, metrics, finished, secret, loaders)
    }

    /// The one bootstrap: the state around `engine`, a worker thread per loader, the
    /// finished-task consumer and the housekeeping task.
    fn launch(
        config: ServerConfig,
        engine: Engine,
        metrics: Arc<Metrics>,
        finished: tokio::sync::mpsc::UnboundedReceiver<JobRecord>,
        secret: String,
        loaders: Vec<GeneratorLoader>,
    ) -> Result<Self, ServerError> {
        let state = AppState::new(config, engine, metrics, secret);
        let mut workers = Vec::with_capacity(loaders.len());
        let mut loaded = Vec::with_capacity(loaders.len());
        for (i, loader) in loaders.into_iter().enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            workers.push(spawn_worker(state.clone(), loader, tx, i)?);
            loaded.push(rx);
        }
        tokio::spawn(finished_tasks(state.clone(), finished));
        tokio::spawn(housekeeping(state.clone()));
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

    /// Waits until every worker's generator is loaded (or one failed to load). A worker whose
    /// answer an earlier call read is not waited for again (a server that a test waited for
    /// can still `run`).
    pub async fn wait_loaded(&mut self) -> Result<(), ServerError> {
        let many = self.loaded.len() > 1;
        for (i, rx) in self.loaded.iter_mut().enumerate() {
            if rx.is_terminated() {
                continue;
            }
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
        state.jobs.drain().await;
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

/// The configured webhook secret, else the one kept in the output folder (created once).
fn local_secret(config: &ServerConfig) -> Result<String, ServerError> {
    webhook::load_or_create_secret(config.webhook_secret.clone(), &config.output_dir).map_err(
        |source| ServerError::Secret {
            path: config.output_dir.clone(),
            source,
        },
    )
}

/// Loads worker `index`'s generator and, with `--warmup`, runs its warm-up generation,
/// reporting on `loaded`; `None` when either failed (reported).
fn load(
    state: &AppState,
    loader: GeneratorLoader,
    loaded: tokio::sync::oneshot::Sender<Result<(), String>>,
    index: usize,
) -> Option<Box<dyn Generator>> {
    let mut generator = match catch_unwind(AssertUnwindSafe(loader)) {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => {
            let _ = loaded.send(Err(e));
            return None;
        }
        Err(p) => {
            let _ = loaded.send(Err(panic_message(&p)));
            return None;
        }
    };
    if state.config.warmup {
        if let Err(e) = crate::warmup::warm_up(&mut *generator, state.config.max_work, index) {
            let _ = loaded.send(Err(e));
            return None;
        }
    }
    let _ = state.models.set(generator.models());
    state.workers_loaded.fetch_add(1, Ordering::Relaxed);
    let _ = loaded.send(Ok(()));
    Some(generator)
}

/// Starts worker thread `index`: it loads its generator, reports on `loaded`, then runs the
/// engine's tasks on it until the engine drains.
fn spawn_worker(
    state: Arc<AppState>,
    loader: GeneratorLoader,
    loaded: tokio::sync::oneshot::Sender<Result<(), String>>,
    index: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("skyreels-worker-{index}"))
        .spawn(move || {
            let Some(mut generator) = load(&state, loader, loaded, index) else {
                return;
            };
            let engine = &state.jobs;
            let mut consumer = engine.consumer(&generator.models(), index);
            let limits = WorkerLimits {
                max_work: state.config.max_work,
                max_loras: state.config.loras.max,
                max_task_time: state.config.max_task_time,
            };
            crate::engine::worker::work(
                engine,
                &mut *consumer,
                &mut *generator,
                limits,
                &state.loras,
            );
        })
}

/// Logs finished tasks and fires their webhooks: each delivery is a task of its own, so a
/// slow or dead receiver holds nothing else up, and at most
/// [`webhook::CONCURRENT_DELIVERIES`] attempts run at a time. (The engine's hook counted them
/// in the metrics.)
async fn finished_tasks(
    state: Arc<AppState>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<JobRecord>,
) {
    while let Some(record) = rx.recv().await {
        tracing::info!(id = %record.id, status = record.status.as_str(), error = ?record.error, "task finished");
        let Some(url) = record.webhook.clone() else {
            continue;
        };
        let st = state.clone();
        tokio::spawn(async move {
            if !st.jobs.claim_webhook(&record).await {
                return;
            }
            let body = match serde_json::to_vec(&crate::view::prediction(&st, &record, None).await)
            {
                Ok(b) => Arc::new(b),
                Err(_) => return,
            };
            let c = &st.config;
            let id = &record.id;
            match webhook::deliver(
                &st.agent,
                &url,
                &st.webhook_secret(),
                body,
                c.webhook_backoff,
                &st.webhooks,
            )
            .await
            {
                Delivery::Delivered(attempts) => tracing::info!(%id, attempts, "webhook delivered"),
                Delivery::GaveUp(attempts) => tracing::error!(%id, attempts, "webhook gave up"),
                Delivery::Refused => {
                    tracing::error!(%id, "webhook not sent: its host is an internal address")
                }
            }
        });
    }
}

/// What every node does in the background: the engine's sweep (retention; in a shared
/// deployment also tasks that can no longer start, dead workers, retired models), the LoRA
/// downloads no task used for the retention, and, where
/// the backend is shared, the webhook secret put back into a store that lost its data (or
/// taken from it when another node's is there).
async fn housekeeping(state: Arc<AppState>) {
    let engine = &state.jobs;
    let every = state
        .config
        .retention
        .map_or(Duration::from_secs(30), |r| r / 10)
        .clamp(Duration::from_secs(1), Duration::from_secs(30));
    // a task whose input a dead API node was preparing would hold its queue slot forever
    let stalled = (state.config.fetch_timeout * 4).max(Duration::from_secs(600));
    let configured = state.config.webhook_secret.is_some();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if engine.is_shared() {
            let current = state.webhook_secret();
            match engine.sync_secret(&current, configured).await {
                Ok(s) if s != current => {
                    tracing::warn!("the cluster's webhook secret is another node's: using it");
                    *state
                        .webhook_secret
                        .write()
                        .unwrap_or_else(|p| p.into_inner()) = s;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("webhook secret: {e}"),
            }
        }
        match engine.sweep(stalled).await {
            Ok(n) if n > 0 => tracing::warn!("failed {n} tasks that could not start"),
            Ok(_) => {}
            Err(e) => tracing::warn!("sweep: {e}"),
        }
        if let Some(retention) = state.config.retention {
            let s = state.clone();
            match tokio::task::spawn_blocking(move || s.loras.sweep_downloads(retention)).await {
                Ok(n) if n > 0 => {
                    tracing::info!("removed {n} LoRA downloads unused for the retention")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("LoRA download sweep: {e}"),
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
