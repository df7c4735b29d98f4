//! Transfer methods: an encoder becomes a classifier by fine-tuning, a
//! linear probe, kNN, `auto`'s cross-validated choice, or self-training
//! on unlabelled images too; each is served
//! like any classifier, says in its `model.json` how it was made, and is
//! compared with training from scratch by the label-efficiency protocol. And
//! the kNN monitor that follows an encoder while it pretrains.

use crate::common::*;
use serde_json::{json, Value};

/// Pretrains a small rotation encoder on the labelled shapes and returns the
/// app, the labelled dataset's id and the encoder's id.
async fn shapes_and_encoder() -> (TestApp, String, String) {
    let app = spawn_app_without_workers().await;
    let labelled = app.upload_zip(zip_archive(&labelled_entries(20, 11))).await;
    let dataset_id = labelled["id"].as_str().unwrap().to_string();
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset_id,
            "config": {"pretext": "rotation", "backbone": "convnet", "image_size": 32, "epochs": 2, "batch_size": 16}}))
        .await;
    let job = app.run_until_succeeded(job["id"].as_str().unwrap()).await;
    let encoder_id = job["model_id"].as_str().unwrap().to_string();
    (app, dataset_id, encoder_id)
}

/// Classifies four fresh images of each class; returns how many were right.
async fn classified_right(app: &TestApp, classifier_id: &str, seed: u64) -> usize {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut images = Vec::new();
    let mut truth = Vec::new();
    for class in CLASSES {
        for _ in 0..4 {
            images.push(png(&shape_image(class, &mut rng)));
            truth.push(class);
        }
    }
    let response = app
        .post_images(classifier_id, "classify", "?top_k=3", images)
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), truth.len());
    let mut right = 0;
    for (prediction, expected) in predictions.iter().zip(&truth) {
        let ranked = prediction.as_array().unwrap();
        assert_eq!(ranked.len(), 3, "{prediction}");
        let total: f64 = ranked.iter().map(|r| r["score"].as_f64().unwrap()).sum();
        assert!(
            (total - 1.0).abs() < 1e-4,
            "scores sum to {total}: {prediction}"
        );
        right += usize::from(ranked[0]["label"] == *expected);
    }
    right
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transfer_method_makes_a_classifier_that_says_how_it_was_made() {
    // Its accuracy bound holds for the weights a seeded job starts from;
    // beside other tests, LibTorch's process-wide generator would be shared.
    if !in_own_process(
        "transfer::every_transfer_method_makes_a_classifier_that_says_how_it_was_made",
    ) {
        return;
    }
    let (app, dataset_id, encoder_id) = shapes_and_encoder().await;
    for (transfer, vote) in [("knn", true), ("linear_probe", false), ("fine_tune", false)] {
        let job = app
            .create_job(json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": encoder_id,
                "config": {"transfer": transfer, "k": 5, "labels_per_class": 8, "min_steps": 60, "batch_size": 8}}))
            .await;
        assert_eq!(job["config"]["transfer"], transfer);
        let job = app.run_until_succeeded(job["id"].as_str().unwrap()).await;
        let classifier_id = job["model_id"].as_str().unwrap();
        let description = app
            .get_json(&format!("/v1/models/{classifier_id}/model.json"))
            .await;
        assert_eq!(description["kind"], "classifier");
        assert_eq!(description["transfer"], transfer, "{description}");
        assert_eq!(description["vote"].is_object(), vote, "{description}");
        if vote {
            assert_eq!(description["vote"]["k"], 5);
        }
        let right = classified_right(&app, classifier_id, 5).await;
        // Stripes and discs: chance is 4 of 12.
        assert!(right >= 8, "{transfer}: {right} of 12 right");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_cross_validates_on_the_training_labels_and_keeps_its_choice() {
    let (app, dataset_id, encoder_id) = shapes_and_encoder().await;
    // No transfer given: a job from an encoder uses auto.
    let job = app
        .create_job(
            json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": encoder_id,
            "config": {"labels_per_class": 6, "min_steps": 40, "batch_size": 8}}),
        )
        .await;
    assert_eq!(job["config"]["transfer"], "auto");
    let job = app.run_until_succeeded(job["id"].as_str().unwrap()).await;
    let classifier_id = job["model_id"].as_str().unwrap();
    let model = app.get_json(&format!("/v1/models/{classifier_id}")).await;
    let scores: Vec<(String, f64)> = ["knn", "linear_probe", "fine_tune"]
        .iter()
        .map(|m| {
            let name = format!("auto_cv_accuracy_{m}");
            let score = model["metrics"][&name].as_f64();
            (
                m.to_string(),
                score.unwrap_or_else(|| panic!("{name} missing: {model}")),
            )
        })
        .collect();
    let best = scores.iter().map(|(_, s)| *s).fold(f64::MIN, f64::max);
    let description = app
        .get_json(&format!("/v1/models/{classifier_id}/model.json"))
        .await;
    let chosen = description["transfer"].as_str().unwrap();
    let chosen_score = scores.iter().find(|(m, _)| m == chosen).unwrap().1;
    assert_eq!(chosen_score, best, "auto chose {chosen} among {scores:?}");
    // A scratch job defaults to fine-tuning; kNN needs an encoder.
    let scratch = app
        .create_job(
            json!({"kind": "finetune", "dataset_id": dataset_id, "config": {"max_steps": 1}}),
        )
        .await;
    assert_eq!(scratch["config"]["transfer"], "fine_tune");
    let problem = assert_problem(
        app.post_json(
            "/v1/jobs",
            &json!({"kind": "finetune", "dataset_id": dataset_id, "config": {"transfer": "knn"}}),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "config.transfer");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_efficiency_compares_every_transfer_method_with_scratch() {
    let (app, dataset_id, encoder_id) = shapes_and_encoder().await;
    let job = app
        .create_job(json!({"kind": "evaluate", "dataset_id": dataset_id, "base_model_id": encoder_id,
            "config": {"protocol": "label_efficiency", "labels_per_class": [4], "label_fractions": [],
                       "transfers": ["linear_probe", "knn", "auto", "self_training"], "k": 5,
                       "epochs": 2, "min_steps": 20, "batch_size": 8}}))
        .await;
    let job = app.run_until_succeeded(job["id"].as_str().unwrap()).await;
    let report = &job["report"];
    let columns: Vec<&str> = report["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for column in [
        "linear_probe_accuracy",
        "knn_gain",
        "auto_accuracy",
        "auto_choice",
        "self_training_gain",
        "self_training_teacher",
        "pseudo_labels",
        "pseudo_label_agreement",
    ] {
        assert!(
            columns.contains(&column),
            "{column} missing from {columns:?}"
        );
    }
    let row = &report["rows"][0];
    let scratch = row["scratch_accuracy"].as_f64().unwrap();
    for method in ["linear_probe", "knn", "auto", "self_training"] {
        let accuracy = row[format!("{method}_accuracy")].as_f64().unwrap();
        let gain = row[format!("{method}_gain")].as_f64().unwrap();
        assert!((gain - (accuracy - scratch)).abs() < 1e-9, "{row}");
    }
    // The first method gives the headline columns.
    assert_eq!(row["pretrained_accuracy"], row["linear_probe_accuracy"]);
    let choice = row["auto_choice"].as_str().unwrap();
    assert!(
        ["knn", "linear_probe", "fine_tune"].contains(&choice),
        "{row}"
    );
    // Self-training's teacher is auto's choice, made once per budget.
    assert_eq!(row["self_training_teacher"], row["auto_choice"], "{row}");
    assert!(row["pseudo_labels"].as_u64().unwrap() > 0, "{row}");
    let agreement = row["pseudo_label_agreement"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&agreement), "{row}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_knn_monitor_follows_the_encoder_every_epoch() {
    let app = spawn_app_without_workers().await;
    let labelled = app.upload_zip(zip_archive(&labelled_entries(12, 13))).await;
    let dataset_id = labelled["id"].as_str().unwrap();
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset_id,
            "config": {"pretext": "vicreg", "backbone": "convnet", "image_size": 32, "epochs": 3,
                       "batch_size": 12, "expander_dim": 64, "eval_dataset_id": dataset_id}}))
        .await;
    assert_eq!(job["config"]["knn_monitor_epochs"], 1);
    let job = app.run_until_succeeded(job["id"].as_str().unwrap()).await;
    let metrics = app
        .get_json(&format!(
            "/v1/jobs/{}/metrics?name=knn_monitor_accuracy",
            job["id"].as_str().unwrap()
        ))
        .await;
    let points = metrics["points"].as_array().unwrap();
    let epochs: Vec<i64> = points
        .iter()
        .map(|p| p["epoch"].as_i64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2, 3], "{metrics}");
    for point in points {
        let accuracy = point["value"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{point}");
    }
    app.stop().await;
}

