//! The thread that owns the generator, and the consumer of finished tasks.

use crate::generator::{GenerateFailure, GeneratorLoader};
use crate::job::{JobRecord, TaskCode};
use crate::store::Outcome;
use crate::{api, webhook, AppState};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Starts the worker: it loads the generator, reports on `loaded`, then runs queued tasks one
/// at a time until the store drains.
pub(crate) fn spawn(
    state: Arc<AppState>,
    loader: GeneratorLoader,
    loaded: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("skyreels-worker".into())
        .spawn(move || {
            let mut generator = match catch_unwind(AssertUnwindSafe(loader)) {
                Ok(Ok(g)) => g,
                Ok(Err(e)) => {
                    let _ = loaded.send(Err(e));
                    return;
                }
                Err(p) => {
                    let _ = loaded.send(Err(panic_message(&p)));
                    return;
                }
            };
            let _ = state.models.set(generator.models());
            let _ = loaded.send(Ok(()));
            let store = &state.store;
            while let Some(work) = store.next_work() {
                let file = format!("{}.mp4", work.id);
                let path = store.video_path(&file);
                tracing::info!(id = %work.id, "task started");
                let (id, cancel) = (work.id.clone(), work.cancel.clone());
                let result = catch_unwind(AssertUnwindSafe(|| {
                    generator.generate(&work.request, &path, &mut |done, total| {
                        store.progress(&id, done, total);
                        !cancel.load(Ordering::SeqCst)
                    })
                }));
                let outcome = match result {
                    Ok(Ok(timings)) => {
                        for (stage, d) in &timings {
                            state.metrics.stage(stage, d.as_secs_f64());
                        }
                        Outcome::Completed {
                            output: file,
                            timings: timings
                                .iter()
                                .map(|(s, d)| (s.to_string(), d.as_millis() as u64))
                                .collect(),
                        }
                    }
                    Ok(Err(GenerateFailure::Cancelled)) => Outcome::Cancelled,
                    Ok(Err(GenerateFailure::InvalidInput(e))) => {
                        Outcome::Failed(TaskCode::InvalidParameter, e)
                    }
                    Ok(Err(GenerateFailure::Failed(e))) => {
                        Outcome::Failed(TaskCode::ExecutionFailed, e)
                    }
                    Err(p) => Outcome::Failed(
                        TaskCode::Internal,
                        format!("internal error: {}", panic_message(&p)),
                    ),
                };
                if !matches!(outcome, Outcome::Completed { .. }) {
                    let _ = std::fs::remove_file(&path);
                }
                store.finish(&work.id, outcome);
            }
        })
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the generator panicked".into())
}

/// Logs finished tasks and fires their webhooks, each delivery on the blocking pool so a slow
/// or dead receiver holds nothing else up. (The store counts them in the metrics.)
pub(crate) async fn finished_tasks(
    state: Arc<AppState>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<JobRecord>,
) {
    while let Some(record) = rx.recv().await {
        tracing::info!(id = %record.id, status = record.status.as_str(), error = %record.error, "task finished");
        let Some(url) = record.webhook.clone() else {
            continue;
        };
        let st = state.clone();
        tokio::spawn(async move {
            let body = match serde_json::to_vec(&api::prediction(&st, &record, None).await) {
                Ok(b) => b,
                Err(_) => return,
            };
            let (agent, secret, backoff) = (
                st.agent.clone(),
                st.webhook_secret.clone(),
                st.config.webhook_backoff,
            );
            let id = record.id.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let (attempts, ok) = webhook::deliver(&agent, &url, &secret, &body, backoff);
                if ok {
                    tracing::info!(%id, attempts, "webhook delivered");
                } else {
                    tracing::error!(%id, attempts, "webhook gave up");
                }
            })
            .await;
        });
    }
}
