//! A task's record and its state machine: the statuses and their legal transitions, the task
//! codes, and how a run's outcome ends a record.

use super::queue::{self, Priority};
use serde::{Deserialize, Serialize};

/// Task status, as WaveSpeed spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Accepted: its image is being fetched or it waits in the queue.
    Created,
    Processing,
    Completed,
    Failed,
    Cancelled,
    /// A finished task whose files were deleted by `DELETE`.
    Deleted,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Created,
        Status::Processing,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
        Status::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Processing => "processing",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Deleted => "deleted",
        }
    }

    /// Completed, failed or cancelled (or deleted): nothing more will happen to it.
    pub fn is_finished(self) -> bool {
        !matches!(self, Status::Created | Status::Processing)
    }

    /// Completed, failed or cancelled: how a task ended (what metrics count and webhooks
    /// tell); unlike [`Status::is_finished`], not `deleted`.
    pub fn is_outcome(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// The transitions a task may take.
    pub fn can_become(self, to: Status) -> bool {
        use Status::*;
        matches!(
            (self, to),
            (Created, Processing | Failed | Cancelled)
                | (Processing, Completed | Failed | Cancelled)
                | (Completed | Failed | Cancelled, Deleted)
        )
    }
}

impl std::str::FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status {s:?}"))
    }
}

/// Task-level error codes (`data.code`), WaveSpeed's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
pub enum TaskCode {
    Ok,
    MissingParameter,
    InvalidParameter,
    MediaAccessFailed,
    ExecutionFailed,
    Internal,
    Unavailable,
    Timeout,
    /// The safety checker flagged the video and `--nsfw-action block` kept none.
    Blocked,
    /// The task's deadline (`cancel_after`) passed: it had not started (failed) or was
    /// running (cancelled).
    DeadlinePassed,
}

impl From<TaskCode> for u32 {
    fn from(c: TaskCode) -> u32 {
        match c {
            TaskCode::Ok => 0,
            TaskCode::MissingParameter => 1400,
            TaskCode::InvalidParameter => 1401,
            TaskCode::MediaAccessFailed => 1402,
            TaskCode::ExecutionFailed => 1403,
            TaskCode::Internal => 5000,
            TaskCode::Unavailable => 5003,
            TaskCode::Timeout => 5004,
            TaskCode::Blocked => 1451,
            TaskCode::DeadlinePassed => 5005,
        }
    }
}

impl TryFrom<u32> for TaskCode {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        [
            TaskCode::Ok,
            TaskCode::MissingParameter,
            TaskCode::InvalidParameter,
            TaskCode::MediaAccessFailed,
            TaskCode::ExecutionFailed,
            TaskCode::Internal,
            TaskCode::Unavailable,
            TaskCode::Timeout,
            TaskCode::Blocked,
            TaskCode::DeadlinePassed,
        ]
        .into_iter()
        .find(|c| u32::from(*c) == v)
        .ok_or_else(|| format!("unknown task code {v}"))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 UTC with milliseconds and `Z`.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// A fresh task id: 32 lowercase hex digits (a random uuid4 without dashes).
pub fn new_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    hex(&b)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything known about a task; persisted as JSON on every state change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub model: String,
    pub status: Status,
    /// The request as the client sent it (its known fields, a long data: URI shortened), kept
    /// to be echoed; the engine does not read it.
    #[serde(default)]
    pub input: serde_json::Value,
    /// Absolute base URL of the server at submit time (for the `urls.get` and output links).
    pub base_url: String,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub error: String,
    pub code: TaskCode,
    pub seed: u64,
    /// Output files in the output folder (file names).
    pub outputs: Vec<String>,
    pub base64_output: bool,
    pub webhook: Option<String>,
    /// Where it waits in its model's queue (records of older versions: normal).
    #[serde(default)]
    pub priority: Priority,
    /// Its deadline, in ms since the epoch (the admission time plus `cancel_after`): not
    /// started by then it fails, still running then it is cancelled (both 5005).
    #[serde(default)]
    pub cancel_at: Option<u64>,
    /// Frames of the video (`num_frames`, or what `duration` made); None in records of older
    /// versions.
    #[serde(default)]
    pub num_frames: Option<usize>,
    /// Denoising steps done, of `total`.
    pub step: usize,
    pub total_steps: usize,
    /// Stage name -> milliseconds.
    pub timings: Vec<(String, u64)>,
    /// Named counts of the run (transformer forwards computed and cached).
    #[serde(default)]
    pub counts: Vec<(String, u64)>,
    /// Times a worker started it (more than 1 after a worker died and another took it over).
    #[serde(default)]
    pub attempts: u32,
    /// Run the safety checker on its video, where the worker has one (`enable_safety_checker`).
    #[serde(default = "yes")]
    pub safety_check: bool,
    /// Per output: the safety checker flagged it (empty where none ran).
    #[serde(default)]
    pub nsfw: Vec<bool>,
}

