//! Router tests with a fake generator: every route, status code and validation rule, auth,
//! the queue, cancellation, sync mode, webhooks, uploads and restart recovery. One test binary
//! (`cargo test -p skyreels-server --test api`), one module per feature:
//!
//! - `common`: the harness (fake generator, [`common::Gate`], servers in memory or on Redis,
//!   request helpers, bodies and images);
//! - `submit`: validation, the WaveSpeed fields, sizes and options, images, the task limits;
//! - `predictions`: the prediction shape, polling, sync mode, base64, the queue, cancels, failures;
//! - `uploads`, `webhooks`;
//! - `security`: auth, hosts, abuse limits, timeouts, log injection, framing and sniffing headers;
//! - `ops`: health, readiness, metrics, OpenAPI, docs and playground;
//! - `records`: restart recovery, retention, record contents, corrupt records;
//! - `workers`: several workers, load failures, draining;
//! - `cfg_gate`: the CFG gate's field and the server's default;
//! - `loras`: LoRAs (names, URLs, hub files, the flags, the download cache) and RIFLEx;
//! - `queue`: the queue's fields (`priority`, `cancel_after` and the `Cancel-After` header),
//!   positions, the start order and deadlines (code 5005);
//! - `engine`: the engine's conformance suite, run against both backends;
//! - `events`: live progress (server-sent events) on a real socket;
//! - `redis`: the HTTP routes and the cluster guards on the Redis engine.
//!
//! Tests whose doc starts with "Finding N" reproduce one finding of the server review (issue 14).

mod cfg_gate;
mod common;
mod engine;
mod events;
mod loras;
mod ops;
mod predictions;
mod queue;
mod records;
mod redis;
mod security;
mod submit;
mod uploads;
mod webhooks;
mod workers;
