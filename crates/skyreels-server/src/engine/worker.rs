//! What a worker does: one loop for every backend. It takes a task from its [`Consumer`],
//! checks the input against the model's and its own limits, finds its LoRA files (a URL's
//! downloaded, see [`crate::loras`]), runs the generator with the
//! backend told of every step, and ends the task with its outcome, which is written once (a
//! worker that lost the task to another one writes nothing; one whose store is away keeps the
//! result and retries).

use super::backend::{Consumer, Lease, Verdict};
use super::task::{now_ms, Outcome, TaskCode};
use super::{files, queue, Backoff, Engine, Input};
use crate::generator::{GenerateFailure, Generator, ModelInfo};
use crate::loras::{LoraErrorKind, Loras};
use base64::Engine as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What a video the safety checker flagged becomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NsfwAction {
    /// The task completes with `has_nsfw_contents: [true]`.
    #[default]
    Flag,
    /// The task fails (code 1451) and its video is deleted.
    Block,
}

/// A worker's own limits.
#[derive(Clone, Copy, Debug)]
pub struct WorkerLimits {
    /// Largest task, as width x height x frames x steps in millions (`--max-work`).
    pub max_work: f64,
    /// Most LoRAs in one task (`--max-loras`).
    pub max_loras: usize,
    /// A running task is stopped (failed, 5004) after this long.
    pub max_task_time: Option<Duration>,
    /// What a video the safety checker flagged becomes (`--nsfw-action`).
    pub nsfw_action: NsfwAction,
}

/// Runs the tasks `consumer` hands out on `generator`, one at a time, until the engine drains;
/// their LoRAs are found with `loras`.
pub fn work(
    engine: &Engine,
    consumer: &mut dyn Consumer,
    generator: &mut dyn Generator,
    limits: WorkerLimits,
    loras: &Loras,
) {
    let models = generator.models();
    let mut backoff = Backoff::default();
    while !engine.is_draining() {
        match consumer.take() {
            Ok(Some(lease)) => {
                backoff.reset();
                run_lease(engine, consumer, generator, &models, limits, loras, lease);
            }
            Ok(None) => backoff.reset(),
            Err(e) => {
                tracing::warn!("cannot take a task: {e}; retrying");
                backoff.sleep();
            }
        }
    }
}

/// The video's file name of a task's attempt: each attempt its own file, so a worker that lost
/// the task never touches the winner's.
pub fn output_file(id: &str, attempt: u32) -> String {
    match attempt {
        0 | 1 => format!("{id}.mp4"),
        n => format!("{id}-{n}.mp4"),
    }
}

/// The count of a task with LoRAs in its prediction's `timings`: the keys of its LoRA files
/// that matched no layer of the transformer.
pub const LORA_UNMATCHED_KEYS: &str = "lora_unmatched_keys";

/// Why a running task stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    /// This node asked (a shutdown past its grace).
    Here,
    /// `DELETE` asked.
    Asked,
    /// Another worker owns the task now.
    Lost,
}

