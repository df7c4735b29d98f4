//! Uploading datasets: the archive formats and ImageFolder labels, every
//! bad input getting its problem+json answer without losing what is stored,
//! and uploads cut short (past their deadline, or by a client that goes
//! away) leaving no file behind.

use std::time::{Duration, Instant};

use crate::common::*;
use rand::SeedableRng;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_zip_tar_gz_and_multipart_archives_with_imagefolder_labels() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;

    // A tar.gz made from one folder: the wrapper is looked through.
    let mut entries: Vec<(String, Vec<u8>)> = labelled_entries(3, 5)
        .into_iter()
        .map(|(path, bytes)| (format!("mydata/{path}"), bytes))
        .collect();
    entries.push(("mydata/disc/notes.txt".into(), b"not an image".to_vec()));
    entries.push(("mydata/../escape.png".into(), entries[0].1.clone()));
    entries.push((
        "mydata/vertical/truncated.png".into(),
        entries[0].1[..40].to_vec(),
    ));
    let response = app
        .upload_raw(
            tar_gz_archive(&entries),
            "application/gzip",
            Some("folders"),
        )
        .await;
    assert_eq!(response.status(), 201);
    assert!(response.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/v1/datasets/"));
    let dataset: Value = response.json().await.unwrap();
    assert_eq!(dataset["name"], "folders");
    assert_eq!(dataset["num_images"], 9);
    assert_eq!(dataset["classes"], json!(CLASSES));
    assert_eq!(
        dataset["class_counts"],
        json!({"disc": 3, "horizontal": 3, "vertical": 3})
    );
    assert_eq!(dataset["skipped_count"], 3);
    let reasons: Vec<String> = dataset["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}: {}",
                s["path"].as_str().unwrap(),
                s["reason"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("notes.txt") && r.contains("not a recognised image")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("escape.png") && r.contains("unsafe path")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("truncated.png")),
        "{reasons:?}"
    );
    assert!(
        !app.data_dir.join("escape.png").exists()
            && !app.data_dir.join("datasets/escape.png").exists()
    );

    // Images at the root of a zip make an unlabelled dataset; grey images make one channel.
    let grey = {
        let img = image::DynamicImage::ImageLuma8(image::ImageBuffer::from_fn(20, 20, |x, _| {
            image::Luma([x as u8 * 10])
        }));
        png(&img)
    };
    let unlabelled = zip_archive(&[
        ("a.png".into(), grey.clone()),
        ("b.png".into(), grey.clone()),
    ]);
    let dataset = app.upload_zip(unlabelled).await;
    assert_eq!(dataset["labeled"], false);
    assert_eq!(dataset["classes"], json!([]));
    assert_eq!(dataset["channels"], 1);
    assert_eq!(dataset["median_side"], 20);

    // Multipart with a file part; the file name names the dataset.
    let part =
        reqwest::multipart::Part::bytes(zip_archive(&labelled_entries(2, 6))).file_name("pets.zip");
    let response = app
        .client
        .post(app.url("/v1/datasets"))
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let pets: Value = response.json().await.unwrap();
    assert_eq!(pets["name"], "pets");
    assert_eq!(pets["num_images"], 6);

    // Listing is newest first; reading and deleting by id.
    let list = app.get_json("/v1/datasets").await;
    let names: Vec<&str> = list["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pets", "shapes", "folders"]);
    let id = pets["id"].as_str().unwrap();
    assert_eq!(
        app.get_json(&format!("/v1/datasets/{id}")).await["num_images"],
        6
    );
    assert_eq!(
        app.delete(&format!("/v1/datasets/{id}")).await.status(),
        204
    );
    assert_problem(app.get(&format!("/v1/datasets/{id}")).await, 404).await;
    assert_problem(app.delete(&format!("/v1/datasets/{id}")).await, 404).await;
    assert!(!app.data_dir.join(format!("datasets/{id}")).exists());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_get_clear_errors_and_lose_nothing() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        max_upload_bytes: Some(200_000),
        max_uncompressed_bytes: Some(1_000_000),
        max_archive_entries: Some(50),
        ..Default::default()
    })
    .await;
    let kept = app.upload_zip(zip_archive(&labelled_entries(2, 7))).await;

    // Not an archive, whatever the content type says.
    assert_problem(
        app.upload_raw(b"hello there, not a zip".to_vec(), "application/zip", None)
            .await,
        415,
    )
    .await;
    // A content type that is not an archive's.
    let problem = assert_problem(
        app.upload_raw(zip_archive(&labelled_entries(1, 1)), "text/plain", None)
            .await,
        415,
    )
    .await;
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("application/zip"));
    // No body.
    assert_problem(
        app.upload_raw(Vec::new(), "application/zip", None).await,
        400,
    )
    .await;
    // An archive without one decodable image.
    let problem = assert_problem(
        app.upload_raw(
            zip_archive(&[("readme.txt".into(), b"words".to_vec())]),
            "application/zip",
            None,
        )
        .await,
        422,
    )
    .await;
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("no decodable image"));
    // Over the upload size.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let noise: Vec<u8> = (0..300_000).map(|_| rand::Rng::gen(&mut rng)).collect();
    assert_problem(
        app.upload_raw(
            zip_archive(&[("x.bin".into(), noise)]),
            "application/zip",
            None,
        )
        .await,
        413,
    )
    .await;
    // A zip bomb: a small archive that expands past the limit.
    let bomb = zip_archive(&[("zeros.png".into(), vec![0u8; 5_000_000])]);
    assert!(bomb.len() < 200_000);
    let problem = assert_problem(app.upload_raw(bomb, "application/zip", None).await, 413).await;
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("expands to more than"));
    // Too many entries.
    let many: Vec<(String, Vec<u8>)> = (0..60).map(|i| (format!("e{i}.txt"), Vec::new())).collect();
    assert_problem(
        app.upload_raw(zip_archive(&many), "application/zip", None)
            .await,
        413,
    )
    .await;
    // A bad name and unknown query parameters.
    assert_problem(
        app.upload_raw(
            zip_archive(&labelled_entries(1, 1)),
            "application/zip",
            Some("   "),
        )
        .await,
        422,
    )
    .await;
    // Ids that are not UUIDs, and ids that do not exist.
    assert_problem(app.get("/v1/datasets/not-a-uuid").await, 400).await;
    assert_problem(
        app.get(&format!("/v1/datasets/{}", uuid::Uuid::now_v7()))
            .await,
        404,
    )
    .await;
    assert_problem(app.get("/v1/nowhere").await, 404).await;

    // Nothing stored was lost, nothing half-ingested was kept.
    let list = app.get_json("/v1/datasets").await;
    let ids: Vec<&str> = list["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [kept["id"].as_str().unwrap()]);
    let stored = std::fs::read_dir(app.data_dir.join("datasets"))
        .unwrap()
        .count();
    assert_eq!(stored, 1);
    let uploads = std::fs::read_dir(app.data_dir.join("uploads"))
        .unwrap()
        .count();
    assert_eq!(uploads, 0, "partial uploads are removed");
    app.stop().await;
}

