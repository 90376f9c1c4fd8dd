//! Prometheus metrics, rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Stage duration buckets, seconds: up to an hour (a full-size clip on a slow GPU).
pub const STAGE_BUCKETS: [f64; 14] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];
/// HTTP latency buckets, seconds.
pub const HTTP_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0, 100.0,
];

#[derive(Clone, Debug)]
struct Histogram {
    buckets: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(buckets: &'static [f64]) -> Self {
        Self {
            buckets,
            counts: vec![0; buckets.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(self.buckets) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    /// (method, route, status) -> latency
    http: BTreeMap<(String, String, u16), Histogram>,
    stages: BTreeMap<String, Histogram>,
    /// final status -> count, since start
    finished: BTreeMap<String, u64>,
    submitted: u64,
    rejected_queue_full: u64,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.lock()
            .http
            .entry((method.to_string(), route.to_string(), status))
            .or_insert_with(|| Histogram::new(&HTTP_BUCKETS))
            .observe(seconds);
    }

    pub fn stage(&self, stage: &str, seconds: f64) {
        self.lock()
            .stages
            .entry(stage.to_string())
            .or_insert_with(|| Histogram::new(&STAGE_BUCKETS))
            .observe(seconds);
    }

    pub fn finished(&self, status: &str) {
        *self.lock().finished.entry(status.to_string()).or_default() += 1;
    }

    pub fn submitted(&self) {
        self.lock().submitted += 1;
    }

    pub fn queue_full(&self) {
        self.lock().rejected_queue_full += 1;
    }

    /// The exposition text; `jobs` are the current counts by status, `queue_depth` the tasks
    /// waiting to start.
    pub fn render(&self, jobs: &[(&str, usize)], queue_depth: usize, ready: bool) -> String {
        let inner = self.lock();
        let mut out = String::new();
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut out,
            "skyreels_ready",
            "gauge",
            "1 when the model is loaded and the server admits tasks.",
        );
        let _ = writeln!(out, "skyreels_ready {}", u8::from(ready));
        family(
            &mut out,
            "skyreels_queue_depth",
            "gauge",
            "Tasks accepted and not started.",
        );
        let _ = writeln!(out, "skyreels_queue_depth {queue_depth}");
        family(
            &mut out,
            "skyreels_jobs",
            "gauge",
            "Tasks known to the server, by status.",
        );
        for (status, n) in jobs {
            let _ = writeln!(out, "skyreels_jobs{{status=\"{status}\"}} {n}");
        }
        family(
            &mut out,
            "skyreels_jobs_submitted_total",
            "counter",
            "Tasks accepted since start.",
        );
        let _ = writeln!(out, "skyreels_jobs_submitted_total {}", inner.submitted);
        family(
            &mut out,
            "skyreels_jobs_rejected_queue_full_total",
            "counter",
            "Submits refused with 429.",
        );
        let _ = writeln!(
            out,
            "skyreels_jobs_rejected_queue_full_total {}",
            inner.rejected_queue_full
        );
        family(
            &mut out,
            "skyreels_jobs_finished_total",
            "counter",
            "Tasks finished since start, by final status.",
        );
        for (status, n) in &inner.finished {
            let _ = writeln!(
                out,
                "skyreels_jobs_finished_total{{status=\"{status}\"}} {n}"
            );
        }
        family(
            &mut out,
            "skyreels_stage_duration_seconds",
            "histogram",
            "Duration of generation stages.",
        );
        for (stage, h) in &inner.stages {
            h.render(
                &mut out,
                "skyreels_stage_duration_seconds",
                &format!("stage=\"{stage}\""),
            );
        }
        family(
            &mut out,
            "skyreels_http_request_duration_seconds",
            "histogram",
            "HTTP request latency.",
        );
        for ((method, route, status), h) in &inner.http {
            h.render(
                &mut out,
                "skyreels_http_request_duration_seconds",
                &format!("method=\"{method}\",route=\"{route}\",status=\"{status}\""),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.stage("denoising", 0.3);
        m.stage("denoising", 45.0);
        m.stage("denoising", 4000.0);
        let text = m.render(&[("created", 2)], 2, true);
        assert!(text
            .contains("skyreels_stage_duration_seconds_bucket{stage=\"denoising\",le=\"0.5\"} 1"));
        assert!(text
            .contains("skyreels_stage_duration_seconds_bucket{stage=\"denoising\",le=\"60\"} 2"));
        assert!(text
            .contains("skyreels_stage_duration_seconds_bucket{stage=\"denoising\",le=\"3600\"} 2"));
        assert!(text
            .contains("skyreels_stage_duration_seconds_bucket{stage=\"denoising\",le=\"+Inf\"} 3"));
        assert!(text.contains("skyreels_stage_duration_seconds_sum{stage=\"denoising\"} 4045.3"));
        assert!(text.contains("skyreels_jobs{status=\"created\"} 2"));
        assert!(text.contains("skyreels_queue_depth 2"));
    }
}
