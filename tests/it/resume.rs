//! Resuming a training loop from its checkpoint: a job stopped and resumed,
//! as often as it may be, ends with the weights of one that never stopped.
//!
//! The loops run in this process, on the CPU, on a tiny generated dataset.
//! LibTorch's random generators are global to the process, so each test of
//! this file runs alone in a process of its own.

use crate::common::in_own_process;
use std::collections::HashMap;
use std::path::Path;

use pretext::data::manifest::{Manifest, ManifestEntry};
use pretext::jobs::config::{DefaultsFrom, PretrainConfig, PretrainConfigRequest};
use pretext::ml::pretrain::run_pretrain;
use pretext::ml::training::{StopReason, StopSignal, TrainingContext, TrainingOutcome};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tch::{Device, Tensor};

/// An unlabelled dataset of `count` 32-pixel images of coloured blocks.
fn tiny_dataset(count: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("images")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut entries = Vec::new();
    for i in 0..count {
        let colours: Vec<[u8; 3]> = (0..16).map(|_| rng.gen()).collect();
        let image = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb(colours[(y / 8 * 4 + x / 8) as usize])
        });
        let file = format!("images/{i:06}.png");
        image.save(dir.path().join(&file)).unwrap();
        entries.push(ManifestEntry {
            file: file.clone(),
            label: None,
            source: file,
        });
    }
    Manifest {
        classes: Vec::new(),
        entries,
    }
    .write(dir.path())
    .unwrap();
    dir
}

/// A jigsaw job of 3 epochs of 3 steps on 12 images, its puzzles as
/// `assembly` says (the tile network's head has dropout).
fn jigsaw_config(assembly: &str) -> PretrainConfig {
    serde_json::from_value::<PretrainConfigRequest>(json!({
        "backbone": "convnet",
        "image_size": 32,
        "epochs": 3,
        "batch_size": 4,
        "grid": 2,
        "num_permutations": 10,
        "assembly": assembly,
        "seed": 7,
        "checkpoint_interval_secs": 3600
    }))
    .unwrap()
    .resolve(DefaultsFrom {
        median_side: 32,
        base: None,
    })
    .unwrap()
}

/// Runs the job kept in `job_dir` once: to its end, or, with `release`,
/// until the first step has been checkpointed.
fn run_once(
    config: &PretrainConfig,
    dataset: &Path,
    job_dir: &Path,
    release: bool,
) -> TrainingOutcome {
    let (events, _received) = tokio::sync::mpsc::unbounded_channel();
    let stop = StopSignal::default();
    if release {
        stop.request(StopReason::Release);
    }
    let ctx = TrainingContext {
        job_id: uuid::Uuid::nil(),
        device: Device::Cpu,
        job_dir: job_dir.to_path_buf(),
        model_weights: job_dir.join("model.safetensors"),
        stop,
        events,
        max_image_pixels: u64::MAX,
    };
    run_pretrain(&ctx, config, dataset, 3, None).unwrap()
}

fn read_weights(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn a_pretraining_job_released_after_every_step_ends_with_the_weights_of_one_never_stopped() {
    if !in_own_process("resume::a_pretraining_job_released_after_every_step_ends_with_the_weights_of_one_never_stopped") {
        return;
    }
    assert_resumes_exactly(&jigsaw_config("tiles"));
}

#[test]
fn a_reassembled_jigsaw_job_resumes_exactly_too() {
    if !in_own_process("resume::a_reassembled_jigsaw_job_resumes_exactly_too") {
        return;
    }
    assert_resumes_exactly(&jigsaw_config("image"));
}

/// Runs `config` straight through, then again released after every step
/// and resumed, and checks both end with the same weights.
fn assert_resumes_exactly(config: &PretrainConfig) {
    // The result does not depend on it, and on a shared CPU one thread
    // does not wait for others that are busy elsewhere.
    tch::set_num_threads(1);
    let dataset = tiny_dataset(12);

    let straight = tempfile::tempdir().unwrap();
    let outcome = run_once(config, dataset.path(), straight.path(), false);
    assert!(
        matches!(outcome, TrainingOutcome::Finished(_)),
        "{outcome:?}"
    );

    let interrupted = tempfile::tempdir().unwrap();
    let mut releases = 0;
    loop {
        match run_once(config, dataset.path(), interrupted.path(), true) {
            TrainingOutcome::Stopped(StopReason::Release) => releases += 1,
            TrainingOutcome::Finished(_) => break,
            other => panic!("{other:?}"),
        }
        assert!(releases <= 9, "the job never finished");
    }
    assert_eq!(releases, 9, "each of the 9 steps ran in a run of its own");

    let expected = read_weights(&straight.path().join("model.safetensors"));
    let resumed = read_weights(&interrupted.path().join("model.safetensors"));
    assert_eq!(expected.len(), resumed.len());
    for (name, weight) in &expected {
        let difference = f64::try_from((weight - &resumed[name]).abs().max()).unwrap();
        assert!(
            difference < 1e-5,
            "`{name}` differs by {difference} after resuming"
        );
    }
}
