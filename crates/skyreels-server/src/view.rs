//! The prediction object of a record: what the result route returns and what a webhook
//! carries (the job engine sends it without going through the HTTP layer).

use crate::contract::{Prediction, PredictionUrls, Progress};
use crate::engine::task::{rfc3339_ms, JobRecord};
use crate::state::AppState;
use std::collections::BTreeMap;

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
            outputs.extend(state.jobs.output_base64(f).await);
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
        // one per output; false where no checker ran
        has_nsfw_contents: (0..r.outputs.len())
            .map(|i| r.nsfw.get(i).copied().unwrap_or(false))
            .collect(),
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
        // records of earlier versions kept fields today's rules refuse: an empty echo then
        input: serde::Deserialize::deserialize(&r.input).unwrap_or_default(),
        num_frames: r.num_frames,
        progress: Progress {
            step: r.step,
            total: r.total_steps,
        },
        queue_position,
        seed: r.seed,
    }
}
