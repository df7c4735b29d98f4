//! Jobs: validation of what is submitted, cancellation of queued and running
//! jobs, and a job whose process was killed being picked up again after its
//! lease expired, resuming from its checkpoint and recording each step once.

use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

async fn labelled_dataset(app: &TestApp, per_class: usize) -> String {
    let dataset = app
        .upload_zip(zip_archive(&labelled_entries(per_class, 11)))
        .await;
    dataset["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_are_refused_with_the_field_named() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let dataset_id = labelled_dataset(&app, 2).await;
    let unlabelled = app
        .upload_zip(zip_archive(&[(
            "a.png".into(),
            labelled_entries(1, 1)[0].1.clone(),
        )]))
        .await;

    let cases = [
        (
            json!({"kind": "train", "dataset_id": dataset_id}),
            422,
            "kind",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"epochs": -1}}),
            422,
            "config.epochs",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"batch_size": 100000000}}),
            422,
            "config.batch_size",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"learning_rate": 0}}),
            422,
            "config.learning_rate",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"grid": 2, "num_permutations": 30}}),
            422,
            "config.num_permutations",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"backbone": "vgg"}}),
            422,
            "config.backbone",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"colour": 1}}),
            422,
            "config.colour",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": [1]}),
            422,
            "config",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "max_attempts": 0}),
            422,
            "max_attempts",
        ),
        (
            json!({"kind": "finetune", "dataset_id": unlabelled["id"]}),
            422,
            "dataset_id",
        ),
        (
            json!({"kind": "finetune", "dataset_id": dataset_id, "config": {"label_fraction": 0.5, "labels_per_class": 3}}),
            422,
            "config.labels_per_class",
        ),
        (
            json!({"kind": "finetune", "dataset_id": dataset_id, "config": {"mode": "linear"}}),
            422,
            "config.mode",
        ),
    ];
    for (body, status, field) in cases {
        let problem = assert_problem(app.post_json("/v1/jobs", &body).await, status).await;
        let fields: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert!(
            fields.contains(&field),
            "{body}: expected {field} in {problem}"
        );
    }

    // Unknown top-level fields, malformed JSON, a missing content type, unknown ids.
    assert_problem(
        app.post_json(
            "/v1/jobs",
            &json!({"kind": "pretrain", "dataset_id": dataset_id, "priority": 1}),
        )
        .await,
        422,
    )
    .await;
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body("{\"kind\":")
        .send()
        .await
        .unwrap();
    assert_problem(response, 400).await;
    let response = app
        .client
        .post(app.url("/v1/jobs"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(response, 415).await;
    let response = app
        .post_json(
            "/v1/jobs",
            &json!({"kind": "pretrain", "dataset_id": "nope"}),
        )
        .await;
    assert_problem(response, 422).await;
    let missing = uuid::Uuid::now_v7();
    assert_problem(
        app.post_json(
            "/v1/jobs",
            &json!({"kind": "pretrain", "dataset_id": missing}),
        )
        .await,
        404,
    )
    .await;
    assert_problem(
        app.post_json(
            "/v1/jobs",
            &json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": missing}),
        )
        .await,
        404,
    )
    .await;
    assert_problem(app.get(&format!("/v1/jobs/{missing}")).await, 404).await;
    assert_problem(app.get("/v1/jobs/123").await, 400).await;
    assert_problem(app.get("/v1/jobs?state=sleeping").await, 422).await;

    // Nothing was queued by any of that.
    let jobs = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_is_cancelled_at_once_and_its_dataset_is_protected_while_queued() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let dataset_id = labelled_dataset(&app, 2).await;
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset_id}))
        .await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(
        job["config"]["backbone"], "resnet10_narrow",
        "32 px images get the small-image defaults"
    );
    assert_eq!(job["config"]["image_size"], 32);

    assert_problem(app.delete(&format!("/v1/datasets/{dataset_id}")).await, 409).await;
    let listed = app.get_json("/v1/jobs?state=queued&kind=pretrain").await;
    assert_eq!(listed["jobs"][0]["id"], id);

    let response = app.cancel_job(id).await;
    assert_eq!(response.status(), 200);
    let cancelled: Value = response.json().await.unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    assert!(cancelled["finished_at"].is_string());
    assert_problem(app.cancel_job(id).await, 409).await;
    assert_eq!(
        app.delete(&format!("/v1/datasets/{dataset_id}"))
            .await
            .status(),
        204
    );
    app.stop().await;
}

/// Progress is recorded in a transaction that locks the job's row, and the
/// heartbeat updates the same row. A heartbeat that waits for that lock must
/// not stop the progress transaction from committing: with a one-second lease
/// (a heartbeat every 333 ms) and a report every few steps, the two meet many
/// times during this job, and it must still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_progress_reports_never_wait_on_each_other() {
    let app = spawn_app_with(TestOptions {
        lease_secs: 1,
        ..Default::default()
    })
    .await;
    // 33 images: two steps an epoch, and a report at every epoch's end.
    let dataset_id = labelled_dataset(&app, 11).await;
    let mut config = quick_pretrain_config();
    config["epochs"] = json!(500);
    config["checkpoint_interval_secs"] = json!(3600);
    let id = app
        .create_job_id(json!({"kind": "pretrain", "dataset_id": dataset_id, "config": config}))
        .await;
    let job = app.wait_for_success(&id, Duration::from_secs(300)).await;
    assert_eq!(job["progress"]["step"], 1000, "{job:#}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_stops_within_seconds_of_a_cancel() {
    let app = spawn_app().await;
    let dataset_id = labelled_dataset(&app, 10).await;
    let mut config = quick_pretrain_config();
    config["epochs"] = json!(1000);
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset_id, "config": config}))
        .await;
    let id = job["id"].as_str().unwrap();
    app.wait_for_job(id, Duration::from_secs(60), |j| {
        j["state"] == "running" && j["progress"]["step"].as_i64() > Some(0)
    })
    .await;
    let response = app.cancel_job(id).await;
    assert_eq!(response.status(), 200);
    let job = app
        .wait_for_job(id, Duration::from_secs(10), |j| j["state"] != "running")
        .await;
    assert_eq!(job["state"], "cancelled");
    assert!(job["model_id"].is_null());
    app.stop().await;
}

