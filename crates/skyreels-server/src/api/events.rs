//! `GET /api/v3/predictions/{id}/events`: a task's live progress as server-sent events, one per
//! status change and per denoising step, each carrying the prediction object of `/result` (the
//! same envelope), until the event of its outcome; then the stream closes.
//!
//! Event ids grow as the task moves on ([`event_id`]): a client that reconnects with
//! `Last-Event-ID` is told what happened after that event, and one that already saw the outcome
//! gets 204 (which tells a browser's `EventSource` to stop reconnecting). Steps that passed
//! between two reads of the task (the Redis engine polls, see
//! [`EVENT_POLL`](crate::backend::redis::EVENT_POLL)) are still told, one event each. A comment
//! keeps idle proxies open ([`KEEPALIVE`]); the streams open at once are bounded
//! (`--max-event-streams`), and each holds one of the `--max-connections`.

use super::error::ApiError;
use super::predictions::{prediction, unknown_task};
use crate::contract::Envelope;
use crate::engine::task::{JobRecord, Status};
use crate::engine::Mark;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

/// A comment this often when nothing else was sent (at most half the idle timeout).
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// The longest a stream waits for its task to move before it checks whether the server is
/// stopping.
const WAIT: Duration = Duration::from_secs(1);

/// The id of the event that tells `r`: 0 created, 1 + step while processing, and past every
/// step the outcome (total + 2) and deleted (total + 3). (A task a second worker takes over
/// starts its steps again: they are told once they pass the furthest step told before.)
pub fn event_id(r: &JobRecord) -> u64 {
    let total = r.total_steps.max(r.step) as u64;
    match r.status {
        Status::Created => 0,
        Status::Processing => 1 + r.step as u64,
        Status::Completed | Status::Failed | Status::Cancelled => total + 2,
        Status::Deleted => total + 3,
    }
}

/// The records to tell, in order, a client last told the event `last` (`None`: nothing yet),
/// now that the task is at `current`; `running` is the last processing record this stream read.
/// A client that was told something is told every step since (each step's record is the
/// processing record with that step); a new one only where the task is.
pub fn to_tell(
    last: Option<u64>,
    current: &JobRecord,
    running: Option<&JobRecord>,
) -> Vec<JobRecord> {
    let id = event_id(current);
    let Some(last) = last else {
        return vec![current.clone()];
    };
    if id <= last {
        return vec![];
    }
    // the step of the first processing event not told yet (event id 1 + step)
    let first = last as usize;
    let steps = |base: &JobRecord, until: usize| -> Vec<JobRecord> {
        (first..=until)
            .map(|step| JobRecord {
                step,
                ..base.clone()
            })
            .collect()
    };
    match (current.status, running) {
        (Status::Processing, _) => steps(current, current.step),
        (s, Some(run)) if s.is_finished() => {
            let mut all = steps(run, current.step.min(current.total_steps));
            all.push(current.clone());
            all
        }
        _ => vec![current.clone()],
    }
}

/// The `Last-Event-ID` a reconnecting client sent.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = v.to_str().map(str::trim).unwrap_or_default();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        ApiError::bad(
            "Last-Event-ID",
            "must be the id of an event this stream sent (a number)",
        )
    })
}

/// A task's live progress.
#[utoipa::path(
    get,
    path = "/api/v3/predictions/{id}/events",
    tag = "tasks",
    params(
        ("id" = String, Path, description = "The task id"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event (sent by EventSource on reconnect)"),
    ),
    responses(
        (status = 200, description = "text/event-stream: one event per status change and per step, each `data` the envelope of /result (`{code, message, data: prediction}`), `id` growing; closed after the outcome's event", content_type = "text/event-stream", body = String),
        (status = 204, description = "The outcome's event was already told (Last-Event-ID): nothing more will come"),
        (status = 400, description = "A Last-Event-ID that is not a number", body = crate::contract::ErrorEnvelope),
        (status = 404, description = "Unknown id", body = crate::contract::ErrorEnvelope),
        (status = 503, description = "--max-event-streams are open (Retry-After); poll /result meanwhile", body = crate::contract::ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last = last_event_id(&headers)?;
    let (r, _) = state
        .jobs
        .get(&id)
        .await?
        .ok_or_else(|| unknown_task(&id))?;
    if r.status.is_finished() && last.is_some_and(|l| l >= event_id(&r)) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let permit = state
        .event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            let max = state.config.max_event_streams;
            let why = if max == 0 {
                "event streams are turned off on this server (--max-event-streams 0)".to_string()
            } else {
                format!("{max} event streams are open, this server's limit (--max-event-streams)")
            };
            ApiError {
                retry_after: Some(5),
                ..ApiError::unavailable(format!(
                    "{why}: poll /api/v3/predictions/{id}/result meanwhile"
                ))
            }
        })?;
    let keepalive = KEEPALIVE.min(state.config.idle_timeout / 2);
    let follow = Follow {
        state,
        id,
        last,
        running: None,
        seen: None,
        told: VecDeque::new(),
        done: false,
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        let event = f.next().await?;
        Some((Ok::<_, Infallible>(event), f))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(keepalive))
        .into_response())
}

