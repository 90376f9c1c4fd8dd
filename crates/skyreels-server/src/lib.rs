//! `skyreels-server`: a WaveSpeed `/api/v3` compatible HTTP server for video generation.
//!
//! Layers, bottom up: [`generator::Generator`] (the model, behind a trait; no candle here) ->
//! [`engine`], the job engine (every rule about tasks, written once) over a storage backend,
//! [`backend::memory`] (one process: records on disk, the queue in memory) or
//! [`backend::redis`] (shared by many API nodes and workers) -> [`api::router`] (axum, its
//! contract typed in [`contract`]) -> connections served with timeouts and a cap (`http`) ->
//! [`Server`], the bootstrap. Finished tasks flow to an async task that logs them and sends
//! webhooks. The HTTP contract is `docs/API.md`.

#![forbid(unsafe_code)]

pub mod api;
pub mod backend;
pub mod config;
pub mod contract;
pub mod engine;
pub mod generator;
mod http;
pub mod loras;
pub mod media;
pub mod metrics;
mod server;
mod state;
mod view;
pub mod warmup;
pub mod webhook;

pub use config::ServerConfig;
pub use server::{shutdown_signal, Server, ServerError};
pub use state::{AppState, CONCURRENT_DECODES, CONCURRENT_FETCHES};
