//! The user's whole path over HTTP: upload an archive, pretrain with the
//! jigsaw task, fine-tune the encoder on labels, classify and embed; and the
//! weights of a resnet18 load into torchvision.

use std::time::Duration;

use crate::common::*;
use rand::SeedableRng;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_an_archive_then_pretrains_then_finetunes_then_classifies() {
    let app = spawn_app().await;

    let dataset = app.upload_zip(zip_archive(&labelled_entries(30, 1))).await;
    assert_eq!(dataset["num_images"], 90);
    assert_eq!(dataset["labeled"], true);
    assert_eq!(dataset["channels"], 3);
    assert_eq!(dataset["classes"], json!(CLASSES));
    assert_eq!(dataset["class_counts"]["disc"], 30);
    let dataset_id = dataset["id"].as_str().unwrap().to_string();

    // Pretrain.
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset_id, "config": quick_pretrain_config()}))
        .await;
    assert_eq!(job["state"], "queued");
    assert_eq!(job["config"]["grid"], 3, "defaults are filled in: {job}");
    // 32-px images: the puzzle is reassembled, its cells whole.
    assert_eq!(job["config"]["assembly"], "image");
    assert_eq!(job["config"]["tile_size"], 10);
    assert_eq!(job["config"]["ordered_fraction"], 0.25);
    let job = app
        .wait_for_success(job["id"].as_str().unwrap(), Duration::from_secs(180))
        .await;
    assert_eq!(job["progress"]["step"], job["progress"]["steps"]);
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["device"], "cpu");
    let encoder_id = job["model_id"].as_str().unwrap().to_string();
    let metrics = app
        .get_json(&format!(
            "/v1/jobs/{}/metrics?name=loss",
            job["id"].as_str().unwrap()
        ))
        .await;
    let points = metrics["points"].as_array().unwrap();
    assert!(!points.is_empty());
    assert!(points
        .iter()
        .all(|p| p["name"] == "loss" && p["value"].as_f64().unwrap().is_finite()));

    let encoder = app.get_json(&format!("/v1/models/{encoder_id}")).await;
    assert_eq!(encoder["kind"], "encoder");
    assert_eq!(encoder["pretext"], "jigsaw");
    assert_eq!(encoder["embedding_dim"], 256);
    assert_eq!(encoder["input"]["image_size"], 32);
    assert_eq!(
        encoder["pretext_config"]["permutations"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    assert_eq!(encoder["pretext_config"]["assembly"], "image");

    // An encoder has no classes.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let probe = png(&shape_image("disc", &mut rng));
    let response = app
        .post_image(&encoder_id, "classify", "", probe.clone())
        .await;
    let problem = assert_problem(response, 409).await;
    assert!(problem["detail"].as_str().unwrap().contains("fine-tune"));

    // Fine-tune the encoder's trunk on the labels (fine-tuning named: auto's
    // cross-validation, six extra fits, is tested in `transfer`).
    let job = app
        .create_job(json!({
            "kind": "finetune",
            "dataset_id": dataset_id,
            "base_model_id": encoder_id,
            "config": {"transfer": "fine_tune", "epochs": 15, "min_steps": 300, "batch_size": 16, "learning_rate": 0.003, "val_fraction": 0.2}
        }))
        .await;
    assert_eq!(
        job["config"]["backbone"], "convnet",
        "the base's backbone is the default"
    );
    assert_eq!(job["config"]["image_size"], 32);
    let job = app
        .wait_for_success(job["id"].as_str().unwrap(), Duration::from_secs(180))
        .await;
    let classifier_id = job["model_id"].as_str().unwrap().to_string();
    let classifier = app.get_json(&format!("/v1/models/{classifier_id}")).await;
    assert_eq!(classifier["kind"], "classifier");
    assert_eq!(classifier["base_model_id"], encoder_id);
    assert_eq!(classifier["classes"], json!(CLASSES));
    assert!(
        classifier["metrics"]["val_accuracy"].as_f64().is_some(),
        "{classifier}"
    );

    // Each model describes itself, beside its weights.
    let description = &classifier["description"];
    assert_eq!(description["id"], classifier_id.as_str());
    assert_eq!(description["kind"], "classifier");
    assert_eq!(description["backbone"], "convnet");
    assert_eq!(description["input"], classifier["input"]);
    assert_eq!(description["classes"], json!(CLASSES));
    assert_eq!(description["pretext"], "jigsaw", "the base's task");
    assert_eq!(description["parent_model_id"], encoder_id.as_str());
    assert_eq!(description["dataset_id"], dataset_id.as_str());
    assert_eq!(description["job"]["kind"], "finetune");
    assert_eq!(description["job"]["config"], job["config"]);
    assert_eq!(description["metrics"], classifier["metrics"]);
    assert_eq!(description["tch_version"], "0.24.0");
    assert!(description["libtorch_version"]
        .as_str()
        .unwrap()
        .starts_with("2.11.0"));
    let hash = description["dataset_hash"].as_str().unwrap();
    assert!(hash.starts_with("sha256:") && hash.len() == 71, "{hash}");
    let encoder = app.get_json(&format!("/v1/models/{encoder_id}")).await;
    assert_eq!(encoder["description"]["dataset_hash"], hash, "same dataset");
    assert_eq!(encoder["description"]["job"]["config"]["grid"], 3);
    assert_eq!(
        encoder["description"]["pretext_config"],
        encoder["pretext_config"]
    );
    let response = app
        .get(&format!("/v1/models/{classifier_id}/model.json"))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-disposition"],
        format!("attachment; filename=\"{classifier_id}.json\"").as_str()
    );
    let downloaded: Value = response.json().await.unwrap();
    assert_eq!(&downloaded, description);
    let on_disk = app
        .data_dir
        .join("models")
        .join(&classifier_id)
        .join("model.json");
    let stored: Value = serde_json::from_slice(&std::fs::read(&on_disk).unwrap()).unwrap();
    assert_eq!(&stored, description);

    // Classify fresh images of each class, several per request.
    let mut images = Vec::new();
    let mut truth = Vec::new();
    for class in CLASSES {
        for _ in 0..4 {
            images.push(png(&shape_image(class, &mut rng)));
            truth.push(class);
        }
    }
    let response = app
        .post_images(&classifier_id, "classify", "?top_k=2", images.clone())
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 12);
    let mut correct = 0;
    for (prediction, expected) in predictions.iter().zip(&truth) {
        let ranked = prediction.as_array().unwrap();
        assert_eq!(ranked.len(), 2);
        let (first, second) = (
            ranked[0]["score"].as_f64().unwrap(),
            ranked[1]["score"].as_f64().unwrap(),
        );
        assert!(
            (0.0..=1.0).contains(&first) && second <= first,
            "{prediction}"
        );
        correct += usize::from(ranked[0]["label"] == *expected);
    }
    // Chance is 4 of 12.
    assert!(
        correct >= 8,
        "only {correct} of 12 classified correctly: {body}"
    );

    // Serving reads the model's description: labels follow model.json ...
    let mut renamed = stored.clone();
    renamed["classes"] = json!(CLASSES.map(str::to_uppercase));
    std::fs::write(&on_disk, serde_json::to_vec(&renamed).unwrap()).unwrap();
    let top_label = |body: Value| {
        body["predictions"][0][0]["label"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let response = app
        .post_image(&classifier_id, "classify", "", images[0].clone())
        .await;
    let label = top_label(response.json().await.unwrap());
    assert!(CLASSES.map(str::to_uppercase).contains(&label), "{label}");
    // ... and a model stored without one is described from its record.
    std::fs::remove_file(&on_disk).unwrap();
    let response = app
        .post_image(&classifier_id, "classify", "", images[0].clone())
        .await;
    let label = top_label(response.json().await.unwrap());
    assert!(CLASSES.contains(&label.as_str()), "{label}");
    let described = app.get_json(&format!("/v1/models/{classifier_id}")).await;
    let fallback = &described["description"];
    assert_eq!(fallback["classes"], json!(CLASSES));
    assert_eq!(fallback["input"], classifier["input"]);
    assert_eq!(fallback["parent_model_id"], encoder_id.as_str());
    assert!(fallback["job"].is_null() && fallback["tch_version"].is_null());

    // Embeddings come back in input order: a batch equals its parts.
    let response = app
        .post_images(
            &encoder_id,
            "embed",
            "",
            vec![images[0].clone(), images[11].clone()],
        )
        .await;
    assert_eq!(response.status(), 200);
    let batch: Value = response.json().await.unwrap();
    assert_eq!(batch["dim"], 256);
    let rows = batch["embeddings"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let single: Value = app
        .post_image(&encoder_id, "embed", "", images[11].clone())
        .await
        .json()
        .await
        .unwrap();
    let a: Vec<f64> = rows[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let b: Vec<f64> = single["embeddings"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(a.len(), 256);
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4));
    let c: Vec<f64> = rows[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(
        a.iter().zip(&c).any(|(x, y)| (x - y).abs() > 1e-3),
        "different images embed differently"
    );

    // Bodies that are not images, unknown models.
    let response = app
        .post_image(&classifier_id, "classify", "", b"not a png at all".to_vec())
        .await;
    let problem = assert_problem(response, 422).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("image 0"),
        "{problem}"
    );
    let response = app
        .client
        .post(app.url(&format!("/v1/models/{classifier_id}/classify")))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_problem(response, 415).await;
    assert_problem(
        app.post_image(&classifier_id, "classify", "", Vec::new())
            .await,
        400,
    )
    .await;
    assert_problem(
        app.post_image(&classifier_id, "classify", "?top_k=0", images[0].clone())
            .await,
        422,
    )
    .await;
    let missing = uuid::Uuid::now_v7().to_string();
    assert_problem(
        app.post_image(&missing, "embed", "", images[0].clone())
            .await,
        404,
    )
    .await;

    // The lists show what was made, newest first.
    let models = app.get_json("/v1/models").await;
    let ids: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [classifier_id.as_str(), encoder_id.as_str()]);
    let classifiers = app.get_json("/v1/models?kind=classifier").await;
    assert_eq!(classifiers["models"].as_array().unwrap().len(), 1);

    // A deleted model is gone, files and all.
    assert_eq!(
        app.delete(&format!("/v1/models/{classifier_id}"))
            .await
            .status(),
        204
    );
    assert_problem(app.get(&format!("/v1/models/{classifier_id}")).await, 404).await;
    assert_problem(
        app.post_image(&classifier_id, "classify", "", images[0].clone())
            .await,
        404,
    )
    .await;
    assert!(!app
        .data_dir
        .join(format!("models/{classifier_id}"))
        .exists());
    app.stop().await;
}

async fn check_in_torchvision(app: &TestApp, model_id: &str, extra: &[&str]) {
    let response = app.get(&format!("/v1/models/{model_id}/weights")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let bytes = response.bytes().await.unwrap();
    let path = app.data_dir.join(format!("{model_id}.safetensors"));
    std::fs::write(&path, &bytes).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/load_in_torchvision.py");
    let output = std::process::Command::new(python())
        .arg(script)
        .arg(&path)
        .args(extra)
        .output()
        .expect("the project's python runs (make setup installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "torchvision refused the weights: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["unexpected_keys"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnet18_weights_load_into_torchvision() {
    let app = spawn_app().await;
    let dataset = app.upload_zip(zip_archive(&labelled_entries(4, 2))).await;
    let dataset_id = dataset["id"].as_str().unwrap();
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset_id,
            "config": {"backbone": "resnet18", "image_size": 48, "max_steps": 2, "batch_size": 4, "num_permutations": 4}}))
        .await;
    let job = app
        .wait_for_success(job["id"].as_str().unwrap(), Duration::from_secs(180))
        .await;
    let encoder_id = job["model_id"].as_str().unwrap().to_string();
    check_in_torchvision(&app, &encoder_id, &[]).await;

    let job = app
        .create_job(
            json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": encoder_id,
            "config": {"transfer": "fine_tune", "max_steps": 2, "batch_size": 4, "val_fraction": 0.0}}),
        )
        .await;
    let job = app
        .wait_for_success(job["id"].as_str().unwrap(), Duration::from_secs(180))
        .await;
    let classifier_id = job["model_id"].as_str().unwrap();
    check_in_torchvision(&app, classifier_id, &["--num-classes", "3"]).await;
    app.stop().await;
}