/// Checks, runs and ends one leased task.
fn run_lease(
    engine: &Engine,
    consumer: &mut dyn Consumer,
    generator: &mut dyn Generator,
    models: &[ModelInfo],
    limits: WorkerLimits,
    loras: &Loras,
    mut lease: Lease,
) {
    let paths = engine.paths().clone();
    let file = output_file(&lease.id, lease.attempt);
    let video = paths.video_path(&file);
    let ready = match &mut lease.input {
        // taken past its deadline: a first attempt never ran (failed, as a task the queue
        // held too long); one taken over from a worker that stopped is not run again
        _ if queue::is_past(lease.cancel_at, now_ms()) => {
            let at = lease.cancel_at.unwrap_or_default();
            Err(match lease.attempt {
                0 | 1 => Outcome::Failed(TaskCode::DeadlinePassed, queue::not_started(at)),
                _ => Outcome::PastDeadline(queue::stopped(at)),
            })
        }
        Ok(input) => {
            // under `--nsfw-action block` the operator's rule: every video is checked
            input.safety_check = lease.safety_check || limits.nsfw_action == NsfwAction::Block;
            check(&lease.id, &lease.model, input, models, limits)
                .and_then(|()| resolve_loras(&lease.id, input, loras))
        }
        Err(outcome) => Err(outcome.clone()),
    };
    let input = ready.and_then(|()| lease.input.as_ref().map_err(Outcome::clone));
    let mut stop = None;
    let outcome = match input {
        Err(outcome) => outcome,
        Ok(input) => {
            let priority = lease.priority.as_str();
            tracing::info!(id = %lease.id, attempt = lease.attempt, priority, "task started");
            let running = engine.running(&lease.id);
            let outcome = run(
                engine,
                generator,
                input,
                &video,
                limits,
                lease.cancel_at,
                &mut |done, total| {
                    let verdict = consumer.progress(&lease, done, total);
                    stop = stop.or(match verdict {
                        Verdict::GoOn => None,
                        Verdict::CancelAsked => Some(Stop::Asked),
                        Verdict::Lost => Some(Stop::Lost),
                    });
                    if running.flag.load(Ordering::SeqCst) {
                        stop = stop.or(Some(Stop::Here));
                    }
                    stop.is_none()
                },
            );
            match stop {
                // a cancel wins over whatever the generator made of its last step
                Some(Stop::Asked) => Outcome::Cancelled,
                Some(Stop::Here) if !engine.is_shared() => Outcome::Cancelled,
                _ => outcome,
            }
        }
    };
    let drop_files = || files::remove_files(paths.output_files(std::slice::from_ref(&file)));
    let leave = match stop {
        Some(Stop::Lost) => true,
        Some(Stop::Here) => engine.is_shared(),
        _ => false,
    };
    if leave {
        // another worker owns the task now, or will take it over from this stopping node
        tracing::warn!(id = %lease.id, "task left to another worker");
        consumer.abandon(&lease);
        drop_files();
        return;
    }
    let outcome = match outcome {
        o @ Outcome::Completed { .. } if lease.base64_output && engine.outputs_on_disk() => {
            with_base64(o, &video, &paths.base64_path(&file), &lease.id)
        }
        o => o,
    };
    let completed = matches!(outcome, Outcome::Completed { .. });
    if !completed {
        // nothing of a run that did not complete is served: gone before its end is visible
        drop_files();
    }
    let mut backoff = Backoff::default();
    let won = loop {
        match consumer.finish(&lease, &outcome, &video) {
            Ok(won) => break won,
            Err(e) => {
                tracing::warn!(id = %lease.id, "cannot store the outcome yet ({e}); keeping it and retrying");
                backoff.sleep();
            }
        }
    };
    if !won {
        tracing::info!(id = %lease.id, "the task had already ended; this result is dropped");
    }
    // the video stays only where it is served from
    let kept = won && engine.outputs_on_disk();
    if completed && !kept {
        drop_files();
    }
}

/// The rules a submit is checked against, again, on the input as the worker took it (with a
/// shared queue, whoever can write to it can queue a task: a worker trusts nothing it did not
/// check itself), against the model served here and this worker's `--max-work` and
/// `--max-loras`.
fn check(
    id: &str,
    model_id: &str,
    input: &Input,
    models: &[ModelInfo],
    limits: WorkerLimits,
) -> Result<(), Outcome> {
    let Some(model) = models.iter().find(|m| m.id == model_id) else {
        tracing::error!(%id, "a task for {model_id} on a worker of another model");
        return Err(Outcome::Failed(
            TaskCode::Internal,
            format!("internal error: {model_id} is not served by this worker"),
        ));
    };
    let p = &input.params;
    let rule = p
        .check(&model.limits(limits.max_work, limits.max_loras))
        .map_err(|r| r.to_string())
        .and_then(|()| match (&input.image, model.image_to_video) {
            (None, true) => Err("image: is required".to_string()),
            (Some(_), false) => Err("image: a text-to-video model takes none".into()),
            (Some(i), true) if i.dimensions() != (p.width as u32, p.height as u32) => {
                Err("image: not fitted to the task's size".into())
            }
            _ => Ok(()),
        });
    rule.map_err(|e| {
        tracing::warn!(%id, "refused a queued task that breaks the API's rules: {e}");
        Outcome::Failed(
            TaskCode::InvalidParameter,
            format!("the queued task breaks this server's rules ({e}); it was not run"),
        )
    })
}

/// Finds the files of the task's LoRAs on this worker (a URL's downloaded unless kept from an
/// earlier task) into `input.loras`; a LoRA that cannot be found fails the task, naming it.
fn resolve_loras(id: &str, input: &mut Input, loras: &Loras) -> Result<(), Outcome> {
    match loras.resolve(&input.params.loras) {
        Ok(sources) => {
            input.loras = sources;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(%id, "LoRA refused: {e}");
            let code = match e.kind {
                LoraErrorKind::Invalid => TaskCode::InvalidParameter,
                LoraErrorKind::Download => TaskCode::MediaAccessFailed,
                LoraErrorKind::Storage => TaskCode::ExecutionFailed,
            };
            Err(Outcome::Failed(code, e.to_string()))
        }
    }
}

