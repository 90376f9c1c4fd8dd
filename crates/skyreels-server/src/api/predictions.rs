//! The prediction object, and the routes that read or end a task.

use super::error::{success, ApiError, ApiResult};
use crate::contract::{Deleted, Envelope, ErrorEnvelope, Prediction};
use crate::engine::task::Status;
use crate::engine::CancelResult;
use crate::state::AppState;
pub use crate::view::prediction;
use axum::extract::{Path, State};
use std::sync::Arc;

pub(super) fn unknown_task(id: &str) -> ApiError {
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
    let (r, pos) = state
        .jobs
        .get(&id)
        .await?
        .ok_or_else(|| unknown_task(&id))?;
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
        .jobs
        .cancel_or_delete(&id)
        .await?
        .ok_or_else(|| unknown_task(&id))?
    {
        CancelResult::Dequeued | CancelResult::Cancelling => {
            let (r, pos) = state.jobs.get(&id).await?.ok_or_else(task_gone)?;
            Ok(success(prediction(&state, &r, pos).await))
        }
        CancelResult::Deleted | CancelResult::AlreadyDeleted => {
            // answered once its files are gone
            Ok(success(Deleted {
                id,
                status: Status::Deleted,
            }))
        }
    }
}
