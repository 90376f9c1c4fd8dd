//! The prediction object, and the routes that read or end a task.

use super::error::{success, ApiError, ApiResult};
use crate::contract::{Deleted, Envelope, ErrorEnvelope, Prediction, PredictionUrls, Progress};
use crate::job::{rfc3339_ms, JobRecord, Status};
use crate::store::CancelResult;
use crate::AppState;
use axum::extract::{Path, State};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The prediction object of a record. With base64 output, the outputs are read from the
/// encoded copies the worker wrote once when the task completed.
pub async fn prediction(
    state: &AppState,
    r: &JobRecord,
    queue_position: Option<usize>,
) -> Prediction {
    let mut outputs = Vec::new();
    for f in &r.outputs {
        if r.base64_output {
            match tokio::fs::read_to_string(state.store.base64_path(f)).await {
                Ok(text) => outputs.push(text),
                Err(e) => tracing::error!(id = %r.id, "cannot read the base64 copy of {f}: {e}"),
            }
        } else {
            outputs.push(format!("{}/outputs/{f}", r.base_url));
        }
    }
    let mut timings: BTreeMap<String, u64> = r.timings.iter().cloned().collect();
    timings.insert("inference".into(), r.timings.iter().map(|(_, ms)| ms).sum());
    // counts, not milliseconds: outside the inference sum
    timings.extend(r.counts.iter().cloned());
    Prediction {
        id: r.id.clone(),
        model: r.model.clone(),
        has_nsfw_contents: vec![false; r.outputs.len()],
        outputs,
        urls: PredictionUrls {
            get: format!("{}/api/v3/predictions/{}/result", r.base_url, r.id),
        },
        status: r.status,
        created_at: rfc3339_ms(r.created_at),
        started_at: r.started_at.map(rfc3339_ms),
        completed_at: r.completed_at.map(rfc3339_ms),
        error: r.error.clone(),
        code: u32::from(r.code),
        execution_time: r.execution_ms(),
        timings,
        input: r.input.clone(),
        progress: Progress {
            step: r.step,
            total: r.total_steps,
        },
        queue_position,
        seed: r.seed,
    }
}

fn unknown_task(id: &str) -> ApiError {
    ApiError::not_found(format!("prediction {id:?} not found"))
}

/// A task that disappeared between two reads (deleted by retention).
pub fn task_gone() -> ApiError {
    ApiError::not_found("the task was deleted")
}

/// A task's state and outputs.
#[utoipa::path(
    get,
    path = "/api/v3/predictions/{id}/result",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id")),
    responses(
        (status = 200, description = "The prediction (a failed task is still 200; see data.status and data.code)", body = Envelope<Prediction>),
        (status = 404, description = "Unknown id", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub async fn result(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let (r, pos) = state.store.get(&id).ok_or_else(|| unknown_task(&id))?;
    Ok(success(prediction(&state, &r, pos).await))
}

/// Alias of `/result`.
#[utoipa::path(
    get,
    path = "/api/v3/predictions/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id")),
    responses(
        (status = 200, description = "The prediction", body = Envelope<Prediction>),
        (status = 404, description = "Unknown id", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub async fn result_alias(state: State<Arc<AppState>>, id: Path<String>) -> ApiResult {
    result(state, id).await
}

/// Cancel a queued or running task (a running one stops at its next step and ends
/// cancelled); delete a finished one with its files.
#[utoipa::path(
    delete,
    path = "/api/v3/predictions/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id")),
    responses(
        (status = 200, description = "Cancelled or cancelling (the prediction), or deleted ({id, status})", body = Envelope<Prediction>),
        (status = 404, description = "Unknown id", body = ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub async fn cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    match state
        .store
        .cancel_or_delete(&id)
        .ok_or_else(|| unknown_task(&id))?
    {
        CancelResult::Dequeued | CancelResult::Cancelling => {
            let (r, pos) = state.store.get(&id).ok_or_else(task_gone)?;
            Ok(success(prediction(&state, &r, pos).await))
        }
        CancelResult::Deleted | CancelResult::AlreadyDeleted => {
            // answered once its files are gone
            state.store.flushed().await;
            Ok(success(Deleted {
                id,
                status: Status::Deleted,
            }))
        }
    }
}
