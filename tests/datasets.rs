//! Uploading datasets: the archive formats and ImageFolder labels, and every
//! bad input getting its problem+json answer without losing what is stored.

mod common;

use common::*;
use rand::SeedableRng;
use serde_json::{json, Value};

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