/// An archive whose ingestion takes several seconds, well past a 1-s
/// deadline: 600 images of 2,000×2,000 pixels, each decoded (12 MB of
/// pixels) and written with an fsync, in a zip of a few MB.
fn slow_archive() -> Vec<u8> {
    let large = png(&image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(
        2_000,
        2_000,
        |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 90]),
    )));
    let entries: Vec<(String, Vec<u8>)> = (0..600)
        .map(|i| (format!("{}/{i}.png", CLASSES[i % 3]), large.clone()))
        .collect();
    zip_archive(&entries)
}

/// Waits for whatever an upload started to wind down, then asserts that it
/// left no upload file and no dataset folder that no row names.
async fn assert_nothing_left_behind(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let recorded: Vec<String> = app.get_json("/v1/datasets").await["datasets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect();
        let uploads = upload_files(&app.data_dir);
        let unrecorded: Vec<String> = dataset_folders(&app.data_dir)
            .into_iter()
            .filter(|folder| !recorded.contains(folder))
            .collect();
        if uploads.is_empty() && unrecorded.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: uploads {uploads:?}, dataset folders without a row {unrecorded:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stalls_past_its_deadline_gets_504_and_leaves_no_file_behind() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        configure: Some(|config| config.upload_timeout_secs = 1),
        ..Default::default()
    })
    .await;
    // Half the archive, then nothing more.
    let archive = zip_archive(&labelled_entries(10, 1));
    let mut stream = start_raw_upload(&app, "application/zip", archive.len()).await;
    stream
        .write_all(&archive[..archive.len() / 2])
        .await
        .unwrap();
    let answer = read_answer_until(&mut stream, "PRETEXT_UPLOAD_TIMEOUT_SECS").await;
    assert!(
        answer.to_lowercase().starts_with("http/1.1 504"),
        "{answer}"
    );
    assert_nothing_left_behind(&app).await;

    // The whole archive, in time, but ingestion outlasts the deadline.
    let archive = slow_archive();
    let mut stream = start_raw_upload(&app, "application/zip", archive.len()).await;
    stream.write_all(&archive).await.unwrap();
    let answer = read_answer_until(&mut stream, "PRETEXT_UPLOAD_TIMEOUT_SECS").await;
    assert!(
        answer.to_lowercase().starts_with("http/1.1 504"),
        "{answer}"
    );
    assert_nothing_left_behind(&app).await;
    let list = app.get_json("/v1/datasets").await;
    assert_eq!(list["datasets"], json!([]), "a 504 stores nothing");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_client_goes_away_leaves_no_file_behind() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    // Gone mid-body, once the server is writing the upload to disk.
    let archive = zip_archive(&labelled_entries(10, 2));
    let mut stream = start_raw_upload(&app, "application/zip", archive.len()).await;
    stream
        .write_all(&archive[..archive.len() / 2])
        .await
        .unwrap();
    wait_until(
        "the upload reaches the disk",
        Duration::from_secs(10),
        || !upload_files(&app.data_dir).is_empty(),
    )
    .await;
    drop(stream);
    assert_nothing_left_behind(&app).await;

    // Gone with the whole body sent, once ingestion is writing images.
    let archive = slow_archive();
    let mut stream = start_raw_upload(&app, "application/zip", archive.len()).await;
    stream.write_all(&archive).await.unwrap();
    wait_until("ingestion starts", Duration::from_secs(10), || {
        !dataset_folders(&app.data_dir).is_empty()
    })
    .await;
    drop(stream);
    assert_nothing_left_behind(&app).await;

    // Uploads that stay go on working.
    app.upload_zip(zip_archive(&labelled_entries(2, 3))).await;
    assert_nothing_left_behind(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_sweeps_old_upload_files_and_old_dataset_folders_without_a_row() {
    let (database_url, data_dir) = fresh_environment();
    let options = TestOptions {
        workers: 0,
        environment: Some((database_url.clone(), data_dir.clone())),
        ..Default::default()
    };
    // What a process that stopped mid-upload two hours ago left behind, and
    // what one uploading now (sharing the storage) is writing.
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    let old_id = |offset: u32| {
        let secs = two_hours_ago
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, offset))
    };
    let folder = |id: uuid::Uuid| data_dir.join(format!("datasets/{id}"));
    for sub in ["uploads", "datasets"] {
        std::fs::create_dir_all(data_dir.join(sub)).unwrap();
    }
    let (old_upload, new_upload) = (
        data_dir.join("uploads/old.part"),
        data_dir.join("uploads/new.part"),
    );
    for path in [&old_upload, &new_upload] {
        std::fs::write(path, b"half an archive").unwrap();
    }
    std::fs::File::options()
        .write(true)
        .open(&old_upload)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    let (old_orphan, new_orphan) = (old_id(0), uuid::Uuid::now_v7());
    for id in [old_orphan, new_orphan] {
        std::fs::create_dir_all(folder(id).join("images")).unwrap();
    }

    // A first start: the old upload file goes; with no dataset recorded at
    // all, no folder is taken for an orphan.
    let app = spawn_app_with(options.clone()).await;
    assert!(
        !old_upload.exists(),
        "an upload file older than the upload deadline is removed"
    );
    assert!(
        new_upload.exists(),
        "a fresh upload file may be another process's"
    );
    assert!(folder(old_orphan).exists() && folder(new_orphan).exists());
    let kept = app.upload_zip(zip_archive(&labelled_entries(2, 4))).await;
    let kept = kept["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap();
    // An old dataset that has its row.
    let recorded = old_id(1);
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    sqlx::query(
        "insert into datasets (id, name, num_images, labeled, channels, classes, class_counts,
                               skipped, skipped_count, bytes, median_side, tenant_id)
         select $1, 'old', num_images, labeled, channels, classes, class_counts, skipped,
                skipped_count, bytes, median_side, tenant_id
         from datasets where id = $2",
    )
    .bind(recorded)
    .bind(kept)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    std::fs::create_dir_all(folder(recorded).join("images")).unwrap();
    app.stop().await;

    // A second start: the old folder without a row goes, nothing else.
    let app = spawn_app_with(options).await;
    assert!(
        !folder(old_orphan).exists(),
        "an old folder without a row is removed"
    );
    for id in [new_orphan, recorded, kept] {
        assert!(folder(id).exists(), "{id} is kept");
    }
    assert!(new_upload.exists());
    let sample = app.get(&format!("/v1/datasets/{kept}/samples/0")).await;
    assert_eq!(sample.status(), 200);
    app.stop().await;
    remove_environment(&database_url, &data_dir).await;
}