fn yes() -> bool {
    true
}

/// How a task a worker ran ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Completed {
        /// The video's file name.
        output: String,
        timings: Vec<(String, u64)>,
        counts: Vec<(String, u64)>,
        /// The safety checker flagged the video (`None`: none ran).
        nsfw: Option<bool>,
    },
    Cancelled,
    Failed(TaskCode, String),
    /// Stopped at its deadline: cancelled, with 5005 and this error.
    PastDeadline(String),
}

/// A transition the state machine does not allow.
#[derive(Debug, thiserror::Error)]
#[error("a {} task cannot become {}", from.as_str(), to.as_str())]
pub struct InvalidTransition {
    pub from: Status,
    pub to: Status,
}

impl JobRecord {
    /// A new task (status created, a fresh id, admitted now) of `total_steps` steps.
    pub fn created(
        model: &str,
        input: serde_json::Value,
        base_url: String,
        seed: u64,
        total_steps: usize,
    ) -> Self {
        JobRecord {
            id: new_id(),
            model: model.into(),
            status: Status::Created,
            input,
            base_url,
            created_at: now_ms(),
            started_at: None,
            completed_at: None,
            error: String::new(),
            code: TaskCode::Ok,
            seed,
            outputs: vec![],
            base64_output: false,
            webhook: None,
            priority: Priority::Normal,
            cancel_at: None,
            num_frames: None,
            step: 0,
            total_steps,
            timings: vec![],
            counts: vec![],
            attempts: 0,
            safety_check: true,
            nsfw: vec![],
        }
    }

    /// Moves to `to`, stamping times; failures carry their code and message.
    pub fn transition(&mut self, to: Status) -> Result<(), InvalidTransition> {
        if !self.status.can_become(to) {
            return Err(InvalidTransition {
                from: self.status,
                to,
            });
        }
        let now = now_ms();
        match to {
            Status::Processing => self.started_at = Some(now),
            Status::Completed | Status::Failed | Status::Cancelled => self.completed_at = Some(now),
            Status::Created | Status::Deleted => {}
        }
        self.status = to;
        Ok(())
    }

    /// Fails the task with a code and a readable reason.
    pub fn fail(
        &mut self,
        code: TaskCode,
        error: impl Into<String>,
    ) -> Result<(), InvalidTransition> {
        self.transition(Status::Failed)?;
        self.code = code;
        self.error = error.into();
        Ok(())
    }

