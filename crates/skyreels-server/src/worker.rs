//! The thread that owns the generator, and the consumer of finished tasks.

use crate::generator::{GenerateFailure, Generator, GeneratorLoader};
use crate::job::{JobRecord, TaskCode};
use crate::store::{Outcome, Store, Work};
use crate::webhook::Delivery;
use crate::{webhook, AppState};
use base64::Engine;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Loads a worker's generator, reporting on `loaded`; `None` when it failed (reported).
fn load(
    state: &AppState,
    loader: GeneratorLoader,
    loaded: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> Option<Box<dyn Generator>> {
    let generator = match catch_unwind(AssertUnwindSafe(loader)) {
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
    let _ = state.models.set(generator.models());
    state.workers_loaded.fetch_add(1, Ordering::Relaxed);
    let _ = loaded.send(Ok(()));
    Some(generator)
}

/// Starts worker thread `index`: it loads its generator, reports on `loaded`, then hands the
/// generator to `run` (the engine's task loop).
pub(crate) fn spawn_thread(
    state: Arc<AppState>,
    loader: GeneratorLoader,
    loaded: tokio::sync::oneshot::Sender<Result<(), String>>,
    index: usize,
    run: impl FnOnce(Box<dyn Generator>) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("skyreels-worker-{index}"))
        .spawn(move || {
            if let Some(generator) = load(&state, loader, loaded) {
                run(generator);
            }
        })
}

/// Starts in-memory worker `index`: it runs queued tasks one at a time until the store drains
/// (several workers share the queue).
pub(crate) fn spawn(
    state: Arc<AppState>,
    store: Arc<Store>,
    loader: GeneratorLoader,
    loaded: tokio::sync::oneshot::Sender<Result<(), String>>,
    index: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let st = state.clone();
    spawn_thread(state, loader, loaded, index, move |mut generator| {
        while let Some(work) = store.next_work() {
            tracing::info!(id = %work.id, "task started");
            let outcome = run(&st, &mut *generator, &work, &mut |done, total| {
                store.progress(&work.id, done, total);
            });
            store.finish(&work.id, outcome);
        }
    })
}

/// Runs one task to its outcome, telling `progress` of each step. A cancel request (DELETE,
/// shutdown: `work.cancel`) wins over whatever the generator returned; past
/// `--max-task-seconds` the task stops at its next step and fails with 5004. With
/// `work.base64` the data: URI is written once next to the video.
pub(crate) fn run(
    state: &AppState,
    generator: &mut dyn Generator,
    work: &Work,
    progress: &mut dyn FnMut(usize, usize),
) -> Outcome {
    let paths = state.jobs.paths();
    let file = work.file.clone();
    let path = paths.video_path(&file);
    let deadline = state.config.max_task_time.map(|d| Instant::now() + d);
    let mut timed_out = false;
    let result = catch_unwind(AssertUnwindSafe(|| {
        generator.generate(&work.request, &path, &mut |done, total| {
            progress(done, total);
            timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            !timed_out && !work.cancel.load(Ordering::SeqCst)
        })
    }));
    let mut outcome = match result {
        Ok(Ok(generated)) => {
            for (stage, d) in &generated.stages {
                state.metrics.stage(stage, d.as_secs_f64());
            }
            Outcome::Completed {
                output: file.clone(),
                timings: generated
                    .stages
                    .iter()
                    .map(|(s, d)| (s.to_string(), d.as_millis() as u64))
                    .collect(),
                counts: generated
                    .counts
                    .iter()
                    .map(|(s, n)| (s.to_string(), *n))
                    .collect(),
            }
        }
        Ok(Err(GenerateFailure::Cancelled)) => Outcome::Cancelled,
        Ok(Err(GenerateFailure::InvalidInput(e))) => {
            Outcome::Failed(TaskCode::InvalidParameter, redact_paths(&e))
        }
        Ok(Err(GenerateFailure::Failed(e))) => {
            tracing::error!(id = %work.id, error = ?e, "generation failed");
            Outcome::Failed(TaskCode::ExecutionFailed, redact_paths(&e))
        }
        Err(p) => {
            let message = panic_message(&p);
            tracing::error!(id = %work.id, error = ?message, "the generator panicked");
            Outcome::Failed(
                TaskCode::Internal,
                format!("internal error: {}", redact_paths(&message)),
            )
        }
    };
    if work.cancel.load(Ordering::SeqCst) {
        outcome = Outcome::Cancelled;
    } else if timed_out && !matches!(outcome, Outcome::Completed { .. }) {
        let limit = state.config.max_task_time.unwrap_or_default().as_secs_f64();
        outcome = Outcome::Failed(
            TaskCode::Timeout,
            format!(
                "the task ran longer than this server's limit of {limit} s \
                 (--max-task-seconds) and was stopped"
            ),
        );
    }
    if let (Outcome::Completed { .. }, true) = (&outcome, work.base64) {
        if let Err(e) = write_base64(&path, &paths.base64_path(&file)) {
            tracing::error!(id = %work.id, "cannot encode the output as base64: {e}");
            outcome = Outcome::Failed(
                TaskCode::Internal,
                "internal error: the output could not be encoded".into(),
            );
        }
    }
    if !matches!(outcome, Outcome::Completed { .. }) {
        let _ = std::fs::remove_file(&path);
    }
    outcome
}

/// The data: URI of a video, encoded once (polls and webhooks read it back).
fn write_base64(video: &Path, to: &Path) -> std::io::Result<()> {
    let bytes = std::fs::read(video)?;
    crate::store::write_private(to, data_uri(&bytes).as_bytes())
}

/// `data:video/mp4;base64,...`
pub(crate) fn data_uri(mp4: &[u8]) -> String {
    format!(
        "data:video/mp4;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(mp4)
    )
}

/// A message with the server's absolute paths cut to their last component, so task errors
/// do not tell clients how the server's disks are laid out.
pub fn redact_paths(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find('/') {
        let starts_path = i == 0
            || rest[..i]
                .chars()
                .last()
                .is_some_and(|c| c.is_whitespace() || "\"'`([{=:".contains(c));
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || "\"'`)]},;".contains(c))
            .map_or(rest.len(), |e| i + e);
        let token = &rest[i..end];
        out.push_str(&rest[..i]);
        if starts_path && token.matches('/').count() >= 2 {
            out.push_str(".../");
            out.push_str(token.rsplit('/').next().unwrap_or_default());
        } else {
            out.push_str(token);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

pub(crate) fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the generator panicked".into())
}

/// Logs finished tasks and fires their webhooks: each delivery is a task of its own, so a
/// slow or dead receiver holds nothing else up, and at most
/// [`webhook::CONCURRENT_DELIVERIES`] attempts run at a time. (The store counts them in the
/// metrics.)
pub(crate) async fn finished_tasks(
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

#[cfg(test)]
mod tests {
    use super::redact_paths;

    #[test]
    fn server_paths_are_cut_from_task_errors() {
        assert_eq!(
            redact_paths("cannot read /home/srv/models/tiny/vae/config.json: gone"),
            "cannot read .../config.json: gone"
        );
        assert_eq!(
            redact_paths("file \"/root/.cache/x.safetensors\" (os error 2)"),
            "file \".../x.safetensors\" (os error 2)"
        );
        assert_eq!(redact_paths("a/b and 3/4 and /x"), "a/b and 3/4 and /x");
        assert_eq!(redact_paths("width must be 16/32"), "width must be 16/32");
    }
}
