//! A bounded load test on loopback: many concurrent uploads, job submissions
//! and classify calls against one server. Nothing may fail with a 5xx other
//! than the documented 503 (with `Retry-After`), and nothing accepted may be
//! lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::stream::{self, StreamExt};
use rand::SeedableRng;
use serde_json::{json, Value};
use tokio::sync::Mutex;

const CONCURRENCY: usize = 32;
const UPLOADS: usize = 40;
const SUBMISSIONS: usize = 120;
const CLASSIFICATIONS: usize = 600;

/// Tally of status codes, with the rule every answer must meet.
#[derive(Default)]
struct Tally {
    by_status: BTreeMap<u16, usize>,
}

impl Tally {
    fn record(&mut self, what: &str, status: u16, retry_after: bool) {
        assert!(
            status < 500 || (status == 503 && retry_after),
            "{what} answered {status} (retry-after: {retry_after})"
        );
        *self.by_status.entry(status).or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_submissions_and_classifications_lose_nothing() {
    // A classifier to serve, trained by a server with a worker.
    let environment = fresh_environment();
    let trainer = spawn_app_with(TestOptions {
        environment: Some(environment.clone()),
        ..Default::default()
    })
    .await;
    let dataset = trainer
        .upload_zip(zip_archive(&labelled_entries(8, 1)))
        .await;
    let dataset_id = dataset["id"].as_str().unwrap().to_string();
    let job = trainer
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset_id, "config": quick_pretrain_config()}))
        .await;
    let job = trainer
        .wait_for_success(job["id"].as_str().unwrap(), Duration::from_secs(240))
        .await;
    let job = trainer
        .create_job(
            json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": job["model_id"],
            "config": {"epochs": 2, "min_steps": 0, "batch_size": 8}}),
        )
        .await;
    let job = trainer
        .wait_for_success(job["id"].as_str().unwrap(), Duration::from_secs(240))
        .await;
    let classifier_id = job["model_id"].as_str().unwrap().to_string();
    trainer.stop().await;

    // The load, against a server without workers so submitted jobs stay queued.
    let app = Arc::new(
        spawn_app_with(TestOptions {
            workers: 0,
            environment: Some(environment.clone()),
            // One key sends everything here; the per-key limit and the
            // tenant's quota of queued jobs are not under test.
            rate_limit: Some((0.0, 0)),
            configure: Some(|config| config.quota_active_jobs = 0),
            ..Default::default()
        })
        .await,
    );
    let tally = Arc::new(Mutex::new(Tally::default()));
    let created_datasets = Arc::new(Mutex::new(Vec::<String>::new()));
    let created_jobs = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let probe = png(&shape_image("vertical", &mut rng));

    #[derive(Clone, Copy)]
    enum Call {
        Upload(usize),
        Submit,
        Classify,
    }
    let mut calls: Vec<Call> = (0..UPLOADS).map(Call::Upload).collect();
    calls.extend(std::iter::repeat_n(Call::Submit, SUBMISSIONS));
    calls.extend(std::iter::repeat_n(Call::Classify, CLASSIFICATIONS));
    // Interleave the kinds so they overlap in time.
    let mut order = rand::rngs::StdRng::seed_from_u64(7);
    rand::seq::SliceRandom::shuffle(calls.as_mut_slice(), &mut order);
    let total = calls.len();

    let started = Instant::now();
    stream::iter(calls)
        .for_each_concurrent(CONCURRENCY, |call| {
            let app = app.clone();
            let tally = tally.clone();
            let created_datasets = created_datasets.clone();
            let created_jobs = created_jobs.clone();
            let dataset_id = dataset_id.clone();
            let classifier_id = classifier_id.clone();
            let probe = probe.clone();
            async move {
                let (what, response) = match call {
                    Call::Upload(seed) => (
                        "upload",
                        app.upload_raw(
                            zip_archive(&labelled_entries(2, seed as u64)),
                            "application/zip",
                            Some(&format!("load-{seed}")),
                        )
                        .await,
                    ),
                    Call::Submit => (
                        "job submission",
                        app.post_json(
                            "/v1/jobs",
                            &json!({"kind": "pretrain", "dataset_id": dataset_id, "config": quick_pretrain_config()}),
                        )
                        .await,
                    ),
                    Call::Classify => (
                        "classification",
                        app.post_image(&classifier_id, "classify", "", probe).await,
                    ),
                };
                let status = response.status().as_u16();
                let retry_after = response.headers().contains_key("retry-after");
                tally.lock().await.record(what, status, retry_after);
                if status == 201 {
                    let body: Value = response.json().await.unwrap();
                    let id = body["id"].as_str().unwrap().to_string();
                    match call {
                        Call::Upload(_) => created_datasets.lock().await.push(id),
                        Call::Submit => created_jobs.lock().await.push(id),
                        Call::Classify => unreachable!("classify answers 200"),
                    }
                } else if status == 200 {
                    let body: Value = response.json().await.unwrap();
                    assert_eq!(body["predictions"].as_array().unwrap().len(), 1, "{body}");
                }
            }
        })
        .await;
    let elapsed = started.elapsed();

    // Everything accepted is there.
    let created_datasets = created_datasets.lock().await.clone();
    let created_jobs = created_jobs.lock().await.clone();
    assert_eq!(created_datasets.len(), UPLOADS, "every upload is accepted");
    assert_eq!(created_jobs.len(), SUBMISSIONS, "every job is accepted");
    let listed = app.get_json("/v1/datasets?limit=1000").await;
    let listed: Vec<&str> = listed["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    for id in &created_datasets {
        assert!(listed.contains(&id.as_str()), "dataset {id} is lost");
        let dataset = app.get_json(&format!("/v1/datasets/{id}")).await;
        assert_eq!(dataset["num_images"], 6);
    }
    let listed = app.get_json("/v1/jobs?limit=1000").await;
    let listed: Vec<&str> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == "queued")
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    for id in &created_jobs {
        assert!(listed.contains(&id.as_str()), "job {id} is lost");
    }
    assert_eq!(app.get("/healthz").await.status(), 200);
    let tally = tally.lock().await;
    assert!(
        tally.by_status.get(&200).copied().unwrap_or(0) > 0,
        "some classifications were answered"
    );
    eprintln!(
        "load: {total} requests at concurrency {CONCURRENCY} in {:.1} s; statuses {:?}",
        elapsed.as_secs_f64(),
        tally.by_status
    );
    drop(tally);
    Arc::try_unwrap(app)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
    remove_environment(&environment.0, &environment.1).await;
}
