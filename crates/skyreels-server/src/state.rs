//! What every handler shares: the configuration, the engine, the metrics, the loaded models,
//! the webhook secret and the limiters of outbound work.

use crate::config::ServerConfig;
use crate::engine::{Engine, ModelInfo};
use crate::metrics::Metrics;
use crate::{loras, media, webhook};
use sha2::{Digest, Sha256};
use std::sync::{Arc, OnceLock};

/// Shared by all handlers.
pub struct AppState {
    pub config: ServerConfig,
    /// Tasks, the queue, uploads and outputs.
    pub jobs: Engine,
    pub metrics: Arc<Metrics>,
    /// Set by the first worker whose generator is loaded.
    pub models: OnceLock<Vec<ModelInfo>>,
    /// Workers whose generator is loaded.
    pub workers_loaded: std::sync::atomic::AtomicUsize,
    /// The signing secret (in Redis mode the cluster's, re-read while the node runs).
    pub(crate) webhook_secret: std::sync::RwLock<String>,
    /// Blocking HTTP client for images and webhooks (address policy applied).
    pub agent: ureq::Agent,
    /// The LoRA rules: the submit's early check and the workers' resolution.
    pub loras: loras::Loras,
    pub(crate) key_hashes: Vec<[u8; 32]>,
    /// Image downloads in flight at once.
    pub(crate) fetches: tokio::sync::Semaphore,
    /// Image decodes at once (each may hold up to `media::MAX_DECODE_ALLOC`).
    pub(crate) decodes: tokio::sync::Semaphore,
    /// Webhook attempts in flight at once.
    pub(crate) webhooks: tokio::sync::Semaphore,
    /// Open event streams (`--max-event-streams`).
    pub(crate) event_streams: std::sync::Arc<tokio::sync::Semaphore>,
}

impl AppState {
    pub(crate) fn new(
        config: ServerConfig,
        jobs: Engine,
        metrics: Arc<Metrics>,
        secret: String,
    ) -> Arc<Self> {
        Arc::new(AppState {
            key_hashes: config
                .api_keys
                .iter()
                .map(|k| Sha256::digest(k.trim().as_bytes()).into())
                .collect(),
            agent: media::http_agent(config.allow_private_urls, config.fetch_timeout),
            loras: loras::Loras::new(
                config.loras.clone(),
                &config.output_dir,
                config.allow_private_urls,
            ),
            event_streams: Arc::new(tokio::sync::Semaphore::new(config.max_event_streams)),
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

/// Image downloads and decodes at once.
pub const CONCURRENT_FETCHES: usize = 8;
pub const CONCURRENT_DECODES: usize = 2;