/// Runs one task to its outcome, asking `go_on` after each step whether to continue (past
/// `--max-task-seconds` the task stops at its next step and fails with 5004; past its deadline
/// `cancel_at` it stops there and ends cancelled with 5005). A generator that panics fails the
/// task (5000) and the worker goes on.
fn run(
    engine: &Engine,
    generator: &mut dyn Generator,
    input: &Input,
    video: &Path,
    limits: WorkerLimits,
    cancel_at: Option<u64>,
    go_on: &mut dyn FnMut(usize, usize) -> bool,
) -> Outcome {
    let deadline = limits.max_task_time.map(|d| Instant::now() + d);
    let (mut timed_out, mut expired) = (false, false);
    let result = catch_unwind(AssertUnwindSafe(|| {
        generator.generate(input, video, &mut |done, total| {
            let go = go_on(done, total);
            timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            expired = queue::is_past(cancel_at, now_ms());
            go && !timed_out && !expired
        })
    }));
    let file = video
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let outcome = match result {
        Ok(Ok(generated)) => {
            for (stage, d) in &generated.stages {
                engine.metrics().stage(stage, d.as_secs_f64());
            }
            for lora in &generated.loras {
                engine.metrics().lora_cache(lora.cache_hit);
            }
            // a count beside the generator's, when the task had LoRAs
            let unmatched = (!input.loras.is_empty()).then(|| {
                let n = generated
                    .loras
                    .iter()
                    .map(|l| l.unmatched_keys as u64)
                    .sum();
                (LORA_UNMATCHED_KEYS.to_string(), n)
            });
            Outcome::Completed {
                output: file,
                timings: generated
                    .stages
                    .iter()
                    .map(|(s, d)| (s.to_string(), d.as_millis() as u64))
                    .collect(),
                counts: generated
                    .counts
                    .iter()
                    .map(|(s, n)| (s.to_string(), *n))
                    .chain(unmatched)
                    .collect(),
                nsfw: generated.nsfw,
            }
        }
        Ok(Err(GenerateFailure::Cancelled)) => Outcome::Cancelled,
        Ok(Err(GenerateFailure::InvalidInput(e))) => {
            Outcome::Failed(TaskCode::InvalidParameter, redact_paths(&e))
        }
        Ok(Err(GenerateFailure::Failed(e))) => {
            tracing::error!(error = ?e, "generation failed");
            Outcome::Failed(TaskCode::ExecutionFailed, redact_paths(&e))
        }
        Err(p) => {
            let message = panic_message(&p);
            tracing::error!(error = ?message, "the generator panicked");
            Outcome::Failed(
                TaskCode::Internal,
                format!("internal error: {}", redact_paths(&message)),
            )
        }
    };
    if let (
        Outcome::Completed {
            nsfw: Some(true), ..
        },
        NsfwAction::Block,
    ) = (&outcome, limits.nsfw_action)
    {
        return Outcome::Failed(
            TaskCode::Blocked,
            "the safety checker flagged the video, and this server keeps no flagged video \
             (--nsfw-action block)"
                .into(),
        );
    }
    if matches!(outcome, Outcome::Completed { .. }) {
        return outcome;
    }
    if let Some(at) = cancel_at.filter(|_| expired) {
        return Outcome::PastDeadline(queue::stopped(at));
    }
    if timed_out {
        let limit = limits.max_task_time.unwrap_or_default().as_secs_f64();
        return Outcome::Failed(
            TaskCode::Timeout,
            format!(
                "the task ran longer than this server's limit of {limit} s \
                 (--max-task-seconds) and was stopped"
            ),
        );
    }
    outcome
}

/// A completed outcome with the video's data: URI written once beside it (polls and webhooks
/// read it back); failed (5000) when it cannot be.
fn with_base64(outcome: Outcome, video: &Path, to: &Path, id: &str) -> Outcome {
    let written =
        std::fs::read(video).and_then(|b| files::write_private(to, data_uri(&b).as_bytes()));
    match written {
        Ok(()) => outcome,
        Err(e) => {
            tracing::error!(%id, "cannot encode the output as base64: {e}");
            Outcome::Failed(
                TaskCode::Internal,
                "internal error: the output could not be encoded".into(),
            )
        }
    }
}

/// `data:video/mp4;base64,...`
pub fn data_uri(mp4: &[u8]) -> String {
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