    /// Ends a started task with `outcome`: its outputs, timings and final status.
    pub fn end(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Completed {
                output,
                timings,
                counts,
                nsfw,
            } => {
                self.nsfw = nsfw.into_iter().collect();
                self.outputs = vec![output];
                self.timings = timings;
                self.counts = counts;
                self.step = self.total_steps;
                let _ = self.transition(Status::Completed);
            }
            Outcome::Cancelled => {
                let _ = self.transition(Status::Cancelled);
            }
            Outcome::Failed(code, error) => {
                let _ = self.fail(code, error);
            }
            Outcome::PastDeadline(error) => {
                if self.transition(Status::Cancelled).is_ok() {
                    self.code = TaskCode::DeadlinePassed;
                    self.error = error;
                }
            }
        }
    }

    /// Its deadline has passed at `now` (ms).
    pub fn is_past_deadline(&self, now: u64) -> bool {
        queue::is_past(self.cancel_at, now)
    }

    /// Fails a waiting task that did not start before its deadline (5005).
    pub fn miss_deadline(&mut self) -> Result<(), InvalidTransition> {
        if self.status != Status::Created {
            return Err(InvalidTransition {
                from: self.status,
                to: Status::Failed,
            });
        }
        let error = queue::not_started(self.cancel_at.unwrap_or_default());
        self.fail(TaskCode::DeadlinePassed, error)
    }

    /// Milliseconds between start and end of the work (0 until finished).
    pub fn execution_ms(&self) -> u64 {
        match (self.started_at, self.completed_at) {
            (Some(s), Some(e)) => e.saturating_sub(s),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record() -> JobRecord {
        JobRecord::created(
            "wavespeed-ai/SkyReels-V1",
            serde_json::Value::Null,
            "http://localhost".into(),
            1,
            30,
        )
    }

    #[test]
    fn allowed_transitions() {
        use Status::*;
        let allowed = [
            (Created, Processing),
            (Created, Failed),
            (Created, Cancelled),
            (Processing, Completed),
            (Processing, Failed),
            (Processing, Cancelled),
            (Completed, Deleted),
            (Failed, Deleted),
            (Cancelled, Deleted),
        ];
        for from in Status::ALL {
            for to in Status::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }

    #[test]
    fn transition_stamps_times_and_refuses_the_rest() {
        let mut r = record();
        assert!(r.transition(Status::Completed).is_err());
        r.transition(Status::Processing).unwrap();
        assert!(r.started_at.is_some() && r.completed_at.is_none());
        r.fail(TaskCode::ExecutionFailed, "boom").unwrap();
        assert_eq!(
            (r.status, r.code, r.error.as_str()),
            (Status::Failed, TaskCode::ExecutionFailed, "boom")
        );
        assert!(r.completed_at.unwrap() >= r.started_at.unwrap());
        let e = r.transition(Status::Processing).unwrap_err();
        assert_eq!(e.to_string(), "a failed task cannot become processing");
        r.transition(Status::Deleted).unwrap();
        assert!(r.transition(Status::Deleted).is_err());
    }

    #[test]
    fn statuses_parse_and_outcomes_are_the_three_ends() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
            assert_eq!(
                s.is_outcome(),
                matches!(s, Status::Completed | Status::Failed | Status::Cancelled)
            );
            assert!(!s.is_outcome() || s.is_finished());
        }
        assert!("Completed".parse::<Status>().is_err());
    }

    #[test]
    fn an_outcome_ends_a_running_record() {
        let mut r = record();
        r.transition(Status::Processing).unwrap();
        r.step = 3;
        let done = Outcome::Completed {
            output: "a.mp4".into(),
            timings: vec![("denoising".into(), 7)],
            counts: vec![("forwards_cached".into(), 2)],
            nsfw: Some(true),
        };
        r.end(done);
        assert_eq!(r.nsfw, [true]);
        assert_eq!(
            (r.status, r.step, r.outputs.as_slice()),
            (Status::Completed, 30, &["a.mp4".to_string()][..])
        );
        assert_eq!(r.timings, [("denoising".to_string(), 7)]);
        // an outcome does not apply twice: the record stays completed
        r.end(Outcome::Failed(TaskCode::Internal, "late".into()));
        assert_eq!((r.status, r.code), (Status::Completed, TaskCode::Ok));
        let mut r = record();
        r.transition(Status::Processing).unwrap();
        r.end(Outcome::Failed(TaskCode::Timeout, "slow".into()));
        assert_eq!(
            (r.status, r.code, r.error.as_str()),
            (Status::Failed, TaskCode::Timeout, "slow")
        );
        let mut r = record();
        r.transition(Status::Processing).unwrap();
        r.end(Outcome::Cancelled);
        assert_eq!(r.status, Status::Cancelled);
        // stopped at its deadline: cancelled, with the deadline's code and error
        let mut r = record();
        r.transition(Status::Processing).unwrap();
        r.end(Outcome::PastDeadline("late".into()));
        assert_eq!(
            (r.status, r.code, r.error.as_str()),
            (Status::Cancelled, TaskCode::DeadlinePassed, "late")
        );
    }

    #[test]
    fn a_waiting_task_misses_its_deadline_and_old_records_have_none() {
        let mut r = record();
        assert!(!r.is_past_deadline(u64::MAX));
        r.cancel_at = Some(5_000);
        assert!(!r.is_past_deadline(4_999) && r.is_past_deadline(5_000));
        r.miss_deadline().unwrap();
        assert_eq!(
            (r.status, r.code),
            (Status::Failed, TaskCode::DeadlinePassed)
        );
        assert!(r.started_at.is_none());
        assert!(
            r.error.contains("did not start before its deadline"),
            "{}",
            r.error
        );
        assert!(r.miss_deadline().is_err(), "only a waiting task misses it");
        // a record written before priorities and deadlines: normal, none
        let mut old = serde_json::to_value(record()).unwrap();
        let fields = old.as_object_mut().unwrap();
        fields.remove("priority");
        fields.remove("cancel_at");
        let old: JobRecord = serde_json::from_value(old).unwrap();
        assert_eq!((old.priority, old.cancel_at), (Priority::Normal, None));
    }

    #[test]
    fn ids_times_and_codes() {
        let id = new_id();
        assert_eq!(id.len(), 32);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(&id[12..13], "4");
        assert_ne!(new_id(), id);
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        for c in [
            TaskCode::Ok,
            TaskCode::MediaAccessFailed,
            TaskCode::Timeout,
            TaskCode::Blocked,
        ] {
            assert_eq!(TaskCode::try_from(u32::from(c)).unwrap(), c);
        }
        assert_eq!(serde_json::to_value(TaskCode::Unavailable).unwrap(), 5003);
        assert_eq!(
            serde_json::to_value(TaskCode::DeadlinePassed).unwrap(),
            5005
        );
        assert_eq!(TaskCode::try_from(5005), Ok(TaskCode::DeadlinePassed));
        assert!(TaskCode::try_from(7).is_err());
    }
}
