//! Prometheus metrics through the `metrics` facade and `metrics-exporter-prometheus` (which
//! writes the exposition format and escapes label values). Each server has its own recorder,
//! so several servers in one process (tests) keep separate counts. Every label takes values
//! from a fixed set: methods are recorded as one of a few names, routes as the matched route
//! pattern.

use metrics::{counter, gauge, histogram, with_local_recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Stage duration buckets, seconds: up to an hour (a full-size clip on a slow GPU).
pub const STAGE_BUCKETS: [f64; 14] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];
/// HTTP latency buckets, seconds.
pub const HTTP_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0, 100.0,
];

const STAGE: &str = "skyreels_stage_duration_seconds";
const HTTP: &str = "skyreels_http_request_duration_seconds";
const LORA_CACHE: &str = "skyreels_lora_cache_total";

/// What `/metrics` reports of the tasks.
#[derive(Debug, Default)]
pub struct Overview {
    /// Tasks by status name (where the job store keeps count; Redis keeps no cluster-wide
    /// count).
    pub jobs: Vec<(&'static str, usize)>,
    /// Tasks waiting to start, per model (every known model, 0 when none waits).
    pub waiting: Vec<(String, usize)>,
    /// Live workers per model.
    pub workers: Vec<(String, usize)>,
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(STAGE.into()), &STAGE_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(HTTP.into()), &HTTP_BUCKETS))
            .expect("the bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let m = Self { recorder, handle };
        m.with(|| {
            metrics::describe_gauge!(
                "skyreels_ready",
                "1 when the model is loaded and the server admits tasks."
            );
            metrics::describe_gauge!("skyreels_queue_depth", "Tasks accepted and not started.");
            metrics::describe_gauge!(
                "skyreels_workers",
                "Workers with a loaded model (one per device or --parallel group)."
            );
            metrics::describe_gauge!("skyreels_jobs", "Tasks known to the server, by status.");
            metrics::describe_gauge!(
                "skyreels_event_streams",
                "Event streams (/predictions/{id}/events) open on this node."
            );
            metrics::describe_gauge!(
                "skyreels_model_queue_depth",
                "Tasks waiting to start per model (cluster-wide in Redis mode)."
            );
            metrics::describe_gauge!(
                "skyreels_model_workers",
                "Live workers per model (cluster-wide in Redis mode)."
            );
            metrics::describe_counter!(
                "skyreels_jobs_submitted_total",
                "Tasks accepted since start."
            );
            metrics::describe_counter!(
                "skyreels_jobs_rejected_queue_full_total",
                "Submits refused with 429."
            );
            metrics::describe_counter!(
                "skyreels_jobs_finished_total",
                "Tasks finished since start, by final status."
            );
            metrics::describe_counter!(
                LORA_CACHE,
                "LoRAs applied, by whether the generator's adapter cache held them (hit) or \
                 they were parsed from their file (miss)."
            );
            metrics::describe_histogram!(STAGE, "Duration of generation stages.");
            metrics::describe_histogram!(HTTP, "HTTP request latency.");
            // present from the start, so a scrape before the first submit sees them
            counter!("skyreels_jobs_submitted_total").absolute(0);
            counter!("skyreels_jobs_rejected_queue_full_total").absolute(0);
            for result in ["hit", "miss"] {
                counter!(LORA_CACHE, "result" => result).absolute(0);
            }
        });
        m
    }
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        with_local_recorder(&self.recorder, f)
    }

    /// One HTTP request: `method` one of a few names (the HTTP layer's `method_label`),
    /// `route` the matched route pattern (or "unmatched").
    pub fn http(&self, method: &'static str, route: &str, status: u16, seconds: f64) {
        let (route, status) = (route.to_string(), status.to_string());
        self.with(|| {
            histogram!(HTTP, "method" => method, "route" => route, "status" => status)
                .record(seconds)
        });
    }

    pub fn stage(&self, stage: &'static str, seconds: f64) {
        self.with(|| histogram!(STAGE, "stage" => stage).record(seconds));
    }

    pub fn finished(&self, status: &'static str) {
        self.with(|| counter!("skyreels_jobs_finished_total", "status" => status).increment(1));
    }

    pub fn submitted(&self) {
        self.with(|| counter!("skyreels_jobs_submitted_total").increment(1));
    }

    /// One LoRA a generator applied: from its adapter cache (`hit`) or parsed from its file.
    pub fn lora_cache(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.with(|| counter!(LORA_CACHE, "result" => result).increment(1));
    }

    pub fn queue_full(&self) {
        self.with(|| counter!("skyreels_jobs_rejected_queue_full_total").increment(1));
    }

    /// Event streams open now on this node.
    pub fn event_streams(&self, open: usize) {
        self.with(|| gauge!("skyreels_event_streams").set(open as f64));
    }

    /// The exposition text: the tasks (`overview`: by status, waiting and live workers per
    /// model), readiness, and this process's workers with a loaded model.
    pub fn render(&self, overview: &Overview, ready: bool, workers: usize) -> String {
        self.with(|| {
            gauge!("skyreels_ready").set(f64::from(u8::from(ready)));
            gauge!("skyreels_workers").set(workers as f64);
            let depth: usize = overview.waiting.iter().map(|(_, n)| n).sum();
            gauge!("skyreels_queue_depth").set(depth as f64);
            for (status, n) in &overview.jobs {
                gauge!("skyreels_jobs", "status" => *status).set(*n as f64);
            }
            for (model, n) in &overview.waiting {
                gauge!("skyreels_model_queue_depth", "model" => model.clone()).set(*n as f64);
            }
            for (model, n) in &overview.workers {
                gauge!("skyreels_model_workers", "model" => model.clone()).set(*n as f64);
            }
        });
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        let m = Metrics::default();
        m.stage("denoising", 0.3);
        m.stage("denoising", 45.0);
        m.stage("denoising", 4000.0);
        m.http("GET", "/a\"b\\c\nd", 200, 0.002);
        let overview = Overview {
            jobs: vec![("created", 2)],
            waiting: vec![("a/b".into(), 2)],
            workers: vec![("a/b".into(), 3)],
        };
        let text = m.render(&overview, true, 3);
        for want in [
            "skyreels_stage_duration_seconds_bucket{stage=\"denoising\",le=\"0.5\"} 1",
            "skyreels_stage_duration_seconds_bucket{stage=\"denoising\",le=\"60\"} 2",
            "skyreels_stage_duration_seconds_bucket{stage=\"denoising\",le=\"3600\"} 2",
            "skyreels_stage_duration_seconds_bucket{stage=\"denoising\",le=\"+Inf\"} 3",
            "skyreels_stage_duration_seconds_sum{stage=\"denoising\"} 4045.3",
            "skyreels_jobs{status=\"created\"} 2",
            "skyreels_queue_depth 2",
            "skyreels_ready 1",
            "skyreels_workers 3",
            "skyreels_model_queue_depth{model=\"a/b\"} 2",
            "skyreels_model_workers{model=\"a/b\"} 3",
            "skyreels_jobs_submitted_total 0",
            "skyreels_lora_cache_total{result=\"hit\"} 0",
            "route=\"/a\\\"b\\\\c\\nd\"",
        ] {
            assert!(text.contains(want), "missing {want}:\n{text}");
        }
    }
}