/// Starts the real binary; returns it and its address.
async fn start_binary(
    database_url: &str,
    data_dir: &std::path::Path,
    lease_secs: u64,
) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pretext"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--devices",
            "cpu",
            "--poll-interval-ms",
            "200",
        ])
        .arg("--lease-secs")
        .arg(lease_secs.to_string())
        .arg("--database-url")
        .arg(database_url)
        .arg("--data-dir")
        .arg(data_dir)
        .env("PRETEXT_API_KEY", TEST_API_KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the pretext binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let address = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(address) = line.strip_prefix("pretext listening on ") {
                return address.to_string();
            }
        }
        panic!("the binary exited before listening");
    })
    .await
    .expect("the binary listens within a minute");
    (child, address)
}

/// Steps at which a pretraining job of `steps_per_epoch` steps an epoch and
/// `total` steps reports its metrics: every 10 steps and at each epoch's end.
fn report_steps(steps_per_epoch: i64, total: i64) -> Vec<i64> {
    (1..=total)
        .filter(|s| s % 10 == 0 || s % steps_per_epoch == 0 || *s == total)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_mid_training_resumes_from_its_checkpoint_after_the_lease_expires() {
    let (database_url, data_dir) = fresh_environment();
    let (mut child, address) = start_binary(&database_url, &data_dir, 2).await;
    let client = client_with_key(TEST_API_KEY);

    let archive = zip_archive(&labelled_entries(12, 21));
    let dataset: Value = client
        .post(format!("{address}/v1/datasets"))
        .header("content-type", "application/zip")
        .body(archive)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // 36 images in batches of 4: nine steps an epoch. The first epoch's end
    // is checkpointed; the next checkpoint would wait for an hour.
    let total_steps = 200;
    let mut config = quick_pretrain_config();
    config["epochs"] = json!(1000);
    config["max_steps"] = json!(total_steps);
    config["batch_size"] = json!(4);
    config["checkpoint_interval_secs"] = json!(3600);
    let job: Value = client
        .post(format!("{address}/v1/jobs"))
        .json(&json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": config}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_string();

    // Wait until metrics of a step after the checkpoint are recorded (they
    // will be reported again after the resume), then kill without warning.
    let mut progress = Value::Null;
    for _ in 0..600 {
        let job: Value = client
            .get(format!("{address}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        progress = job["progress"].clone();
        let checkpoint_step = progress["checkpoint_step"].as_i64().unwrap();
        if checkpoint_step >= 9 && progress["step"].as_i64().unwrap() > checkpoint_step {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().await.unwrap();
    child.wait().await.unwrap();
    let checkpoint_step = progress["checkpoint_step"].as_i64().unwrap();
    let killed_at = progress["step"].as_i64().unwrap();
    assert!(
        checkpoint_step >= 9 && killed_at > checkpoint_step,
        "no step after an end-of-epoch checkpoint was recorded: {progress}"
    );

    // A new process picks the job up once the lease has expired.
    let app = spawn_app_with(TestOptions {
        lease_secs: 2,
        environment: Some((database_url.clone(), data_dir.clone())),
        ..Default::default()
    })
    .await;
    let mut seen_resumed = Vec::new();
    let started = std::time::Instant::now();
    let job = loop {
        let job = app.job(&id).await;
        if job["attempts"] == 2 && job["state"] == "running" {
            seen_resumed.push(job["progress"]["step"].as_i64().unwrap());
        }
        if matches!(job["state"].as_str(), Some("succeeded" | "failed")) {
            break job;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the job did not end: {job:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"], 2, "the retry is counted");
    assert_eq!(job["progress"]["step"], total_steps);
    assert!(
        !seen_resumed.is_empty(),
        "the second attempt was never seen running"
    );
    let lowest = *seen_resumed.iter().min().unwrap();
    assert!(
        lowest >= checkpoint_step,
        "the second attempt went back to step {lowest} from checkpoint {checkpoint_step}"
    );

    // Steps between the checkpoint and the kill were trained twice, and
    // recorded once: one point per step for every metric.
    let metrics = app.get_json(&format!("/v1/jobs/{id}/metrics")).await;
    let mut steps_by_name: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for point in metrics["points"].as_array().unwrap() {
        steps_by_name
            .entry(point["name"].as_str().unwrap().to_string())
            .or_default()
            .push(point["step"].as_i64().unwrap());
    }
    let expected = report_steps(9, total_steps);
    for name in [
        "loss",
        "pretext_accuracy",
        "learning_rate",
        "images_per_second",
        "batch_wait_ms",
    ] {
        assert_eq!(
            steps_by_name.get(name),
            Some(&expected),
            "`{name}` has one point per reported step (killed at {killed_at}, resumed from {checkpoint_step})"
        );
    }
    let model = app
        .get_json(&format!("/v1/models/{}", job["model_id"].as_str().unwrap()))
        .await;
    assert_eq!(model["kind"], "encoder");
    app.stop().await;
    remove_environment(&database_url, &data_dir).await;
}
