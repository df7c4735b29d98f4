//! The pretext tasks beyond jigsaw, and evaluation: every task's loss goes
//! down on generated images; kNN, linear-probe and label-efficiency
//! evaluations run end to end and report through the job, the model and
//! `/report`.

use crate::common::*;
use serde_json::{json, Value};

async fn losses_of(app: &TestApp, job_id: &str) -> Vec<f64> {
    let metrics = app
        .get_json(&format!("/v1/jobs/{job_id}/metrics?name=loss"))
        .await;
    metrics["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect()
}

/// An accuracy measured on `test_images` images: a whole number of them right.
fn assert_counted_accuracy(value: f64, test_images: usize, what: &str) {
    let right = value * test_images as f64;
    assert!(
        (0.0..=1.0).contains(&value) && (right - right.round()).abs() < 1e-6,
        "{what} = {value} is not a count out of {test_images} test images"
    );
}

async fn pretrain_and_check_loss_falls(pretext: &str, extra: Value) {
    pretrain_on_and_check_loss_falls(&labelled_entries(30, 3), pretext, extra).await;
}

async fn pretrain_on_and_check_loss_falls(
    images: &[(String, Vec<u8>)],
    pretext: &str,
    extra: Value,
) {
    let app = spawn_app_without_workers().await;
    let dataset = app.upload_zip(zip_archive(images)).await;
    let mut config = json!({"pretext": pretext, "backbone": "convnet", "image_size": 32, "epochs": 8, "batch_size": 16});
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": config}))
        .await;
    assert_eq!(job["config"]["pretext"], pretext);
    let job = app.run_until_succeeded(job["id"].as_str().unwrap()).await;
    let losses = losses_of(&app, job["id"].as_str().unwrap()).await;
    assert!(losses.len() >= 4, "{losses:?}");
    let first = (losses[0] + losses[1]) / 2.0;
    let last = (losses[losses.len() - 1] + losses[losses.len() - 2]) / 2.0;
    assert!(last < first, "{pretext}: loss did not go down: {losses:?}");
    let model = app
        .get_json(&format!("/v1/models/{}", job["model_id"].as_str().unwrap()))
        .await;
    assert_eq!(model["pretext"], pretext);
    assert_eq!(model["kind"], "encoder");
    let accuracy = model["metrics"]["pretext_accuracy"].as_f64().unwrap();
    let chance = model["metrics"]["chance_accuracy"].as_f64().unwrap();
    assert!(chance > 0.0 && chance < 1.0, "{pretext}: chance {chance}");
    eprintln!("{pretext}: pretext accuracy {accuracy}, chance {chance}");
    assert!(
        accuracy > chance && accuracy <= 1.0,
        "{pretext}: pretext accuracy {accuracy} does not beat chance {chance}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_pretraining_learns() {
    pretrain_and_check_loss_falls("rotation", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simclr_pretraining_learns() {
    pretrain_and_check_loss_falls("simclr", json!({"temperature": 0.5, "projection_dim": 32}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vicreg_pretraining_learns() {
    pretrain_and_check_loss_falls("vicreg", json!({"expander_dim": 64})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barlow_twins_pretraining_learns() {
    pretrain_and_check_loss_falls("barlow_twins", json!({"projector_dim": 64})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_position_pretraining_learns() {
    // Stripes look the same in every patch, so the shapes' images leave little
    // to learn; radial gradients give every patch a position to find.
    pretrain_on_and_check_loss_falls(
        &radial_entries(90, 3),
        "relative_position",
        json!({"image_size": 48, "epochs": 16, "learning_rate": 0.002}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jigsaw_pretraining_learns() {
    pretrain_and_check_loss_falls(
        "jigsaw",
        json!({"assembly": "tiles", "num_permutations": 4, "epochs": 20, "learning_rate": 0.002}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reassembled_jigsaw_pretraining_learns() {
    pretrain_and_check_loss_falls(
        "jigsaw",
        json!({"assembly": "image", "num_permutations": 4, "ordered_fraction": 0.2, "cell_gap": 1,
               "epochs": 20, "learning_rate": 0.002}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoders_are_evaluated_by_knn_linear_probe_and_label_efficiency() {
    let app = spawn_app_without_workers().await;
    let labelled = app.upload_zip(zip_archive(&labelled_entries(20, 8))).await;
    let dataset_id = labelled["id"].as_str().unwrap();

    // A pretrain job that names an evaluation dataset is evaluated when it ends.
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset_id,
            "config": {"pretext": "rotation", "backbone": "convnet", "image_size": 32, "epochs": 3, "batch_size": 16,
                       "eval_dataset_id": dataset_id}}))
        .await;
    let job = app.run_until_succeeded(job["id"].as_str().unwrap()).await;
    let encoder_id = job["model_id"].as_str().unwrap().to_string();
    let report = app
        .get_json(&format!("/v1/jobs/{}/report", job["id"].as_str().unwrap()))
        .await;
    assert_eq!(report["protocol"], "knn+linear");
    assert_eq!(report["model_id"], encoder_id.as_str());
    assert_eq!(report["test_images"], 12, "20% of each class held out");
    let encoder = app.get_json(&format!("/v1/models/{encoder_id}")).await;
    for metric in ["knn_accuracy", "linear_accuracy"] {
        let value = encoder["metrics"][metric].as_f64().unwrap();
        assert_counted_accuracy(value, 12, metric);
        // Three classes as different as stripes and discs: far above chance.
        assert!(value > 0.5, "{metric} = {value}, chance is 1/3");
        assert_eq!(report["summary"][metric].as_f64(), Some(value), "{report}");
    }

    // kNN as its own job, against a separate test dataset.
    let test_set = app.upload_zip(zip_archive(&labelled_entries(5, 9))).await;
    let job = app
        .create_job(
            json!({"kind": "evaluate", "dataset_id": dataset_id, "base_model_id": encoder_id,
            "config": {"protocol": "knn", "k": 5, "test_dataset_id": test_set["id"]}}),
        )
        .await;
    assert_eq!(job["config"]["knn_temperature"], 0.07);
    let job = app.run_until_succeeded(job["id"].as_str().unwrap()).await;
    assert!(job["model_id"].is_null(), "an evaluation makes no model");
    assert_eq!(job["report"]["test_images"], 15);
    assert_eq!(job["report"]["train_images"], 60);
    let knn = job["latest_metrics"]["knn_accuracy"].as_f64().unwrap();
    assert_counted_accuracy(knn, 15, "knn_accuracy");
    assert!(knn > 0.5, "kNN accuracy {knn} on a separate test set");

    // Label efficiency: pretrained vs scratch on the same budgets.
    let job = app
        .create_job(json!({"kind": "evaluate", "dataset_id": dataset_id, "base_model_id": encoder_id,
            "config": {"protocol": "label_efficiency", "labels_per_class": [1, 5], "label_fractions": [1.0],
                       "epochs": 3, "min_steps": 300, "batch_size": 8}}))
        .await;
    let job = app.run_until_succeeded(job["id"].as_str().unwrap()).await;
    let report = app
        .get_json(&format!("/v1/jobs/{}/report", job["id"].as_str().unwrap()))
        .await;
    assert_eq!(report["protocol"], "label_efficiency");
    let rows = report["rows"].as_array().unwrap();
    let budgets: Vec<&str> = rows.iter().map(|r| r["budget"].as_str().unwrap()).collect();
    assert_eq!(budgets, ["1 per class", "5 per class", "100%"]);
    let labels: Vec<i64> = rows.iter().map(|r| r["labels"].as_i64().unwrap()).collect();
    assert_eq!(labels, [3, 15, 48]);
    let test_images = report["test_images"].as_u64().unwrap() as usize;
    assert_eq!(test_images, 12, "20% of each class held out");
    for row in rows {
        for column in ["pretrained_accuracy", "scratch_accuracy"] {
            let value = row[column].as_f64().unwrap();
            assert_counted_accuracy(value, test_images, column);
        }
    }
    // With every training label, a classifier of stripes and discs beats chance.
    let all_labels = &rows[2];
    assert!(
        all_labels["pretrained_accuracy"].as_f64().unwrap() > 0.5,
        "{all_labels}"
    );
    // The encoder carries the report's gains.
    let encoder = app.get_json(&format!("/v1/models/{encoder_id}")).await;
    assert_eq!(
        encoder["metrics"]["label_efficiency_gain_1_per_class"].as_f64(),
        rows[0]["gain"].as_f64(),
        "{encoder}"
    );

    // What can't be evaluated says why.
    let problem = assert_problem(
        app.post_json(
            "/v1/jobs",
            &json!({"kind": "evaluate", "dataset_id": dataset_id, "config": {"protocol": "knn"}}),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "base_model_id");
    let problem = assert_problem(
        app.post_json(
            "/v1/jobs",
            &json!({"kind": "evaluate", "dataset_id": dataset_id, "base_model_id": encoder_id}),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "config.protocol");
    let finetune = app
        .create_job(json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": encoder_id, "config": {"max_steps": 1}}))
        .await;
    let finetune = app
        .run_until_succeeded(finetune["id"].as_str().unwrap())
        .await;
    assert_problem(
        app.get(&format!(
            "/v1/jobs/{}/report",
            finetune["id"].as_str().unwrap()
        ))
        .await,
        409,
    )
    .await;
    app.stop().await;
}
