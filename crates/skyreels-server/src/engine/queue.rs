//! A task's place in its model's queue and its deadline: normal tasks start before low ones
//! (`priority`, as fal's queue priority), and a task whose deadline (`cancel_at`, from the
//! submit's `cancel_after` or `Cancel-After`, Replicate's header) passes ends with
//! [`TaskCode::DeadlinePassed`](super::task::TaskCode): failed if it had not started,
//! cancelled if it was running. Every backend orders its queue and checks deadlines by these
//! rules (its take, the sweep); the worker stops a running task at its deadline.

use super::task::{rfc3339_ms, JobRecord, TaskCode};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a task waits in its model's queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Starts in admission order.
    #[default]
    Normal,
    /// Starts only while no normal task of its model waits; behind every waiting normal task
    /// in `queue_position`.
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl<'de> Deserialize<'de> for Priority {
    /// One of the names; anything else is refused naming them (a number too).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PriorityVisitor;
        impl Visitor<'_> for PriorityVisitor {
            type Value = Priority;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`normal` or `low`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Priority, E> {
                match v {
                    "normal" => Ok(Priority::Normal),
                    "low" => Ok(Priority::Low),
                    _ => Err(E::unknown_variant(v, &["normal", "low"])),
                }
            }
        }
        d.deserialize_str(PriorityVisitor)
    }
}

/// The deadline `cancel_at` (ms since the epoch) has passed at `now`.
pub fn is_past(cancel_at: Option<u64>, now: u64) -> bool {
    cancel_at.is_some_and(|at| now >= at)
}

/// The error of a task that did not start before its deadline.
pub fn not_started(cancel_at: u64) -> String {
    format!(
        "the task did not start before its deadline ({}, cancel_after); it was not run",
        rfc3339_ms(cancel_at)
    )
}

/// The error of a task that was still running at its deadline.
pub fn stopped(cancel_at: u64) -> String {
    format!(
        "the task was still running at its deadline ({}, cancel_after) and was stopped",
        rfc3339_ms(cancel_at)
    )
}

/// A waiting task that can no longer start, what it fails with and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Unstartable {
    pub id: String,
    pub code: TaskCode,
    pub why: String,
}

impl Unstartable {
    /// A waiting task whose deadline passed.
    pub fn past_deadline(r: &JobRecord) -> Self {
        Unstartable {
            id: r.id.clone(),
            code: TaskCode::DeadlinePassed,
            why: not_started(r.cancel_at.unwrap_or_default()),
        }
    }

    /// A waiting task that cannot start for another reason (fails with 5003).
    pub fn unavailable(id: &str, why: String) -> Self {
        Unstartable {
            id: id.to_string(),
            code: TaskCode::Unavailable,
            why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_parse_lowercase_and_default_to_normal() {
        assert_eq!(Priority::default(), Priority::Normal);
        for p in [Priority::Normal, Priority::Low] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
            let back: Priority = serde_json::from_value(p.as_str().into()).unwrap();
            assert_eq!(back, p);
        }
        let e = serde_json::from_value::<Priority>("high".into()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown variant `high`, expected `normal` or `low`"
        );
        let e = serde_json::from_value::<Priority>(1.into()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid type: integer `1`, expected `normal` or `low`"
        );
    }

    #[test]
    fn a_deadline_passes_at_its_millisecond() {
        assert!(!is_past(None, u64::MAX));
        assert!(!is_past(Some(1000), 999));
        assert!(is_past(Some(1000), 1000));
        assert_eq!(
            not_started(0),
            "the task did not start before its deadline (1970-01-01T00:00:00.000Z, \
             cancel_after); it was not run"
        );
        assert!(stopped(0).contains("still running at its deadline"));
    }
}
