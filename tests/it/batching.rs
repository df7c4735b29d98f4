//! Dynamic batching of inference: concurrent requests for one model share
//! forward passes yet each gets exactly its own answer, a request larger
//! than a batch still runs, and a full queue refuses with 503.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use futures_util::future::join_all;
use rand::SeedableRng;
use serde_json::{json, Value};

/// A small (barely trained) convnet classifier of the shape classes.
async fn quick_classifier(app: &TestApp) -> String {
    let dataset = app.upload_zip(zip_archive(&labelled_entries(4, 3))).await;
    let dataset_id = dataset["id"].as_str().unwrap();
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset_id,
            "config": {"backbone": "convnet", "image_size": 32, "max_steps": 2, "batch_size": 4, "num_permutations": 4}}))
        .await;
    let job = app
        .wait_for_success(job["id"].as_str().unwrap(), Duration::from_secs(180))
        .await;
    let job = app
        .create_job(json!({"kind": "finetune", "dataset_id": dataset_id,
            "base_model_id": job["model_id"],
            "config": {"max_steps": 2, "batch_size": 4, "val_fraction": 0.0}}))
        .await;
    let job = app
        .wait_for_success(job["id"].as_str().unwrap(), Duration::from_secs(180))
        .await;
    job["model_id"].as_str().unwrap().to_string()
}

fn fresh_images(count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| png(&shape_image(CLASSES[i % CLASSES.len()], &mut rng)))
        .collect()
}

/// Count, sum and `le="8"` bucket of the batch-size histogram.
async fn batch_size_histogram(app: &TestApp) -> (f64, f64, f64) {
    let text = app.get("/metrics").await.text().await.unwrap();
    let sample = |prefix: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or(0.0)
    };
    (
        sample("pretext_inference_batch_size_count "),
        sample("pretext_inference_batch_size_sum "),
        sample("pretext_inference_batch_size_bucket{le=\"8\"} "),
    )
}

/// One image's ranked predictions as label → score.
fn scores(prediction: &Value) -> BTreeMap<String, f64> {
    prediction
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["label"].as_str().unwrap().to_string(),
                p["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// A batched convolution may sum in another order than a single image's.
fn assert_close(batched: &[f64], alone: &[f64], what: &str) {
    assert_eq!(batched.len(), alone.len(), "{what}");
    for (b, a) in batched.iter().zip(alone) {
        assert!((b - a).abs() < 1e-5, "{what}: {b} batched, {a} alone");
    }
}

fn assert_same_predictions(batched: &Value, alone: &Value, what: &str) {
    let (batched, alone) = (scores(batched), scores(alone));
    assert_eq!(
        batched.keys().collect::<Vec<_>>(),
        alone.keys().collect::<Vec<_>>(),
        "{what}"
    );
    assert_close(
        &batched.values().copied().collect::<Vec<_>>(),
        &alone.values().copied().collect::<Vec<_>>(),
        what,
    );
}

fn embedding(body: &Value, row: usize) -> Vec<f64> {
    body["embeddings"][row]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_batches_and_get_their_own_answers() {
    if !in_own_process("batching::concurrent_requests_share_batches_and_get_their_own_answers") {
        return;
    }
    let app = spawn_app_with(TestOptions {
        configure: Some(|config| {
            config.max_batch_size = 8;
            config.max_batch_delay_ms = 50;
        }),
        ..TestOptions::default()
    })
    .await;
    let model = quick_classifier(&app).await;
    let images = fresh_images(24, 7);

    // Each image alone, one request after another.
    let mut alone = Vec::new();
    let mut alone_embeddings = Vec::new();
    for image in &images {
        let response = app
            .post_image(&model, "classify", "?top_k=3", image.clone())
            .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        alone.push(body["predictions"][0].clone());
        let response = app.post_image(&model, "embed", "", image.clone()).await;
        assert_eq!(response.status(), 200);
        alone_embeddings.push(embedding(&response.json().await.unwrap(), 0));
    }

    // All at once: classify every image and embed every third.
    let (count_before, sum_before, small_before) = batch_size_histogram(&app).await;
    let classify = images
        .iter()
        .map(|image| app.post_image(&model, "classify", "?top_k=3", image.clone()));
    let embed = images
        .iter()
        .step_by(3)
        .map(|image| app.post_image(&model, "embed", "", image.clone()));
    let (classified, embedded) = tokio::join!(join_all(classify), join_all(embed));
    for (i, response) in classified.into_iter().enumerate() {
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["predictions"].as_array().unwrap().len(), 1);
        assert_same_predictions(&body["predictions"][0], &alone[i], &format!("image {i}"));
    }
    for (j, response) in embedded.into_iter().enumerate() {
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_close(
            &embedding(&body, 0),
            &alone_embeddings[3 * j],
            &format!("embedding of image {}", 3 * j),
        );
    }
    let requests = (images.len() + images.len().div_ceil(3)) as f64;
    let (count, sum, small) = batch_size_histogram(&app).await;
    assert_eq!(sum - sum_before, requests, "every image ran once");
    assert!(
        count - count_before < requests,
        "{requests} concurrent requests ran in {} forward passes: none merged",
        count - count_before
    );
    assert_eq!(
        small - small_before,
        count - count_before,
        "no batch holds more than max_batch_size = 8 images"
    );

    // A request larger than a batch runs whole, answers in order.
    let response = app
        .post_images(&model, "classify", "?top_k=3", images[..20].to_vec())
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 20);
    for (i, prediction) in predictions.iter().enumerate() {
        assert_same_predictions(prediction, &alone[i], &format!("image {i} of 20"));
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_inference_queue_answers_503_with_retry_after() {
    if !in_own_process("batching::a_full_inference_queue_answers_503_with_retry_after") {
        return;
    }
    let app = spawn_app_with(TestOptions {
        configure: Some(|config| {
            config.max_batch_size = 1;
            config.inference_queue_depth = 1;
        }),
        ..TestOptions::default()
    })
    .await;
    let model = quick_classifier(&app).await;
    let images = fresh_images(32, 11);
    let requests = (0..16).map(|_| app.post_images(&model, "classify", "", images.clone()));
    let mut answered = 0;
    let mut refused = 0;
    for response in join_all(requests).await {
        match response.status().as_u16() {
            200 => answered += 1,
            503 => {
                assert_eq!(response.headers()["retry-after"], "1");
                let problem = assert_problem(response, 503).await;
                assert!(problem["detail"].as_str().unwrap().contains("retry"));
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(answered >= 1, "at least the first request runs");
    assert!(
        refused >= 1,
        "16 concurrent requests with a queue of one: none was refused"
    );
    app.stop().await;
}
