//! Evaluation hygiene: an evaluation never tests on the very images its
//! probe is fitted on, its report says when the test images were seen in
//! pretraining, and a dataset that a queued or running job evaluates on
//! cannot be deleted from under it.

use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

fn id(value: &Value) -> String {
    value["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluations_flag_test_images_seen_in_pretraining_and_keep_their_datasets() {
    let app = spawn_app().await;
    let pretraining = id(&app.upload_zip(zip_archive(&labelled_entries(8, 21))).await);
    let unseen = id(&app.upload_zip(zip_archive(&labelled_entries(4, 22))).await);
    let test_set = id(&app.upload_zip(zip_archive(&labelled_entries(2, 23))).await);

    // Evaluated online on its own pretraining dataset: accepted, and said so.
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": pretraining,
            "config": {"pretext": "rotation", "backbone": "convnet", "image_size": 32,
                       "epochs": 1, "batch_size": 16, "eval_dataset_id": pretraining}}))
        .await;
    let job = app
        .wait_for_success(&id(&job), Duration::from_secs(240))
        .await;
    let encoder = job["model_id"].as_str().unwrap().to_string();
    let report = app.get_json(&format!("/v1/jobs/{}/report", id(&job))).await;
    assert_eq!(report["test_images_seen_in_pretraining"], true, "{report}");
    assert!(
        report["note"]
            .as_str()
            .unwrap()
            .contains("config.eval_dataset_id is the pretraining dataset"),
        "{report}"
    );

    // An evaluate job that holds out part of the encoder's pretraining
    // dataset is flagged; one on a dataset the encoder never saw is not.
    let evaluate = |dataset: &str| {
        json!({"kind": "evaluate", "dataset_id": dataset, "base_model_id": encoder,
               "config": {"protocol": "knn", "k": 3, "test_fraction": 0.25}})
    };
    let seen = app.create_job(evaluate(&pretraining)).await;
    let seen = app
        .wait_for_success(&id(&seen), Duration::from_secs(120))
        .await;
    assert_eq!(
        seen["report"]["test_images_seen_in_pretraining"], true,
        "{seen}"
    );
    let note = seen["report"]["note"].as_str().unwrap();
    assert!(
        note.contains(&pretraining) && note.contains(&encoder),
        "{note}"
    );
    let fresh = app.create_job(evaluate(&unseen)).await;
    let fresh = app
        .wait_for_success(&id(&fresh), Duration::from_secs(120))
        .await;
    assert_eq!(
        fresh["report"]["test_images_seen_in_pretraining"], false,
        "{fresh}"
    );
    assert!(fresh["report"].get("note").is_none(), "{fresh}");

    // Testing on the dataset the probe is fitted on is refused.
    let problem = assert_problem(
        app.post_json(
            "/v1/jobs",
            &json!({"kind": "evaluate", "dataset_id": unseen, "base_model_id": encoder,
                    "config": {"protocol": "knn", "test_dataset_id": unseen}}),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(
        problem["errors"][0]["field"], "config.test_dataset_id",
        "{problem}"
    );

    // A long pretraining that evaluates on `unseen` keeps the worker busy; an
    // evaluation tested on `test_set` waits behind it. Neither dataset can
    // be deleted until both jobs are over.
    let running = app
        .create_job(json!({"kind": "pretrain", "dataset_id": pretraining,
            "config": {"pretext": "rotation", "backbone": "convnet", "image_size": 32,
                       "epochs": 1000, "batch_size": 16, "eval_dataset_id": unseen}}))
        .await;
    let queued = app
        .create_job(
            json!({"kind": "evaluate", "dataset_id": pretraining, "base_model_id": encoder,
            "config": {"protocol": "knn", "k": 3, "test_dataset_id": test_set}}),
        )
        .await;
    for dataset in [&unseen, &test_set] {
        let problem =
            assert_problem(app.delete(&format!("/v1/datasets/{dataset}")).await, 409).await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("queued or running job"),
            "{problem}"
        );
    }
    for job in [&queued, &running] {
        assert_eq!(app.cancel_job(&id(job)).await.status(), 200);
    }
    for job in [&queued, &running] {
        app.wait_for_job(&id(job), Duration::from_secs(120), |j| {
            j["state"] == "cancelled"
        })
        .await;
    }
    for dataset in [&unseen, &test_set] {
        assert_eq!(
            app.delete(&format!("/v1/datasets/{dataset}"))
                .await
                .status(),
            204
        );
    }
    app.stop().await;
}
