//! Scale-out: the API and training workers as separate processes of the real
//! binary, sharing a database (and, with `s3://` storage, a bucket): workers
//! share the queue without claiming a job twice, a worker stopped with
//! SIGTERM hands its job back with its checkpoint, and a worker on another
//! "machine" (its own data folder) trains on what the API stored in S3.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::processes::{start_api, start_moto_or_skip, start_worker};
use crate::common::{
    fresh_environment, labelled_entries, png, quick_pretrain_config, remove_environment,
    shape_image, zip_archive,
};
use rand::SeedableRng;
use serde_json::{json, Value};

fn subfolder(data_dir: &std::path::Path, name: &str) -> PathBuf {
    data_dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_alone_queues_jobs_and_two_worker_processes_run_each_exactly_once() {
    let (database_url, data_dir) = fresh_environment();
    let api = start_api(&database_url, &data_dir, &["--workers", "0"], &[]).await;
    let dataset = api.upload_zip(zip_archive(&labelled_entries(6, 3))).await;
    let mut config = quick_pretrain_config();
    config["epochs"] = json!(1);
    config["max_steps"] = json!(12);
    config["batch_size"] = json!(4);
    let mut jobs = Vec::new();
    for _ in 0..8 {
        jobs.push(
            api.create_job_id(
                json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": config}),
            )
            .await,
        );
    }

    // With no workers anywhere, nothing runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &jobs {
        let job = api.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(
            job["state"], "queued",
            "serve --workers 0 ran a job: {job:#}"
        );
        assert_eq!(job["attempts"], 0);
    }

    let (first, second) = tokio::join!(
        start_worker(&database_url, &data_dir, 30, &[]),
        start_worker(&database_url, &data_dir, 30, &[]),
    );
    let mut models = Vec::new();
    for id in &jobs {
        let job = api.wait_for_success(id, Duration::from_secs(300)).await;
        assert_eq!(
            job["attempts"], 1,
            "job {id} was claimed more than once: {job:#}"
        );
        models.push(job["model_id"].as_str().unwrap().to_string());
    }
    models.sort();
    models.dedup();
    assert_eq!(models.len(), jobs.len(), "one model per job");
    let listed = api.get_json("/v1/models").await;
    assert_eq!(listed["models"].as_array().unwrap().len(), jobs.len());

    let (a, b) = (first.claimed_jobs(), second.claimed_jobs());
    let mut claims: Vec<&String> = a.iter().chain(b.iter()).collect();
    claims.sort();
    let mut expected: Vec<&String> = jobs.iter().collect();
    expected.sort();
    assert_eq!(
        claims, expected,
        "every job claimed exactly once across both workers"
    );
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both workers took jobs: {} and {}",
        a.len(),
        b.len()
    );
    tokio::join!(api.stop(), first.stop(), second.stop());
    remove_environment(&database_url, &data_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_requeues_its_job_at_its_checkpoint_and_another_finishes_it()
{
    let (database_url, data_dir) = fresh_environment();
    let api = start_api(&database_url, &data_dir, &["--workers", "0"], &[]).await;
    let dataset = api.upload_zip(zip_archive(&labelled_entries(12, 21))).await;
    let mut config = quick_pretrain_config();
    config["epochs"] = json!(1000);
    config["max_steps"] = json!(150);
    config["batch_size"] = json!(4);
    let id = api
        .create_job_id(json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": config}))
        .await;

    let mut first = start_worker(&database_url, &data_dir, 30, &[]).await;
    // 36 images in batches of 4: the first epoch ends and checkpoints at step 9.
    let running = api
        .wait_for_job(&id, Duration::from_secs(120), |j| {
            j["state"] == "running" && j["progress"]["checkpoint_step"].as_i64() >= Some(9)
        })
        .await;
    let seen_checkpoint = running["progress"]["checkpoint_step"].as_i64().unwrap();

    let stopping = Instant::now();
    first.terminate();
    let status = tokio::time::timeout(Duration::from_secs(30), first.child.wait())
        .await
        .expect("the worker exits within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "the worker exits cleanly: {status}");
    eprintln!("worker exited {:?} after SIGTERM", stopping.elapsed());

    let released = api.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(released["state"], "queued", "{released:#}");
    assert_eq!(released["attempts"], 0, "a released attempt is not counted");
    let checkpoint = released["progress"]["checkpoint_step"].as_i64().unwrap();
    assert!(
        checkpoint >= seen_checkpoint && checkpoint < 150,
        "checkpoint step kept: {checkpoint}"
    );
    // Let the log reader take the last lines the worker wrote.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = first.log.lock().unwrap().clone();
    assert!(log.contains("released back to the queue"), "{log}");

    let second = start_worker(&database_url, &data_dir, 30, &[]).await;
    let done = api.wait_for_success(&id, Duration::from_secs(300)).await;
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["progress"]["step"], 150);
    // The second worker started from the checkpoint: no step up to it was trained twice.
    let steps = api.metric_steps(&id, "loss").await;
    let before: Vec<i64> = steps.iter().copied().filter(|&s| s <= checkpoint).collect();
    let mut unique = before.clone();
    unique.dedup();
    assert!(!before.is_empty(), "{steps:?}");
    assert_eq!(
        before, unique,
        "steps up to the checkpoint trained once: {steps:?}"
    );
    tokio::join!(api.stop(), second.stop());
    remove_environment(&database_url, &data_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_and_a_worker_with_separate_folders_share_artifacts_through_s3() {
    let Some(moto) =
        start_moto_or_skip("an_api_and_a_worker_with_separate_folders_share_artifacts_through_s3")
            .await
    else {
        return;
    };
    let bucket = "pretext-test";
    moto.create_bucket(bucket).await;
    let mut env = moto.env();
    env.push((
        "PRETEXT_STORAGE_URL".to_string(),
        format!("s3://{bucket}/cluster"),
    ));
    let (database_url, data_dir) = fresh_environment();
    let (api_dir, worker_dir) = (subfolder(&data_dir, "api"), subfolder(&data_dir, "worker"));
    let api = start_api(&database_url, &api_dir, &["--workers", "0"], &env).await;
    let worker = start_worker(&database_url, &worker_dir, 30, &env).await;

    let dataset = api.upload_zip(zip_archive(&labelled_entries(10, 5))).await;
    let dataset_id = dataset["id"].as_str().unwrap().to_string();
    let keys = moto.keys(bucket, "cluster/").await;
    assert!(
        keys.contains(&format!("cluster/datasets/{dataset_id}.tar")),
        "the dataset is packed into one object: {keys:?}"
    );

    let pretrain = api
        .create_job_id(json!({"kind": "pretrain", "dataset_id": dataset_id, "config": quick_pretrain_config()}))
        .await;
    let job = api
        .wait_for_success(&pretrain, Duration::from_secs(300))
        .await;
    let encoder_id = job["model_id"].as_str().unwrap().to_string();
    assert!(
        worker_dir
            .join(format!("datasets/{dataset_id}/manifest.json"))
            .exists(),
        "the worker fetched the dataset into its own folder"
    );
    let finetune = api
        .create_job_id(
            json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": encoder_id,
            "config": {"max_steps": 4, "batch_size": 8, "val_fraction": 0.0}}),
        )
        .await;
    let job = api
        .wait_for_success(&finetune, Duration::from_secs(300))
        .await;
    let classifier_id = job["model_id"].as_str().unwrap().to_string();

    let keys = moto.keys(bucket, "cluster/").await;
    for model in [&encoder_id, &classifier_id] {
        assert!(
            keys.contains(&format!("cluster/models/{model}/weights.safetensors")),
            "model {model} is in the bucket: {keys:?}"
        );
    }
    assert!(
        !keys.iter().any(|k| k.starts_with("cluster/jobs/")),
        "finished jobs leave no checkpoint behind: {keys:?}"
    );

    // The API has never seen the classifier's weights: it fetches them to classify.
    let weights = api_dir.join(format!("models/{classifier_id}/weights.safetensors"));
    assert!(!weights.exists());
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let response = api
        .post_image(
            &classifier_id,
            "classify",
            "",
            png(&shape_image("vertical", &mut rng)),
        )
        .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["predictions"].as_array().map(Vec::len),
        Some(1),
        "{body}"
    );
    assert!(weights.exists(), "the API kept the fetched weights");

    let response = api.delete(&format!("/v1/models/{classifier_id}")).await;
    assert_eq!(response.status(), 204);
    let keys = moto.keys(bucket, "cluster/").await;
    assert!(
        !keys.iter().any(|k| k.contains(&classifier_id)),
        "the deleted model's objects are gone: {keys:?}"
    );
    assert!(!weights.exists(), "and its local copy");
    assert!(
        keys.contains(&format!("cluster/models/{encoder_id}/weights.safetensors")),
        "other models stay: {keys:?}"
    );
    tokio::join!(api.stop(), worker.stop());
    remove_environment(&database_url, &data_dir).await;
}