/// One open stream: where its task was when last read, and the events not sent yet.
struct Follow {
    state: Arc<AppState>,
    id: String,
    /// The id of the last event told.
    last: Option<u64>,
    /// The last processing record read (the base of the steps told after it).
    running: Option<JobRecord>,
    /// The task's status and step when last read.
    seen: Option<Mark>,
    told: VecDeque<Event>,
    /// The outcome was read: the stream ends once `told` is sent.
    done: bool,
    _permit: OwnedSemaphorePermit,
}

impl Follow {
    /// The next event; `None` ends the stream (after the outcome, when the task is gone, or when
    /// the server stops).
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.told.pop_front() {
                return Some(e);
            }
            // a stopping node of a shared engine leaves its tasks to the others: the client
            // reconnects elsewhere; one of its own ends them (run out or failed 5003), and the
            // stream tells that
            if self.done || (self.state.jobs.is_draining() && self.state.jobs.is_shared()) {
                return None;
            }
            if let Some(seen) = self.seen {
                self.state.jobs.wait_change(&self.id, seen, WAIT).await;
            }
            let (r, position) = match self.state.jobs.get(&self.id).await {
                Ok(Some(got)) => got,
                Ok(None) => return None,
                // the store is away: keep the stream (and its keep-alive) and read again
                Err(_) => {
                    tokio::time::sleep(WAIT).await;
                    continue;
                }
            };
            self.seen = Some((r.status, r.step));
            for record in to_tell(self.last, &r, self.running.as_ref()) {
                let position = position.filter(|_| record.status == Status::Created);
                self.told.push_back(self.event(&record, position).await);
                self.last = Some(event_id(&record));
            }
            match r.status {
                Status::Processing => self.running = Some(r),
                s => self.done = s.is_finished(),
            }
        }
    }

    /// The event of one record: its id and the envelope of `/result`.
    async fn event(&self, r: &JobRecord, position: Option<usize>) -> Event {
        let envelope = Envelope {
            code: StatusCode::OK.as_u16(),
            message: "success".to_string(),
            data: prediction(&self.state, r, position).await,
        };
        let data = serde_json::to_string(&envelope).expect("predictions serialize");
        Event::default().id(event_id(r).to_string()).data(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: Status, step: usize) -> JobRecord {
        let mut r = JobRecord::created("m", serde_json::Value::Null, "http://x".into(), 1, 4);
        r.status = status;
        r.step = step;
        r
    }

    fn told(
        last: Option<u64>,
        now: &JobRecord,
        running: Option<&JobRecord>,
    ) -> Vec<(Status, usize)> {
        to_tell(last, now, running)
            .iter()
            .map(|r| (r.status, r.step))
            .collect()
    }

    #[test]
    fn ids_grow_with_the_task() {
        use Status::*;
        let ids: Vec<u64> = [
            (Created, 0),
            (Processing, 0),
            (Processing, 4),
            (Completed, 4),
            (Deleted, 4),
        ]
        .iter()
        .map(|(s, n)| event_id(&record(*s, *n)))
        .collect();
        assert_eq!(ids, [0, 1, 5, 6, 7]);
        // an outcome is past every step, however far the task got
        assert_eq!(event_id(&record(Cancelled, 2)), 6);
        assert_eq!(event_id(&record(Failed, 0)), 6);
    }

    #[test]
    fn every_step_is_told_once_in_order() {
        use Status::*;
        // a new stream: where the task is
        assert_eq!(told(None, &record(Processing, 2), None), [(Processing, 2)]);
        // from created to step 2 between two reads: processing at 0, 1, 2
        assert_eq!(
            told(Some(0), &record(Processing, 2), None),
            [(Processing, 0), (Processing, 1), (Processing, 2)]
        );
        // told step 1 (id 2): steps 2 and 3
        assert_eq!(
            told(Some(2), &record(Processing, 3), None),
            [(Processing, 2), (Processing, 3)]
        );
        // nothing new
        assert!(told(Some(4), &record(Processing, 3), None).is_empty());
        // completed after step 2 was told: steps 3 and 4 from the running record, then the end
        let run = record(Processing, 2);
        assert_eq!(
            told(Some(3), &record(Completed, 4), Some(&run)),
            [(Processing, 3), (Processing, 4), (Completed, 4)]
        );
        // cancelled at step 2 (told): only the outcome
        assert_eq!(
            told(Some(3), &record(Cancelled, 2), Some(&run)),
            [(Cancelled, 2)]
        );
        // an outcome read by a stream that never read the task running: the outcome alone
        assert_eq!(told(Some(0), &record(Completed, 4), None), [(Completed, 4)]);
        // already told
        assert!(told(Some(6), &record(Completed, 4), Some(&run)).is_empty());
    }

    #[test]
    fn last_event_id_is_a_number() {
        let mut h = HeaderMap::new();
        assert_eq!(last_event_id(&h).unwrap(), None);
        h.insert("last-event-id", " 7 ".parse().unwrap());
        assert_eq!(last_event_id(&h).unwrap(), Some(7));
        h.insert("last-event-id", "abc".parse().unwrap());
        let e = last_event_id(&h).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.starts_with("Last-Event-ID: "), "{}", e.message);
    }
}
