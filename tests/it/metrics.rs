//! Prometheus: after some requests, a finished job and an inference request,
//! `/metrics` has the series an operator would chart, with plausible values
//! and route labels that are patterns, not ids; the jobs gauge follows every
//! kind of job from queued to its end.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use rand::SeedableRng;
use serde_json::json;

/// One sample of the text exposition format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses `name{label="value",…} value` lines; comments are skipped.
fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a value after the series");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap())),
                None => (series, BTreeMap::new()),
            };
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap_or_else(|_| panic!("a number: {line}")),
            }
        })
        .collect()
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => value.push(chars.next().map_or('\\', |(_, c)| c)),
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_string(), value);
        rest = &after[end..];
    }
    labels
}

/// The value of the one sample with this name and these labels (among others).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:#?}");
    found[0].value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_jobs_and_inference() {
    if !in_own_process("metrics::metrics_count_requests_jobs_and_inference") {
        return;
    }
    let environment = fresh_environment();
    let with_workers = |workers| TestOptions {
        workers,
        environment: Some(environment.clone()),
        ..Default::default()
    };
    let app = spawn_app_with(with_workers(1)).await;
    let dataset = app.upload_zip(zip_archive(&labelled_entries(10, 3))).await;
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": quick_pretrain_config()}))
        .await;
    let job_id = job["id"].as_str().unwrap();
    let job = app.wait_for_success(job_id, Duration::from_secs(180)).await;
    let encoder_id = job["model_id"].as_str().unwrap();
    for _ in 0..3 {
        app.job(job_id).await;
    }
    assert_problem(app.get("/no/such/route").await, 404).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let images: Vec<Vec<u8>> = (0..3)
        .map(|_| png(&shape_image("disc", &mut rng)))
        .collect();
    let response = app.post_images(encoder_id, "embed", "", images).await;
    assert_eq!(response.status(), 200);

    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    let samples = parse_exposition(&text);

    // Requests, by route pattern: the job was polled at least the 3 times above.
    let job_route = [
        ("method", "GET"),
        ("route", "/v1/jobs/{id}"),
        ("status", "200"),
    ];
    assert!(value(&samples, "pretext_http_requests_total", &job_route) >= 3.0);
    assert!(
        value(
            &samples,
            "pretext_http_request_duration_seconds_count",
            &[("method", "GET"), ("route", "/v1/jobs/{id}")]
        ) >= 3.0
    );
    let upload = [
        ("method", "POST"),
        ("route", "/v1/datasets"),
        ("status", "201"),
    ];
    assert_eq!(value(&samples, "pretext_http_requests_total", &upload), 1.0);
    let unmatched = [("route", "unmatched"), ("status", "404")];
    assert_eq!(
        value(&samples, "pretext_http_requests_total", &unmatched),
        1.0
    );
    assert!(
        !text.contains(job_id) && !text.contains(encoder_id),
        "ids must not become labels"
    );

    // Jobs by state, counted from the database; every pair is present.
    let succeeded = [("state", "succeeded"), ("kind", "pretrain")];
    assert_eq!(value(&samples, "pretext_jobs", &succeeded), 1.0);
    assert_eq!(
        value(
            &samples,
            "pretext_jobs",
            &[("state", "queued"), ("kind", "finetune")]
        ),
        0.0
    );
    let finished = [("kind", "pretrain"), ("state", "succeeded")];
    assert_eq!(
        value(&samples, "pretext_job_duration_seconds_count", &finished),
        1.0
    );
    let seconds = value(&samples, "pretext_job_duration_seconds_sum", &finished);
    assert!(seconds > 0.0 && seconds < 180.0, "{seconds}");
    let throughput = value(
        &samples,
        "pretext_training_images_per_second",
        &[("device", "cpu")],
    );
    // The job has ended, so nothing trains on the CPU.
    assert_eq!(throughput, 0.0);

    // Inference: one request of three images.
    assert_eq!(
        value(&samples, "pretext_inference_batch_size_count", &[]),
        1.0
    );
    assert_eq!(
        value(&samples, "pretext_inference_batch_size_sum", &[]),
        3.0
    );
    assert_eq!(
        value(&samples, "pretext_inference_queue_seconds_count", &[]),
        1.0
    );
    let compute = value(&samples, "pretext_inference_compute_seconds_sum", &[]);
    assert!(compute > 0.0 && compute < 60.0, "{compute}");

    let memory = value(
        &samples,
        "pretext_device_memory_bytes",
        &[("device", "cpu")],
    );
    assert!(memory > 10e6, "resident memory of {memory} bytes");
    app.stop().await;

    // An evaluate job, seen queued by a server without workers, then
    // succeeded once a server with a worker has run it: its queued series
    // goes back to 0 (the registry is the process's, shared by both servers).
    let idle = spawn_app_with(with_workers(0)).await;
    let evaluate = idle
        .create_job_id(json!({
            "kind": "evaluate", "dataset_id": dataset["id"], "base_model_id": encoder_id,
            "config": {"protocol": "knn", "k": 3}
        }))
        .await;
    let evaluate_jobs = |samples: &[Sample], state| {
        value(
            samples,
            "pretext_jobs",
            &[("state", state), ("kind", "evaluate")],
        )
    };
    let samples = parse_exposition(&idle.get("/metrics").await.text().await.unwrap());
    assert_eq!(evaluate_jobs(&samples, "queued"), 1.0);
    idle.stop().await;
    let app = spawn_app_with(with_workers(1)).await;
    app.wait_for_success(&evaluate, Duration::from_secs(120))
        .await;
    let samples = parse_exposition(&app.get("/metrics").await.text().await.unwrap());
    assert_eq!(evaluate_jobs(&samples, "queued"), 0.0);
    assert_eq!(evaluate_jobs(&samples, "running"), 0.0);
    assert_eq!(evaluate_jobs(&samples, "succeeded"), 1.0);
    let finished = [("kind", "evaluate"), ("state", "succeeded")];
    assert_eq!(
        value(&samples, "pretext_job_duration_seconds_count", &finished),
        1.0
    );
    app.stop().await;
    remove_environment(&environment.0, &environment.1).await;
}
