//! Per-tenant quotas: a tenant at its limit of datasets, stored bytes,
//! models or active jobs gets 429 (413 for bytes) with a problem that names
//! the quota's setting, its value and what the tenant holds; nothing is
//! stored or queued meanwhile; freeing room lets the request through; and
//! another tenant is not held back by the first one's usage.

use crate::common::*;
use serde_json::json;

const STORED_BYTES: u64 = 40_000;

fn quota_options() -> TestOptions {
    TestOptions {
        workers: 0,
        configure: Some(|config| {
            config.quota_datasets = 2;
            config.quota_stored_bytes = STORED_BYTES;
            config.quota_models = 1;
            config.quota_active_jobs = 2;
        }),
        ..TestOptions::default()
    }
}

fn archive_bytes(entries: &[(String, Vec<u8>)]) -> usize {
    entries.iter().map(|(_, bytes)| bytes.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_quota_refuses_past_its_value_and_lets_through_once_there_is_room() {
    let app = spawn_app_with(quota_options()).await;
    let small = labelled_entries(2, 1);
    let big = labelled_entries(100, 2);
    assert!(
        archive_bytes(&small) < 10_000,
        "the premise: a small dataset"
    );
    assert!(
        archive_bytes(&big) as u64 > STORED_BYTES,
        "the premise: a big one"
    );

    // Stored bytes: the big archive does not fit, and leaves nothing behind.
    let first = app.upload_zip(zip_archive(&small)).await;
    let response = app
        .upload_raw(zip_archive(&big), "application/zip", Some("big"))
        .await;
    // Refused before its body was read: the client must not reuse the connection.
    assert_eq!(response.headers()["connection"], "close");
    let problem = assert_problem(response, 413).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("PRETEXT_QUOTA_STORED_BYTES") && detail.contains(&STORED_BYTES.to_string()),
        "{detail}"
    );
    assert_eq!(
        app.get_json("/v1/datasets").await["datasets"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(
        upload_files(&app.data_dir).is_empty(),
        "the refused upload left files"
    );

    // Datasets: a second fits, a third does not until one is deleted.
    let second = app.upload_zip(zip_archive(&small)).await;
    let response = app
        .upload_raw(zip_archive(&small), "application/zip", Some("third"))
        .await;
    assert_eq!(response.headers()["retry-after"], "3600");
    let problem = assert_problem(response, 429).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("PRETEXT_QUOTA_DATASETS")
            && detail.contains("has 2 datasets")
            && detail.contains("allows 2"),
        "{detail}"
    );
    let response = app
        .delete(&format!("/v1/datasets/{}", second["id"].as_str().unwrap()))
        .await;
    assert_eq!(response.status(), 204);
    app.upload_zip(zip_archive(&small)).await;

    // Models: one pretraining makes the one model allowed; a job that would
    // make another is refused, one that makes none is queued.
    let dataset_id = first["id"].as_str().unwrap();
    let pretrain = app
        .create_job_id(json!({"kind": "pretrain", "dataset_id": dataset_id,
            "config": quick_pretrain_config()}))
        .await;
    let model_id = app.run_until_succeeded(&pretrain).await["model_id"]
        .as_str()
        .unwrap()
        .to_string();
    let response = app
        .post_json(
            "/v1/jobs",
            &json!({"kind": "finetune", "dataset_id": dataset_id,
            "base_model_id": model_id}),
        )
        .await;
    let problem = assert_problem(response, 429).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("PRETEXT_QUOTA_MODELS"),
        "{problem}"
    );

    // Active jobs: two may wait at once; a third waits for a cancel.
    let embed = json!({"kind": "embed", "dataset_id": dataset_id, "base_model_id": model_id});
    let first_embed = app.create_job_id(embed.clone()).await;
    app.create_job_id(embed.clone()).await;
    let response = app.post_json("/v1/jobs", &embed).await;
    assert_eq!(response.headers()["retry-after"], "30");
    let problem = assert_problem(response, 429).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("PRETEXT_QUOTA_ACTIVE_JOBS")
            && detail.contains("has 2 jobs queued or running"),
        "{detail}"
    );
    let listed = app.get_json("/v1/jobs").await["jobs"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        listed, 3,
        "the pretraining and the two embed jobs, nothing more"
    );
    assert_eq!(app.cancel_job(&first_embed).await.status(), 200);
    app.create_job_id(embed).await;

    // Another tenant has quotas of its own.
    let other = app.with_key(&app.create_key("other").await);
    other.upload_zip(zip_archive(&small)).await;
    other.upload_zip(zip_archive(&small)).await;
    app.stop().await;
}
