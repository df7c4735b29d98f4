//! Faults while a job runs, with real processes: the database restarted
//! under a training job; the disk full while a checkpoint or an upload is
//! written; the object store cut off during an upload and a download; the
//! server stopped with SIGTERM while an upload arrives.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::{DynamicImage, RgbImage};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::postgres::OwnPostgres;
use crate::common::processes::{start_api, start_moto_or_skip, start_worker};
use crate::common::proxy::CuttableProxy;
use crate::common::{
    assert_problem, dataset_folders, fresh_environment, labelled_entries, png,
    quick_pretrain_config, read_answer_until, remove_environment, start_raw_upload, upload_files,
    zip_archive,
};

/// The steps at which a pretraining run of `steps` steps over epochs of
/// `per_epoch` steps reports its loss: every 10 steps and at each epoch's end.
fn reported_steps(steps: i64, per_epoch: i64) -> Vec<i64> {
    (1..=steps)
        .filter(|s| s % 10 == 0 || s % per_epoch == 0 || *s == steps)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_a_training_job_gives_503s_and_the_job_finishes_once_with_every_report(
) {
    let postgres = OwnPostgres::start();
    let database_url = format!("{}/pretext", postgres.url());
    let data_dir = std::env::temp_dir().join(format!(
        "pretext_test_faults_{}",
        uuid::Uuid::new_v4().simple()
    ));
    let api = start_api(&database_url, &data_dir, &["--workers", "0"], &[]).await;
    // 36 images in batches of 4: 9 steps per epoch.
    let dataset = api.upload_zip(zip_archive(&labelled_entries(12, 21))).await;
    // Long enough to outlast the outage with room to spare (about 20 steps/s here).
    let steps = 2000;
    let mut config = quick_pretrain_config();
    config["epochs"] = json!(1000);
    config["max_steps"] = json!(steps);
    config["batch_size"] = json!(4);
    let id = api
        .create_job_id(json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": config}))
        .await;
    // The lease outlasts the outage: the worker that holds the job keeps it.
    let worker = start_worker(&database_url, &data_dir, 60, &[]).await;
    api.wait_for_job(&id, Duration::from_secs(120), |j| {
        j["state"] == "running" && j["progress"]["checkpoint_step"].as_i64() >= Some(9)
    })
    .await;

    let outage = Instant::now();
    postgres.stop();
    for path in [format!("/v1/jobs/{id}"), "/readyz".to_string()] {
        let asked = Instant::now();
        let response = api.get(&path).await;
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let problem = assert_problem(response, 503).await;
        eprintln!("{path} during the outage: 503 in {:?}", asked.elapsed());
        assert_eq!(retry_after.as_deref(), Some("5"), "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("database is unreachable"),
            "{problem}"
        );
    }
    let running_during_outage = api.get(&format!("/v1/jobs/{id}")).await.status();
    assert_eq!(running_during_outage, 503);
    // Long enough that a heartbeat and some progress writes fail.
    tokio::time::sleep(Duration::from_secs(25).saturating_sub(outage.elapsed())).await;
    postgres.resume();
    eprintln!("the database was down for {:?}", outage.elapsed());

    let job = api.wait_for_success(&id, Duration::from_secs(600)).await;
    assert_eq!(job["attempts"], 1, "{job:#}");
    assert_eq!(job["progress"]["step"], steps, "{job:#}");
    assert_eq!(worker.claimed_jobs(), vec![id.clone()], "claimed once");
    let log = worker.log.lock().unwrap().clone();
    assert!(
        log.contains("the database is unreachable; progress not yet recorded"),
        "the outage reached the worker while it trained:\n{log}"
    );

    // Every loss report reached the database, once and in order.
    eprintln!(
        "the job ran from {} to {}",
        job["started_at"], job["finished_at"]
    );
    let recorded = api.metric_steps(&id, "loss").await;
    assert_eq!(recorded, reported_steps(steps, 9));
    let models: Value = api.get_json("/v1/models").await;
    assert_eq!(models["models"].as_array().unwrap().len(), 1, "{models:#}");

    tokio::join!(api.stop(), worker.stop());
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A tmpfs of a few MiB mounted on a fresh folder, for a data folder whose
/// disk fills up; unmounted on drop. Mounting needs root, as CI runs.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(mib: u64) -> SmallDisk {
        let dir = std::env::temp_dir().join(format!(
            "pretext_test_disk_{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("mount runs");
        assert!(
            output.status.success(),
            "mounting a {mib} MiB tmpfs failed (the disk-full tests need root): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        SmallDisk { dir }
    }

    /// Writes a file that takes every free byte but `spare`; returns its path.
    fn fill_leaving(&self, spare: u64) -> PathBuf {
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        file.set_len(written.saturating_sub(spare)).unwrap();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Every file under `dir` whose name marks a write not yet renamed into place.
fn temporary_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(temporary_files(&path));
        } else if path.to_string_lossy().ends_with(".tmp") {
            found.push(path);
        }
    }
    found
}

/// A PNG of random pixels: it does not compress.
fn noise_png(side: u32, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pixels: Vec<u8> = (0..side * side * 3).map(|_| rng.gen()).collect();
    png(&DynamicImage::ImageRgb8(
        RgbImage::from_raw(side, side, pixels).unwrap(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_to_a_full_disk_get_507_and_leave_no_file_while_stored_datasets_stay_whole() {
    let disk = SmallDisk::mount(12);
    let (database_url, _) = fresh_environment();
    let data_dir = disk.dir.join("data");
    let api = start_api(&database_url, &data_dir, &["--workers", "0"], &[]).await;
    let kept = api.upload_zip(zip_archive(&labelled_entries(6, 1))).await;

    let filler = disk.fill_leaving(3 << 19);

    // The upload itself does not fit in the 1.5 MiB left.
    let too_big = zip_archive(&[("noise/a.bin".to_string(), {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        (0..3 << 20).map(|_| rng.gen::<u8>()).collect()
    })]);
    let problem = assert_problem(api.upload_raw(too_big, "application/zip", None).await, 507).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("disk is full"),
        "{problem}"
    );

    // The upload fits, but not beside its images: ingestion runs out of space.
    let images: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("noise/{i}.png"), noise_png(300, i)))
        .collect();
    let archive = zip_archive(&images);
    assert!(
        archive.len() > 1 << 20 && archive.len() < 3 << 19,
        "{}",
        archive.len()
    );
    let problem = assert_problem(api.upload_raw(archive, "application/zip", None).await, 507).await;
    assert_eq!(
        problem["type"],
        "https://pretext.dev/problems/insufficient-storage"
    );

    assert!(
        upload_files(&data_dir).is_empty(),
        "{:?}",
        upload_files(&data_dir)
    );
    assert_eq!(
        dataset_folders(&data_dir),
        vec![kept["id"].as_str().unwrap().to_string()],
        "only the stored dataset's folder is left"
    );
    assert!(temporary_files(&data_dir).is_empty());
    let listed = api.get_json("/v1/datasets").await;
    assert_eq!(
        listed["datasets"].as_array().unwrap().len(),
        1,
        "{listed:#}"
    );
    for n in 0..kept["num_images"].as_i64().unwrap() {
        let image = api
            .get(&format!(
                "/v1/datasets/{}/images/{n}",
                kept["id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(image.status(), 200, "image {n} of the stored dataset");
    }
    // With space again, the same server takes uploads.
    std::fs::remove_file(filler).unwrap();
    let again = api.upload_zip(zip_archive(&labelled_entries(2, 2))).await;
    assert_eq!(again["num_images"], 6);
    api.stop().await;
    remove_environment(&database_url, &data_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_written_to_a_full_disk_fails_the_attempt_clearly_and_the_retry_resumes_from_the_last_one(
) {
    let disk = SmallDisk::mount(64);
    let (database_url, _) = fresh_environment();
    let data_dir = disk.dir.join("data");
    let api = start_api(&database_url, &data_dir, &["--workers", "0"], &[]).await;
    // 36 images in batches of 4: 9 steps per epoch, a checkpoint each epoch.
    let dataset = api.upload_zip(zip_archive(&labelled_entries(12, 21))).await;
    let steps = 300;
    let mut config = quick_pretrain_config();
    config["epochs"] = json!(1000);
    config["max_steps"] = json!(steps);
    config["batch_size"] = json!(4);
    let id = api
        .create_job_id(json!({"kind": "pretrain", "dataset_id": dataset["id"],
            "config": config, "max_attempts": 10}))
        .await;
    let backoff = [("PRETEXT_RETRY_BACKOFF_SECS".to_string(), "2".to_string())];
    let worker = start_worker(&database_url, &data_dir, 30, &backoff).await;
    api.wait_for_job(&id, Duration::from_secs(120), |j| {
        j["state"] == "running" && j["progress"]["checkpoint_step"].as_i64() >= Some(9)
    })
    .await;

    let filler = disk.fill_leaving(0);
    let checkpoint = data_dir
        .join("jobs")
        .join(&id)
        .join("checkpoint.safetensors");
    let failed = api
        .wait_for_job(&id, Duration::from_secs(120), |j| !j["error"].is_null())
        .await;
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("disk is full"), "{error}");
    assert!(error.contains("No space left on device"), "{error}");
    assert!(
        error.ends_with("attempt 1 of 10, the next in 2 s"),
        "{error}"
    );
    assert_eq!(
        failed["state"], "queued",
        "a full disk is retried: {failed:#}"
    );
    // The last checkpoint written before the disk filled is still whole.
    let saved = failed["progress"]["checkpoint_step"].as_i64().unwrap();
    assert!(saved >= 9, "{failed:#}");
    assert!(checkpoint.is_file(), "the earlier checkpoint is kept");
    assert!(
        temporary_files(&data_dir).is_empty(),
        "{:?}",
        temporary_files(&data_dir)
    );
    std::fs::remove_file(filler).unwrap();

    let done = api.wait_for_success(&id, Duration::from_secs(300)).await;
    assert_eq!(done["attempts"], 2, "{done:#}");
    assert_eq!(done["progress"]["step"], steps);
    // The retry started from the checkpoint: no step up to it trained twice.
    let before: Vec<i64> = api
        .metric_steps(&id, "loss")
        .await
        .into_iter()
        .filter(|&s| s <= saved)
        .collect();
    let mut unique = before.clone();
    unique.dedup();
    assert_eq!(before, unique, "steps up to the checkpoint trained once");
    assert_eq!(api.get("/healthz").await.status(), 200);
    tokio::join!(api.stop(), worker.stop());
    remove_environment(&database_url, &data_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_written_to_a_full_disk_leaves_no_partial_weights_and_the_retry_stores_it() {
    let disk = SmallDisk::mount(32);
    let (database_url, _) = fresh_environment();
    let data_dir = disk.dir.join("data");
    let api = start_api(&database_url, &data_dir, &["--workers", "0"], &[]).await;
    let dataset = api.upload_zip(zip_archive(&labelled_entries(12, 5))).await;
    // Eight steps, less than an epoch, and no checkpoint: the first file
    // the job writes is the model's weights.
    let mut config = quick_pretrain_config();
    config["max_steps"] = json!(8);
    config["batch_size"] = json!(4);
    config["checkpoint_interval_secs"] = json!(3600);
    let filler = disk.fill_leaving(0);
    let id = api
        .create_job_id(json!({"kind": "pretrain", "dataset_id": dataset["id"],
            "config": config, "max_attempts": 5}))
        .await;
    let backoff = [("PRETEXT_RETRY_BACKOFF_SECS".to_string(), "2".to_string())];
    let worker = start_worker(&database_url, &data_dir, 30, &backoff).await;
    let failed = api
        .wait_for_job(&id, Duration::from_secs(120), |j| !j["error"].is_null())
        .await;
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("disk is full"), "{error}");
    assert!(
        error.contains("/models/"),
        "the weights' write failed: {error}"
    );
    assert_eq!(failed["state"], "queued", "{failed:#}");
    assert!(temporary_files(&data_dir).is_empty());
    let models_dir = data_dir.join("models");
    let partial: Vec<_> = std::fs::read_dir(&models_dir)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|model| {
            std::fs::read_dir(model.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|file| file.path())
        .collect();
    assert!(
        partial.is_empty(),
        "no file of the failed model: {partial:?}"
    );
    assert_eq!(api.get_json("/v1/models").await["models"], json!([]));
    std::fs::remove_file(filler).unwrap();

    let done = api.wait_for_success(&id, Duration::from_secs(120)).await;
    assert_eq!(done["attempts"], 2, "{done:#}");
    let weights = api
        .get(&format!(
            "/v1/models/{}/weights",
            done["model_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(weights.status(), 200);
    assert!(!weights.bytes().await.unwrap().is_empty());
    tokio::join!(api.stop(), worker.stop());
    remove_environment(&database_url, &data_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_cut_off_is_retried_with_backoff_then_fails_clearly_and_nothing_half_written_is_served(
) {
    let Some(moto) = start_moto_or_skip("faults::an_object_store_cut_off_…").await else {
        return;
    };
    let bucket = "pretext-faults";
    moto.create_bucket(bucket).await;
    let proxy =
        CuttableProxy::start(moto.endpoint.trim_start_matches("http://").parse().unwrap()).await;
    let mut env: Vec<(String, String)> = moto
        .env()
        .into_iter()
        .filter(|(name, _)| name != "AWS_ENDPOINT_URL")
        .collect();
    for (name, value) in [
        ("AWS_ENDPOINT_URL", proxy.url()),
        ("PRETEXT_STORAGE_URL", format!("s3://{bucket}/cluster")),
        ("PRETEXT_OBJECT_STORE_RETRY_SECS", "4".to_string()),
        ("PRETEXT_RETRY_BACKOFF_SECS", "2".to_string()),
    ] {
        env.push((name.to_string(), value));
    }
    let (database_url, data_dir) = fresh_environment();
    let (api_dir, worker_dir) = (data_dir.join("api"), data_dir.join("worker"));
    let api = start_api(&database_url, &api_dir, &["--workers", "0"], &env).await;

    // Cut off during the upload for a second: the retries carry it through.
    proxy.cut();
    let upload = api.upload_raw(
        zip_archive(&labelled_entries(6, 9)),
        "application/zip",
        None,
    );
    let restore = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.restore();
    };
    let (response, ()) = tokio::join!(upload, restore);
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let stored: Value = api.get_json("/v1/datasets").await["datasets"][0].clone();
    let dataset_id = stored["id"].as_str().unwrap().to_string();
    assert!(moto
        .keys(bucket, "cluster/")
        .await
        .contains(&format!("cluster/datasets/{dataset_id}.tar")));

    // Cut off for longer than the retries last: a clear 503, nothing kept.
    proxy.cut();
    let asked = Instant::now();
    let response = api
        .upload_raw(
            zip_archive(&labelled_entries(3, 10)),
            "application/zip",
            None,
        )
        .await;
    let retry_after = response.headers().get("retry-after").cloned();
    let problem = assert_problem(response, 503).await;
    eprintln!("the upload failed after {:?}", asked.elapsed());
    assert!(asked.elapsed() >= Duration::from_secs(3), "retried first");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("object store is unreachable"),
        "{problem}"
    );
    assert_eq!(retry_after.unwrap(), "30");
    assert_eq!(dataset_folders(&api_dir), vec![dataset_id.clone()]);
    assert!(upload_files(&api_dir).is_empty());
    assert_eq!(
        api.get_json("/v1/datasets").await["datasets"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A worker on another machine cannot download the dataset: the attempt
    // fails clearly, no half-fetched file is left, and once the store is
    // back the job is retried and succeeds.
    let worker = start_worker(&database_url, &worker_dir, 30, &env).await;
    let mut config = quick_pretrain_config();
    config["max_steps"] = json!(6);
    let id = api
        .create_job_id(json!({"kind": "pretrain", "dataset_id": dataset_id,
            "config": config, "max_attempts": 10}))
        .await;
    let failed = api
        .wait_for_job(&id, Duration::from_secs(120), |j| !j["error"].is_null())
        .await;
    assert_eq!(failed["state"], "queued", "{failed:#}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("datasets/{dataset_id}.tar")),
        "{error}"
    );
    assert!(
        error.contains("after 10 retries") || error.contains("retry_timeout"),
        "{error}"
    );
    assert!(
        error.ends_with("attempt 1 of 10, the next in 2 s"),
        "{error}"
    );
    assert!(
        !worker_dir
            .join("datasets")
            .join(&dataset_id)
            .join("manifest.json")
            .exists(),
        "no half-fetched dataset"
    );
    assert!(
        temporary_files(&worker_dir).is_empty(),
        "{:?}",
        temporary_files(&worker_dir)
    );
    proxy.restore();
    let done = api.wait_for_success(&id, Duration::from_secs(300)).await;
    assert_eq!(done["attempts"], 2, "{done:#}");
    assert!(worker_dir
        .join("datasets")
        .join(&dataset_id)
        .join("manifest.json")
        .exists());
    tokio::join!(api.stop(), worker.stop());
    remove_environment(&database_url, &data_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_upload_drains_it_into_a_stored_dataset_that_the_next_start_serves() {
    use tokio::io::AsyncWriteExt;
    let (database_url, data_dir) = fresh_environment();
    let mut api = start_api(&database_url, &data_dir, &["--workers", "0"], &[]).await;
    let archive = zip_archive(&labelled_entries(8, 4));
    let (first, rest) = archive.split_at(archive.len() / 2);
    let mut stream = start_raw_upload(&api, "application/zip", archive.len()).await;
    stream.write_all(first).await.unwrap();
    // The head and half the body have arrived when the signal comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: no new connection is taken ...
    let refused = reqwest::Client::new()
        .get(format!("{}/healthz", api.address))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(refused.is_err(), "a draining server takes no new request");
    // ... and the upload under way is finished and answered.
    stream.write_all(rest).await.unwrap();
    let answer = read_answer_until(&mut stream, "\"num_images\":24").await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    drop(stream);
    let status = tokio::time::timeout(Duration::from_secs(30), api.child.wait())
        .await
        .expect("the server exits once drained")
        .unwrap();
    assert!(status.success(), "{status}");

    let api = start_api(&database_url, &data_dir, &["--workers", "0"], &[]).await;
    let datasets = api.get_json("/v1/datasets").await;
    let stored = &datasets["datasets"].as_array().unwrap()[..];
    assert_eq!(stored.len(), 1, "{datasets:#}");
    assert_eq!(stored[0]["num_images"], 24);
    let id = stored[0]["id"].as_str().unwrap();
    let image = api.get(&format!("/v1/datasets/{id}/images/23")).await;
    assert_eq!(image.status(), 200);
    assert!(upload_files(&data_dir).is_empty());
    api.stop().await;
    remove_environment(&database_url, &data_dir).await;
}
