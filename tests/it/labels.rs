//! Labels sent without re-uploading: a CSV or JSON Lines file becomes the
//! next version of a dataset's labels, whole or not at all; the image list
//! and new jobs use the latest version unless a job names another, and the
//! job records which; bad files are refused row by row with nothing
//! applied, and another tenant's dataset is a 404.

use crate::common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_an_unlabelled_upload_in_two_files_then_finetunes_on_a_chosen_version() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    // 15 images at the archive's root (so unlabelled): 5 discs, then 5
    // horizontal and 5 vertical bars.
    let shapes = labelled_entries(5, 7);
    let entries: Vec<(String, Vec<u8>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (_, bytes))| (format!("img_{i:02}.png"), bytes.clone()))
        .collect();
    let class_of = |i: usize| shapes[i].0.split('/').next().unwrap().to_string();
    let dataset = app.upload_zip(zip_archive(&entries)).await;
    assert_eq!(dataset["labeled"], false);
    assert_eq!(dataset["label_version"], 0);
    let id = dataset["id"].as_str().unwrap();
    let finetune = |config: Value| json!({"kind": "finetune", "dataset_id": id, "config": config});
    let quick = json!({"backbone": "convnet", "image_size": 32, "max_steps": 2, "batch_size": 4,
                       "val_fraction": 0.0, "augment": false});

    let response = app.post_json("/v1/jobs", &finetune(quick.clone())).await;
    let problem = assert_problem(response, 422).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("/labels"),
        "{problem}"
    );

    // A file with bad rows changes nothing, and says which rows.
    let bad = "image_id,label\n0,disc\n99,disc\n1,\n0,vertical\nx,disc\n";
    let response = app.put_labels(id, "text/csv", bad).await;
    let problem = assert_problem(response, 422).await;
    let lines: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(lines, ["line 3", "line 4", "line 5", "line 6"], "{problem}");
    let labels = app.get_json(&format!("/v1/datasets/{id}/labels")).await;
    assert_eq!(labels["version"], 0);
    assert_eq!(labels["labelled"], 0);
    assert_eq!(labels["versions"], json!([]));
    let response = app.put_labels(id, "application/json", "{}").await;
    assert_problem(response, 415).await;

    // Images 0-9 (discs and horizontal bars) by id, as CSV: version 1.
    let csv: String = std::iter::once("image_id,label\n".to_string())
        .chain((0..10).map(|i| format!("{i},{}\n", class_of(i))))
        .collect();
    let response = app.put_labels(id, "text/csv", &csv).await;
    assert_eq!(response.status(), 200);
    let first: Value = response.json().await.unwrap();
    assert_eq!(first["version"], 1, "{first}");
    assert_eq!(first["labelled"], 10);
    assert_eq!(first["changed"], 10);
    assert_eq!(first["classes"], json!(["disc", "horizontal"]));

    // Images 10-14 by archive path, as JSON Lines: version 2.
    let jsonl: String = (10..15)
        .map(|i| format!("{}\n", json!({"path": entries[i].0, "label": class_of(i)})))
        .collect();
    let response = app.put_labels(id, "application/jsonl", &jsonl).await;
    assert_eq!(response.status(), 200);
    let second: Value = response.json().await.unwrap();
    assert_eq!(second["version"], 2, "{second}");
    assert_eq!(second["labelled"], 15);
    assert_eq!(second["changed"], 5);
    assert_eq!(
        second["class_counts"],
        json!({"disc": 5, "horizontal": 5, "vertical": 5})
    );

    let labels = app.get_json(&format!("/v1/datasets/{id}/labels")).await;
    assert_eq!(labels["version"], 2);
    let versions: Vec<(u64, u64)> = labels["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["labelled"].as_u64().unwrap(),
                v["changed"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(versions, [(10, 10), (15, 5)]);
    let dataset = app.get_json(&format!("/v1/datasets/{id}")).await;
    assert_eq!(dataset["labeled"], true);
    assert_eq!(dataset["label_version"], 2);
    let page = app
        .get_json(&format!("/v1/datasets/{id}/images?offset=12&limit=1"))
        .await;
    assert_eq!(page["images"][0]["label"], "vertical", "{page}");

    // Jobs take the latest version unless told, and record it.
    let latest = app.create_job(finetune(quick.clone())).await;
    assert_eq!(latest["config"]["label_version"], 2, "{latest}");
    let mut on_first = quick.clone();
    on_first["label_version"] = json!(1);
    let chosen = app.create_job(finetune(on_first)).await;
    assert_eq!(chosen["config"]["label_version"], 1);
    let mut too_new = quick.clone();
    too_new["label_version"] = json!(3);
    let response = app.post_json("/v1/jobs", &finetune(too_new)).await;
    let problem = assert_problem(response, 422).await;
    assert_eq!(problem["errors"][0]["field"], "config.label_version");

    // Each classifier knows the classes of the version it trained on.
    app.run_queued_jobs().await;
    for (job, classes) in [
        (&latest, json!(["disc", "horizontal", "vertical"])),
        (&chosen, json!(["disc", "horizontal"])),
    ] {
        let job = app.job(job["id"].as_str().unwrap()).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let model = app
            .get_json(&format!("/v1/models/{}", job["model_id"].as_str().unwrap()))
            .await;
        assert_eq!(model["classes"], classes, "{model}");
    }

    // Another tenant can neither read nor label the dataset.
    let other = app.with_key(&app.create_key("other").await);
    assert_problem(other.put_labels(id, "text/csv", &csv).await, 404).await;
    assert_problem(other.get(&format!("/v1/datasets/{id}/labels")).await, 404).await;
    app.stop().await;
}