/// A flat archive of shape images (no class folders): an unlabelled dataset.
fn unlabelled_shapes(per_class: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    labelled_entries(per_class, seed)
        .into_iter()
        .enumerate()
        .map(|(i, (_, bytes))| (format!("shape{i}.png"), bytes))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_training_learns_from_the_images_nobody_labelled() {
    let (app, dataset_id, encoder_id) = shapes_and_encoder().await;
    let unlabelled = app
        .upload_zip(zip_archive(&unlabelled_shapes(10, 23)))
        .await;
    let unlabelled_id = unlabelled["id"].as_str().unwrap();
    assert_eq!(unlabelled["labeled"], false, "{unlabelled}");
    let job = app
        .create_job(
            json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": encoder_id,
            "config": {"transfer": "self_training", "unlabelled_dataset_id": unlabelled_id,
                       "labels_per_class": 4, "pseudo_labels_per_class": 8,
                       "pseudo_label_threshold": 0.0, "k": 5, "min_steps": 60, "batch_size": 8}}),
        )
        .await;
    assert_eq!(job["config"]["pseudo_labels_per_class"], 8);
    let job = app.run_until_succeeded(job["id"].as_str().unwrap()).await;
    let classifier_id = job["model_id"].as_str().unwrap();
    let model = app.get_json(&format!("/v1/models/{classifier_id}")).await;
    let metric = |name: &str| {
        model["metrics"][name]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} missing: {model}"))
    };
    // 60 labelled images, 6 held out for validation, 12 used as labels: the
    // other 42 and the 30 unlabelled ones are pseudo-labelling candidates.
    assert_eq!(metric("train_labels"), 12.0);
    assert_eq!(metric("unlabelled_images"), 42.0 + 30.0);
    let pseudo = metric("pseudo_labels");
    assert!((1.0..=24.0).contains(&pseudo), "{pseudo} pseudo-labels");
    let confidence = metric("pseudo_label_confidence");
    assert!(confidence > 0.0 && confidence <= 1.0, "{confidence}");
    // The teacher was auto's choice: its cross-validation is on record.
    metric("auto_cv_accuracy_knn");
    let description = app
        .get_json(&format!("/v1/models/{classifier_id}/model.json"))
        .await;
    assert_eq!(description["transfer"], "self_training", "{description}");
    assert!(description["vote"].is_null(), "{description}");
    let right = classified_right(&app, classifier_id, 7).await;
    assert!(right >= 8, "self_training: {right} of 12 right");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_training_defaults_to_the_pretraining_images_and_says_when_it_has_none() {
    let (app, dataset_id, encoder_id) = shapes_and_encoder().await;
    // An encoder pretrained on unlabelled images: self-training from it
    // learns from them unless told otherwise, and the stored config says so.
    let unlabelled = app.upload_zip(zip_archive(&unlabelled_shapes(4, 29))).await;
    let unlabelled_id = unlabelled["id"].as_str().unwrap();
    let pretrain = app
        .create_job(json!({"kind": "pretrain", "dataset_id": unlabelled_id,
            "config": {"pretext": "rotation", "backbone": "convnet", "image_size": 32, "epochs": 1, "batch_size": 12}}))
        .await;
    let pretrain = app
        .run_until_succeeded(pretrain["id"].as_str().unwrap())
        .await;
    let job = app
        .create_job(json!({"kind": "finetune", "dataset_id": dataset_id,
            "base_model_id": pretrain["model_id"], "config": {"transfer": "self_training"}}))
        .await;
    assert_eq!(job["config"]["unlabelled_dataset_id"], unlabelled_id);
    app.cancel_job(job["id"].as_str().unwrap()).await;

    // The shapes encoder was pretrained on the labelled dataset itself, and
    // every labelled image is a label: nothing is left to pseudo-label.
    let job = app
        .create_job(
            json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": encoder_id,
            "config": {"transfer": "self_training", "min_steps": 10, "batch_size": 8}}),
        )
        .await;
    assert!(job["config"]["unlabelled_dataset_id"].is_null(), "{job}");
    let id = job["id"].as_str().unwrap();
    app.run_queued_jobs().await;
    let job = app.job(id).await;
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("config.unlabelled_dataset_id"), "{error}");

    let missing = uuid::Uuid::new_v4();
    let problem = assert_problem(
        app.post_json(
            "/v1/jobs",
            &json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": encoder_id,
                    "config": {"transfer": "self_training", "unlabelled_dataset_id": missing}}),
        )
        .await,
        404,
    )
    .await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("config.unlabelled_dataset_id"),
        "{problem}"
    );
    app.stop().await;
}
