//! A task as Redis keeps it: its hash, read back into a record, and the compare-and-set
//! change that ends or replaces it (`scripts/end.lua`).

use super::{scripts, GROUP, KEYS};
use crate::engine::task::{JobRecord, Status};
use std::collections::HashMap;

/// A task's hash as stored.
pub(crate) type TaskHash = HashMap<String, Vec<u8>>;

/// The record of a task's hash: the stored record with the fields that change while it runs.
pub(crate) fn record_of(h: &TaskHash) -> Option<JobRecord> {
    let mut r: JobRecord = serde_json::from_slice(h.get("record")?).ok()?;
    let text = |k: &str| h.get(k).and_then(|v| std::str::from_utf8(v).ok());
    let num = |k: &str| text(k).and_then(|v| v.parse::<u64>().ok());
    if let Some(s) = text("status").and_then(|s| s.parse().ok()) {
        r.status = s;
    }
    if let Some(a) = num("attempts") {
        r.attempts = a as u32;
    }
    // a finished task's stored record holds its final values
    if !r.status.is_finished() {
        r.step = num("step").unwrap_or_default() as usize;
        r.total_steps = num("total").map_or(r.total_steps, |t| t as usize);
        r.started_at = num("started_at").or(r.started_at);
    }
    Some(r)
}

/// One invocation of [`scripts::END`]: the change of a task from `expected` to `record`'s
/// status.
pub(crate) struct End<'a> {
    pub expected: Status,
    pub record: &'a JobRecord,
    /// Retention as a TTL (terminal states; 0 keeps it).
    pub ttl_ms: u64,
    /// The output file the change stores (with its bytes) or deletes.
    pub output: Option<(&'a str, &'a [u8])>,
    /// The stream entry to acknowledge and delete.
    pub entry: Option<&'a str>,
    pub delete_outputs: bool,
}

impl End<'_> {
    pub fn invocation(&self) -> redis::ScriptInvocation<'static> {
        let r = self.record;
        let json = serde_json::to_vec(r).expect("records serialize");
        let out_key = KEYS.output(self.output.map_or("", |o| o.0));
        let bytes = if self.delete_outputs {
            &[][..]
        } else {
            self.output.map_or(&[][..], |o| o.1)
        };
        let mut inv = scripts::END.prepare_invoke();
        inv.key(KEYS.task(&r.id))
            .key(KEYS.waiting())
            .key(KEYS.input(&r.id))
            .key(out_key)
            .key(KEYS.stream(&r.model, r.priority))
            .arg(self.expected.as_str())
            .arg(r.status.as_str())
            .arg(json)
            .arg(&r.id)
            .arg(self.ttl_ms)
            .arg(bytes)
            .arg(GROUP)
            .arg(self.entry.unwrap_or(""))
            .arg(if self.delete_outputs { "1" } else { "0" });
        inv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merge_the_running_fields_until_finished() {
        let mut r: JobRecord = serde_json::from_value(serde_json::json!({
            "id": "abc", "model": "m", "status": "created", "input": {}, "base_url": "http://x",
            "created_at": 1, "started_at": null, "completed_at": null, "error": "", "code": 0,
            "seed": 1, "outputs": [], "base64_output": false, "webhook": null, "step": 0,
            "total_steps": 30, "timings": []
        }))
        .unwrap();
        let hash = |r: &JobRecord, fields: &[(&str, &str)]| -> TaskHash {
            let mut h: TaskHash = fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect();
            h.insert("record".into(), serde_json::to_vec(r).unwrap());
            h
        };
        let running = [
            ("status", "processing"),
            ("step", "7"),
            ("total", "30"),
            ("attempts", "2"),
            ("started_at", "99"),
        ];
        let got = record_of(&hash(&r, &running)).unwrap();
        assert_eq!(
            (got.status, got.step, got.attempts, got.started_at),
            (Status::Processing, 7, 2, Some(99))
        );
        // the final record wins over the last progress written
        r.status = Status::Completed;
        r.step = 30;
        r.started_at = Some(100);
        let mut done = running;
        done[0] = ("status", "completed");
        let got = record_of(&hash(&r, &done)).unwrap();
        assert_eq!((got.step, got.started_at, got.attempts), (30, Some(100), 2));
        assert!(record_of(&TaskHash::new()).is_none());
    }
}
