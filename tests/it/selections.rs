//! Choosing which images to label next: after a few labels, a classifier
//! and an embed job, each strategy picks unlabelled images only (the
//! uncertain ones by the classifier's own probabilities), the selection is
//! stored and read back, bad requests are named, and another tenant's
//! dataset is a 404.

use std::collections::HashSet;

use crate::common::*;
use pretext::data::npy::read_f32_matrix;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selects_unlabelled_images_by_each_strategy_and_keeps_the_selection() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let shapes = labelled_entries(8, 41);
    let flat: Vec<(String, Vec<u8>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (_, bytes))| (format!("{i:02}.png"), bytes.clone()))
        .collect();
    let dataset = app.upload_zip(zip_archive(&flat)).await;
    let id = dataset["id"].as_str().unwrap();
    // Two labels per class: images 0, 1 (discs), 8, 9, 16, 17.
    let labelled: HashSet<u64> = [0, 1, 8, 9, 16, 17].into();
    let csv: String = labelled
        .iter()
        .map(|&i| format!("{i},{}\n", shapes[i as usize].0.split('/').next().unwrap()))
        .collect();
    let response = app
        .put_labels(id, "text/csv", &format!("image_id,label\n{csv}"))
        .await;
    assert_eq!(response.status(), 200);
    let finetune = app
        .create_job_id(json!({"kind": "finetune", "dataset_id": id,
            "config": {"backbone": "convnet", "image_size": 32, "max_steps": 10,
                       "batch_size": 6, "val_fraction": 0.0}}))
        .await;
    let classifier = app.run_until_succeeded(&finetune).await["model_id"]
        .as_str()
        .unwrap()
        .to_string();
    let select = |body: Value| {
        let app = &app;
        async move {
            app.post_json(&format!("/v1/datasets/{id}/selections"), &body)
                .await
        }
    };

    // Before the dataset is embedded, the answer says how.
    let response = select(json!({"budget": 5, "model_id": classifier})).await;
    let problem = assert_problem(response, 409).await;
    assert!(problem["detail"].as_str().unwrap().contains("kind embed"));
    let embed = app
        .create_job_id(json!({"kind": "embed", "dataset_id": id, "base_model_id": classifier}))
        .await;
    app.run_until_succeeded(&embed).await;

    let ids = |selection: &Value| -> Vec<u64> {
        selection["image_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    for strategy in [
        "representative",
        "diversity",
        "uncertainty",
        "uncertain_diverse",
    ] {
        let response =
            select(json!({"budget": 5, "model_id": classifier, "strategy": strategy})).await;
        assert_eq!(response.status(), 201, "{strategy}");
        let selection: Value = response.json().await.unwrap();
        assert_eq!(selection["strategy"], strategy);
        assert_eq!(selection["label_version"], 1);
        assert_eq!(selection["embed_job_id"], embed.as_str());
        let chosen = ids(&selection);
        assert_eq!(chosen.len(), 5, "{selection}");
        assert_eq!(
            chosen.iter().collect::<HashSet<_>>().len(),
            5,
            "{selection}"
        );
        assert!(chosen.iter().all(|i| !labelled.contains(i)), "{selection}");
        for (image, id) in selection["images"].as_array().unwrap().iter().zip(&chosen) {
            assert_eq!(image["path"], flat[*id as usize].0.as_str());
        }
        let again = app
            .get_json(&format!(
                "/v1/datasets/{id}/selections/{}",
                selection["id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(ids(&again), chosen);
    }

    // Uncertainty: the unlabelled images whose two likeliest classes are closest.
    let response = app
        .get(&format!("/v1/jobs/{embed}/outputs/probabilities.npy"))
        .await;
    let (_, classes, probabilities) = read_f32_matrix(&response.bytes().await.unwrap()).unwrap();
    let margin = |row: &[f32]| {
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        sorted[0] - sorted[1]
    };
    let mut expected: Vec<(u64, f32)> = (0..24u64)
        .filter(|i| !labelled.contains(i))
        .map(|i| {
            let i_row = i as usize * classes;
            (i, margin(&probabilities[i_row..i_row + classes]))
        })
        .collect();
    expected.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let selection: Value =
        select(json!({"budget": 3, "model_id": classifier, "strategy": "uncertainty"}))
            .await
            .json()
            .await
            .unwrap();
    let chosen = ids(&selection);
    let expected: Vec<u64> = expected.iter().take(3).map(|(i, _)| *i).collect();
    assert_eq!(chosen, expected);

    // A budget larger than what is left takes every unlabelled image.
    let selection: Value = select(json!({"budget": 100, "model_id": classifier}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&selection).len(), 18);

    // Bad requests are named.
    for (body, field) in [
        (json!({"budget": 0, "model_id": classifier}), "budget"),
        (
            json!({"budget": 5, "model_id": classifier, "strategy": "random"}),
            "strategy",
        ),
    ] {
        let problem = assert_problem(select(body).await, 422).await;
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    let pretrain = app
        .create_job_id(json!({"kind": "pretrain", "dataset_id": id,
            "config": {"backbone": "convnet", "image_size": 32, "max_steps": 1, "batch_size": 8}}))
        .await;
    let encoder = app.run_until_succeeded(&pretrain).await["model_id"]
        .as_str()
        .unwrap()
        .to_string();
    let response =
        select(json!({"budget": 5, "model_id": encoder, "strategy": "uncertainty"})).await;
    let problem = assert_problem(response, 422).await;
    assert_eq!(problem["errors"][0]["field"], "model_id");

    // Another tenant sees nothing.
    let other = app.with_key(&app.create_key("other").await);
    let response = other
        .post_json(
            &format!("/v1/datasets/{id}/selections"),
            &json!({"budget": 5, "model_id": classifier}),
        )
        .await;
    assert_problem(response, 404).await;
    let response = other
        .get(&format!(
            "/v1/datasets/{id}/selections/{}",
            selection["id"].as_str().unwrap()
        ))
        .await;
    assert_problem(response, 404).await;
    app.stop().await;
}
