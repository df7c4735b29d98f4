//! Prometheus metrics: the process-wide registry, and the one-line recording
//! functions the HTTP layer, the workers and the inference executor call.
//! Values that live in the database (jobs by state) or the OS (memory) are
//! not recorded here but read when `/metrics` is scraped.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::db::jobs::{Job, JobKind, JobState};

/// Every metric the service exports.
pub struct Telemetry {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    jobs: IntGaugeVec,
    job_duration: HistogramVec,
    training_throughput: prometheus::GaugeVec,
    inference_batch_size: Histogram,
    inference_queue: Histogram,
    inference_compute: Histogram,
    device_memory: IntGaugeVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

impl Telemetry {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let r = &registry;
        Ok(Self {
            http_requests: register(
                r,
                IntCounterVec::new(
                    Opts::new("pretext_http_requests_total", "HTTP requests answered"),
                    &["method", "route", "status"],
                )?,
            ),
            http_duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "pretext_http_request_duration_seconds",
                        "Time to answer an HTTP request (to the response head; streams not included)",
                    ),
                    &["method", "route"],
                )?,
            ),
            jobs: register(
                r,
                IntGaugeVec::new(
                    Opts::new("pretext_jobs", "Jobs in the database, by state and kind"),
                    &["state", "kind"],
                )?,
            ),
            job_duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "pretext_job_duration_seconds",
                        "Time from a job's first start to its end, for jobs ended by a worker here",
                    )
                    .buckets(vec![
                        1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                        14400.0, 43200.0, 86400.0,
                    ]),
                    &["kind", "state"],
                )?,
            ),
            training_throughput: register(
                r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "pretext_training_images_per_second",
                        "Training throughput last reported on a device (0 once its job ends)",
                    ),
                    &["device"],
                )?,
            ),
            inference_batch_size: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "pretext_inference_batch_size",
                        "Images per inference forward pass (concurrent requests merged)",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                )?,
            ),
            inference_queue: register(
                r,
                Histogram::with_opts(HistogramOpts::new(
                    "pretext_inference_queue_seconds",
                    "Time an inference request waited for the executor",
                ))?,
            ),
            inference_compute: register(
                r,
                Histogram::with_opts(HistogramOpts::new(
                    "pretext_inference_compute_seconds",
                    "Time of an inference forward pass (model loading not included)",
                ))?,
            ),
            device_memory: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "pretext_device_memory_bytes",
                        "Memory in use on a device (cpu: the process's resident set)",
                    ),
                    &["device"],
                )?,
            ),
            registry,
        })
    }
}

static TELEMETRY: LazyLock<Telemetry> =
    LazyLock::new(|| Telemetry::new().expect("the metric definitions are valid"));

/// Counts an answered HTTP request; `route` is the matched route pattern.
pub fn observe_http_request(method: &str, route: &str, status: u16, elapsed: Duration) {
    TELEMETRY
        .http_requests
        .with_label_values(&[method, route, &status.to_string()])
        .inc();
    TELEMETRY
        .http_duration
        .with_label_values(&[method, route])
        .observe(elapsed.as_secs_f64());
}

/// Records the throughput in a training report's metrics, if it has one.
pub fn observe_training_report(device: &str, metrics: &[(String, f64)]) {
    if let Some((_, value)) = metrics.iter().find(|(name, _)| name == "images_per_second") {
        TELEMETRY
            .training_throughput
            .with_label_values(&[device])
            .set(*value);
    }
}

/// Sets a device's training throughput to 0: its job's training ended.
pub fn observe_training_stopped(device: &str) {
    TELEMETRY
        .training_throughput
        .with_label_values(&[device])
        .set(0.0);
}

/// Records how long a job took, once a worker has let go of it. A job that
/// went back to the queue is not finished and is not counted.
pub fn observe_job_released(job: &Job) {
    if let Some(device) = &job.device {
        observe_training_stopped(device);
    }
    if !job.state.is_final() {
        return;
    }
    if let (Some(started), Some(finished)) = (job.started_at, job.finished_at) {
        let seconds = (finished - started).num_milliseconds().max(0) as f64 / 1000.0;
        TELEMETRY
            .job_duration
            .with_label_values(&[job.kind.name(), job.state.name()])
            .observe(seconds);
    }
}

/// Records how long one inference request waited for its batch to start.
pub fn observe_inference_queued(waited: Duration) {
    TELEMETRY.inference_queue.observe(waited.as_secs_f64());
}

/// Records the images of one merged inference batch.
pub fn observe_inference_batch(images: usize) {
    TELEMETRY.inference_batch_size.observe(images as f64);
}

/// Records the time of one inference forward pass.
pub fn observe_inference_compute(elapsed: Duration) {
    TELEMETRY.inference_compute.observe(elapsed.as_secs_f64());
}

/// Renders every metric in the text exposition format, after setting the job
/// counts (`(state, kind, count)`) and reading the process's memory.
/// Every state and kind a job can have is written, so that every
/// `pretext_jobs` series exists (at 0) even before a job of its pair is seen,
/// and a pair whose jobs are all gone reads 0 again.
pub fn render(job_counts: &[(JobState, JobKind, i64)]) -> String {
    for state in JobState::ALL {
        for kind in JobKind::ALL {
            TELEMETRY
                .jobs
                .with_label_values(&[state.name(), kind.name()])
                .set(0);
        }
    }
    for (state, kind, count) in job_counts {
        TELEMETRY
            .jobs
            .with_label_values(&[state.name(), kind.name()])
            .set(*count);
    }
    if let Some(bytes) = resident_memory_bytes() {
        TELEMETRY
            .device_memory
            .with_label_values(&["cpu"])
            .set(bytes);
    }
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&TELEMETRY.registry.gather(), &mut out)
        .expect("writing to a Vec cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// The process's resident set size, from `/proc/self/status` (Linux); `None`
/// elsewhere. `VmRSS` is in kB, so no page size is needed.
fn resident_memory_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
