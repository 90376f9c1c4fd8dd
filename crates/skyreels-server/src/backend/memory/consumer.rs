//! The memory backend's worker side.

use super::{Memory, Outcome};
use crate::engine::task::{now_ms, Status, TaskCode};
use crate::engine::{Consumer, EngineError, Lease, Verdict};
use std::path::Path;
use std::time::Duration;

/// The memory backend's worker side: every worker takes from the one queue (normal tasks
/// first).
impl Consumer for Memory {
    /// The first queued task whose input is ready, marked processing (one past its deadline
    /// fails instead); waits up to a second for one.
    fn take(&mut self) -> Result<Option<Lease>, EngineError> {
        let store = &self.0;
        let mut inner = store.lock();
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            if inner.closed {
                return Ok(None);
            }
            let ready = inner
                .queue
                .iter()
                .position(|id| inner.jobs.get(id).is_some_and(|j| j.input.is_some()));
            if let Some(i) = ready {
                let id = inner.queue.remove(i).expect("index from position");
                let job = inner.jobs.get_mut(&id).expect("queued jobs exist");
                if job.record.is_past_deadline(now_ms()) {
                    store.commit(&mut inner, &id, |r| {
                        let _ = r.miss_deadline();
                    });
                    continue;
                }
                let queued = job.input.take().expect("checked above");
                let steps = queued.params.steps;
                store.commit(&mut inner, &id, |r| {
                    let _ = r.transition(Status::Processing);
                    r.total_steps = steps;
                    r.attempts += 1;
                });
                let r = &inner.jobs[&id].record;
                let (model, attempt, base64_output, safety_check) =
                    (r.model.clone(), r.attempts, r.base64_output, r.safety_check);
                let (priority, cancel_at) = (r.priority, r.cancel_at);
                drop(inner);
                return Ok(Some(Lease {
                    id,
                    model,
                    attempt,
                    base64_output,
                    safety_check,
                    priority,
                    cancel_at,
                    input: queued.into_input(),
                    handle: String::new(),
                }));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            inner = store
                .work
                .wait_timeout(inner, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn progress(&mut self, lease: &Lease, step: usize, total: usize) -> Verdict {
        let mut inner = self.0.lock();
        let Some(job) = inner.jobs.get_mut(&lease.id) else {
            return Verdict::Lost;
        };
        job.record.step = step;
        job.record.total_steps = total;
        job.watch.send_if_modified(|m| {
            let changed = m.1 != step;
            m.1 = step;
            changed
        });
        if job.cancel_asked {
            Verdict::CancelAsked
        } else {
            Verdict::GoOn
        }
    }

    fn finish(
        &mut self,
        lease: &Lease,
        outcome: &Outcome,
        _video: &Path,
    ) -> Result<bool, EngineError> {
        let mut inner = self.0.lock();
        if inner
            .jobs
            .get(&lease.id)
            .is_none_or(|j| j.record.status != Status::Processing)
        {
            return Ok(false);
        }
        self.0
            .commit(&mut inner, &lease.id, |r| r.end(outcome.clone()));
        Ok(true)
    }

    /// Not shared: a task is never left to another worker; one given up fails (5003).
    fn abandon(&mut self, lease: &Lease) {
        let outcome = Outcome::Failed(
            TaskCode::Unavailable,
            "the worker stopped before this task finished; submit it again".into(),
        );
        let _ = self.finish(lease, &outcome, Path::new(""));
    }
}
