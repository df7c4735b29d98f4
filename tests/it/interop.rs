//! PyTorch interop: a user downloads a trained resnet18 encoder and
//! classifier, rebuilds them with torchvision, and gets the service's
//! embeddings and class scores back to within 1e-4
//! (`scripts/reproduce_in_pytorch.py`).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::common::*;
use image::{DynamicImage, ImageBuffer, Rgb};
use rand::{Rng, SeedableRng};
use serde_json::json;

fn reproduce(app: &TestApp, model_id: &str, image: &Path, classify: bool) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reproduce_in_pytorch.py");
    let mut command = std::process::Command::new(python());
    command
        .arg(script)
        .args(["--url", &app.address, "--model", model_id])
        .env("PRETEXT_API_KEY", TEST_API_KEY)
        .arg(image);
    if classify {
        command.arg("--classify");
    }
    command
        .output()
        .expect("the project's python runs (make setup installs it)")
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A 48×48 image (the models' input size, so no resize is involved).
fn noise_image(seed: u64) -> DynamicImage {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(48, 48, |_, _| {
        Rgb([rng.gen(), rng.gen(), rng.gen()])
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchvision_reproduces_the_served_embeddings_and_scores() {
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
    let job = app
        .create_job(
            json!({"kind": "finetune", "dataset_id": dataset_id, "base_model_id": encoder_id,
            "config": {"transfer": "fine_tune", "max_steps": 2, "batch_size": 4, "val_fraction": 0.0}}),
        )
        .await;
    let job = app
        .wait_for_success(job["id"].as_str().unwrap(), Duration::from_secs(180))
        .await;
    let classifier_id = job["model_id"].as_str().unwrap().to_string();

    let image = app.data_dir.join("probe.png");
    std::fs::write(&image, png(&noise_image(5))).unwrap();

    let output = reproduce(&app, &classifier_id, &image, true);
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("embedding: max abs difference")
            && stdout.contains("scores: max abs difference"),
        "{stdout}"
    );

    let output = reproduce(&app, &encoder_id, &image, false);
    assert!(output.status.success(), "{}", describe(&output));

    // An encoder has no scores to compare.
    let output = reproduce(&app, &encoder_id, &image, true);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    app.stop().await;
}
