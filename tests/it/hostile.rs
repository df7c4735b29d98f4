//! Hostile input: archives and requests built to break the service. Each gets
//! its documented 4xx with a problem+json body, the server stays up, nothing
//! is written outside the storage root, and memory stays bounded.

use std::io::{Cursor, Write};
use std::path::Path;
use std::time::Duration;

use crate::common::processes::start_api;
use crate::common::*;
use rand::SeedableRng;
use serde_json::{json, Value};

/// A memory figure (`VmRSS:`, `VmHWM:`) of a process's `/proc/…/status`, in bytes.
fn status_bytes(status_path: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(status_path).expect("procfs is readable");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} is reported"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} is a number"));
    kib * 1024
}

/// Resident memory of this process (the server runs in it), in bytes.
fn resident_bytes() -> u64 {
    status_bytes("/proc/self/status", "VmRSS:")
}

/// A PNG whose header claims `width`×`height` pixels, with a tiny body.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    let mut deflated = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    deflated.write_all(&[0u8; 64]).unwrap();
    chunk(&mut out, b"IDAT", &deflated.finish().unwrap());
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A JPEG of a generated image.
fn jpeg(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let image = shape_image("disc", &mut rng);
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .unwrap();
    out
}

/// One tar entry: raw name, kind, contents and link target.
type RawTarEntry<'a> = (Vec<u8>, tar::EntryType, Vec<u8>, Option<&'a str>);

/// A tar archive whose entries are written with raw header fields, so names
/// may be unsafe or not UTF-8 and entries may be links.
fn raw_tar(entries: &[RawTarEntry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, bytes, link) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(*kind);
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        builder.append(&header, bytes.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Every path under `root`, none of them a symlink.
fn assert_no_links_under(root: &Path) {
    for entry in std::fs::read_dir(root).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        assert!(!kind.is_symlink(), "{} is a link", entry.path().display());
        if kind.is_dir() {
            assert_no_links_under(&entry.path());
        }
    }
}

fn skipped_reasons(dataset: &Value) -> Vec<(String, String)> {
    dataset["skipped"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|e| {
                    (
                        e["path"].as_str().unwrap_or_default().to_string(),
                        e["reason"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_archives_are_refused_or_defused_and_nothing_escapes_the_storage_root() {
    if !in_own_process(
        "hostile::hostile_archives_are_refused_or_defused_and_nothing_escapes_the_storage_root",
    ) {
        return;
    }
    let app = spawn_app_with(TestOptions {
        workers: 0,
        max_uncompressed_bytes: Some(50_000_000),
        ..Default::default()
    })
    .await;
    let kept = app.upload_zip(zip_archive(&labelled_entries(2, 7))).await;
    let rss_before = resident_bytes();
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let mut tried = 0;

    // A zip bomb: 200 MB of zeros in well under a megabyte.
    let bomb = zip_archive(&[("zeros.png".into(), vec![0u8; 200_000_000])]);
    assert!(bomb.len() < 1_000_000, "{}", bomb.len());
    let problem = assert_problem(app.upload_raw(bomb, "application/zip", None).await, 413).await;
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("PRETEXT_MAX_UNCOMPRESSED_BYTES"));
    tried += 1;

    // Escaping names in a zip: `..`, absolute paths, and a symlink entry.
    let escape_names = [
        format!("../{marker}-up.png"),
        format!("../../{marker}-up2.png"),
        format!("/tmp/{marker}-abs.png"),
        format!("cat/../../{marker}-mid.png"),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let image = png(&shape_image("disc", &mut rng));
    let mut entries: Vec<(String, Vec<u8>)> = escape_names
        .iter()
        .map(|n| (n.clone(), image.clone()))
        .collect();
    entries.extend(labelled_entries(1, 3));
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (name, bytes) in &entries {
        writer.start_file(name.as_str(), options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    writer
        .add_symlink(format!("disc/{marker}-link.png"), "/etc/passwd", options)
        .unwrap();
    let archive = writer.finish().unwrap().into_inner();
    let dataset = app.upload_zip(archive).await;
    assert_eq!(dataset["num_images"], 3, "{dataset:#}");
    let skipped = skipped_reasons(&dataset);
    for name in &escape_names {
        assert!(
            skipped
                .iter()
                .any(|(p, r)| p == name && r.contains("unsafe path")),
            "{name} not reported as unsafe: {skipped:?}"
        );
    }
    assert!(
        skipped.iter().any(|(p, _)| p.contains("-link.png")),
        "the symlink is not reported: {skipped:?}"
    );
    tried += 5;

    // The same in a tar, with a hard link and a symlink out of the root and a
    // name that is not UTF-8.
    let mut not_utf8 = b"disc/caf\xe9-".to_vec();
    not_utf8.extend_from_slice(marker.as_bytes());
    not_utf8.extend_from_slice(b".png");
    let tar = raw_tar(&[
        (
            format!("../{marker}-tar.png").into_bytes(),
            tar::EntryType::Regular,
            image.clone(),
            None,
        ),
        (
            format!("/{marker}-root.png").into_bytes(),
            tar::EntryType::Regular,
            image.clone(),
            None,
        ),
        (
            format!("disc/{marker}-sym.png").into_bytes(),
            tar::EntryType::Symlink,
            Vec::new(),
            Some("../../../../etc/passwd"),
        ),
        (
            format!("disc/{marker}-hard.png").into_bytes(),
            tar::EntryType::Link,
            Vec::new(),
            Some("/etc/passwd"),
        ),
        (not_utf8, tar::EntryType::Regular, image.clone(), None),
        (
            b"horizontal/ok.png".to_vec(),
            tar::EntryType::Regular,
            image.clone(),
            None,
        ),
    ]);
    let response = app.upload_raw(tar, "application/x-tar", None).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let dataset: Value = response.json().await.unwrap();
    assert_eq!(
        dataset["num_images"], 2,
        "only the safe regular files are kept (the non-UTF-8 name included): {dataset:#}"
    );
    assert_eq!(dataset["classes"], json!(["disc", "horizontal"]));
    tried += 5;

    // Deeply nested folders: the top folder names the class, as ImageFolder's.
    let deep = format!("{}deep.png", "nested/".repeat(200));
    let dataset = app
        .upload_zip(zip_archive(&[
            (format!("disc/{deep}"), image.clone()),
            ("vertical/one.png".into(), image.clone()),
        ]))
        .await;
    assert_eq!(dataset["num_images"], 2, "{dataset:#}");
    assert_eq!(dataset["classes"], json!(["disc", "vertical"]));
    tried += 1;

    // 100,000 empty entries: scanned within the limits, then refused for
    // holding no image.
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..100_000 {
        writer.start_file(format!("e/{i}"), stored).unwrap();
    }
    let empties = writer.finish().unwrap().into_inner();
    let problem = assert_problem(app.upload_raw(empties, "application/zip", None).await, 422).await;
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("no decodable image"));
    tried += 1;

    // Truncated PNG and JPEG, and a header claiming 100,000 × 100,000 pixels:
    // skipped with the reason; alone they leave nothing to keep.
    let full_png = image.clone();
    let full_jpeg = jpeg(5);
    let giant = png_claiming(100_000, 100_000);
    let dataset = app
        .upload_zip(zip_archive(&[
            (
                "disc/truncated.png".into(),
                full_png[..full_png.len() / 2].to_vec(),
            ),
            (
                "disc/truncated.jpg".into(),
                full_jpeg[..full_jpeg.len() / 2].to_vec(),
            ),
            ("disc/giant.png".into(), giant.clone()),
            ("disc/fine.png".into(), full_png.clone()),
            ("vertical/fine.jpg".into(), full_jpeg.clone()),
        ]))
        .await;
    assert_eq!(dataset["num_images"], 2, "{dataset:#}");
    let skipped = skipped_reasons(&dataset);
    assert!(
        skipped
            .iter()
            .any(|(p, r)| p == "disc/giant.png" && r.contains("100000×100000")),
        "{skipped:?}"
    );
    assert!(
        skipped.iter().any(|(p, _)| p == "disc/truncated.png"),
        "{skipped:?}"
    );
    assert!(
        skipped.iter().any(|(p, _)| p == "disc/truncated.jpg"),
        "{skipped:?}"
    );
    assert_problem(
        app.upload_raw(
            zip_archive(&[("a/giant.png".into(), giant.clone())]),
            "application/zip",
            None,
        )
        .await,
        422,
    )
    .await;
    tried += 4;

    // A truncated archive, a wrong content type and an empty body.
    let whole = zip_archive(&labelled_entries(3, 4));
    assert_problem(
        app.upload_raw(whole[..whole.len() / 2].to_vec(), "application/zip", None)
            .await,
        422,
    )
    .await;
    assert_problem(app.upload_raw(whole.clone(), "image/png", None).await, 415).await;
    assert_problem(
        app.upload_raw(Vec::new(), "application/zip", None).await,
        400,
    )
    .await;
    tried += 3;

    // Still up, nothing escaped, nothing linked, memory bounded.
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(
        app.get_json(&format!("/v1/datasets/{}", kept["id"].as_str().unwrap()))
            .await["num_images"],
        6
    );
    let data_parent = app.data_dir.parent().unwrap().to_path_buf();
    for dir in [data_parent.as_path(), Path::new("/"), Path::new("/tmp")] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains(&marker),
                "{name} escaped into {}",
                dir.display()
            );
        }
    }
    assert_no_links_under(&app.data_dir);
    let growth = resident_bytes().saturating_sub(rss_before);
    assert!(
        growth < 400 << 20,
        "resident memory grew by {} MiB",
        growth >> 20
    );
    eprintln!(
        "hostile archives tried: {tried}; resident memory growth {} MiB",
        growth >> 20
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_problem_json_and_the_server_stays_up() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let dataset = app.upload_zip(zip_archive(&labelled_entries(2, 7))).await;
    let dataset_id = dataset["id"].as_str().unwrap().to_string();
    let mut tried = 0;

    let raw_post = |path: &str, content_type: &str, body: Vec<u8>| {
        app.client
            .post(app.url(path))
            .header("content-type", content_type)
            .body(body)
    };
    // Wrong content type, empty body, malformed JSON.
    let pretrain = json!({"kind": "pretrain", "dataset_id": dataset_id}).to_string();
    assert_problem(
        raw_post("/v1/jobs", "text/plain", pretrain.clone().into_bytes())
            .send()
            .await
            .unwrap(),
        415,
    )
    .await;
    assert_problem(
        raw_post("/v1/jobs", "application/json", Vec::new())
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    for malformed in [
        "{\"kind\": ",
        "not json",
        "{\"kind\": \"pretrain\",}",
        "{\"kind\": \"pretrain\", \"dataset_id\": \"\u{0}\"",
    ] {
        assert_problem(
            raw_post(
                "/v1/jobs",
                "application/json",
                malformed.as_bytes().to_vec(),
            )
            .send()
            .await
            .unwrap(),
            400,
        )
        .await;
        tried += 1;
    }
    tried += 2;

    // Unknown fields, wrong types, negative and huge numbers: 422 naming the field.
    let cases = [
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "colour": "red"}),
            "colour",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"epochs": -1}}),
            "epochs",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"epochs": 1e12}}),
            "epochs",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"batch_size": 18446744073709551615u64}}),
            "batch_size",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"image_size": 100000}}),
            "image_size",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"learning_rate": -0.5}}),
            "learning_rate",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"epochs": "many"}}),
            "epochs",
        ),
        (
            json!({"kind": "pretrain", "dataset_id": dataset_id, "config": {"unknown_knob": 1}}),
            "unknown_knob",
        ),
        (json!({"kind": "pretrain", "dataset_id": 12}), "dataset_id"),
        (
            json!({"kind": "pretrain", "dataset_id": "not-a-uuid"}),
            "dataset_id",
        ),
    ];
    for (body, field) in cases {
        let problem = assert_problem(app.post_json("/v1/jobs", &body).await, 422).await;
        assert!(
            problem.to_string().contains(field),
            "{field} is not named for {body}: {problem}"
        );
        tried += 1;
    }

    // Ids that are not UUIDs, in every kind of path.
    for path in [
        "/v1/datasets/123",
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/v1/models/%00",
        "/v1/jobs/not-a-uuid/metrics",
    ] {
        assert_problem(app.get(path).await, 400).await;
        tried += 1;
    }
    // Query strings that are out of range or not numbers.
    for query in [
        "limit=-5",
        "limit=99999999999999999999",
        "limit=ten",
        "state=sleeping",
    ] {
        let problem = assert_problem(app.get(&format!("/v1/jobs?{query}")).await, 422).await;
        let field = query.split('=').next().unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains(field),
            "{query}: {problem}"
        );
        tried += 1;
    }

    // Inference on a missing model never decodes anything.
    let missing = uuid::Uuid::now_v7();
    assert_problem(
        app.post_image(
            &missing.to_string(),
            "classify",
            "",
            png_claiming(100_000, 100_000),
        )
        .await,
        404,
    )
    .await;
    tried += 1;

    assert_eq!(app.get("/healthz").await.status(), 200);
    let list = app.get_json("/v1/jobs").await;
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        0,
        "no job was created"
    );
    eprintln!("hostile requests tried: {tried}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_images_sent_for_inference_get_a_clear_4xx() {
    if !in_own_process("hostile::hostile_images_sent_for_inference_get_a_clear_4xx") {
        return;
    }
    let app = spawn_app().await;
    let dataset = app.upload_zip(zip_archive(&labelled_entries(6, 2))).await;
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": quick_pretrain_config()}))
        .await;
    let job = app
        .wait_for_success(job["id"].as_str().unwrap(), Duration::from_secs(240))
        .await;
    let model_id = job["model_id"].as_str().unwrap().to_string();
    let rss_before = resident_bytes();

    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let image = png(&shape_image("disc", &mut rng));
    let full_jpeg = jpeg(6);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a truncated PNG",
            image[..image.len() / 2].to_vec(),
            "image/png",
        ),
        (
            "a truncated JPEG",
            full_jpeg[..full_jpeg.len() / 3].to_vec(),
            "image/jpeg",
        ),
        (
            "a 100000×100000 header",
            png_claiming(100_000, 100_000),
            "image/png",
        ),
        ("text", b"definitely not an image".to_vec(), "image/png"),
        ("an empty body", Vec::new(), "image/png"),
    ];
    for (what, body, content_type) in cases {
        let response = app
            .client
            .post(app.url(&format!("/v1/models/{model_id}/embed")))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!((400..500).contains(&status), "{what} got {status}");
        assert_problem(response, status).await;
    }
    // A wrong content type.
    let response = app
        .client
        .post(app.url(&format!("/v1/models/{model_id}/embed")))
        .header("content-type", "application/json")
        .body(image.clone())
        .send()
        .await
        .unwrap();
    assert_problem(response, 415).await;

    // The model still answers, memory stayed bounded.
    let response = app.post_image(&model_id, "embed", "", image).await;
    assert_eq!(response.status(), 200);
    let growth = resident_bytes().saturating_sub(rss_before);
    assert!(
        growth < 400 << 20,
        "resident memory grew by {} MiB",
        growth >> 20
    );
    app.stop().await;
}

/// The peak resident memory (`VmHWM`) of process `pid`, in bytes.
fn peak_resident_bytes(pid: u32) -> u64 {
    status_bytes(&format!("/proc/{pid}/status"), "VmHWM:")
}

/// A grey PNG of one flat colour: a few KB on the wire whatever its size.
fn flat_grey_png(width: u32, height: u32) -> Vec<u8> {
    png(&image::DynamicImage::ImageLuma8(
        image::GrayImage::from_pixel(width, height, image::Luma([120])),
    ))
}

/// A flat RGB PNG.
fn flat_rgb_png(width: u32, height: u32) -> Vec<u8> {
    png(&image::DynamicImage::ImageRgb8(
        image::RgbImage::from_pixel(width, height, image::Rgb([10, 200, 90])),
    ))
}

/// Strips of 1×N and N×1 pixels, from the size of a 28-px model's row to
/// 40 Mpx (under the pixel limit): each must be refused, never resized.
const STRIPS: [(u32, u32); 6] = [
    (40_000_000, 1),
    (1, 40_000_000),
    (100_000, 1),
    (1, 100_000),
    (5_000, 3),
    (3, 5_000),
];

/// Decoded pixels the separate server may hold at once in this test.
const TEST_DECODE_BUDGET: u64 = 192 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elongated_images_and_heavy_uploads_leave_a_separate_server_alive_within_its_memory_bound()
{
    let (database_url, data_dir) = fresh_environment();
    let budget = TEST_DECODE_BUDGET.to_string();
    let server = start_api(
        &database_url,
        &data_dir,
        &["--decode-memory-bytes", &budget],
        &[],
    )
    .await;
    let pid = server.child.id().expect("the server runs");

    // Upload: the strips are skipped for their shape, elongated images within
    // the ratio (100:1 both ways) are kept and reach the training caches.
    let mut entries = labelled_entries(8, 21);
    for (i, (width, height)) in STRIPS.iter().enumerate() {
        entries.push((format!("disc/strip{i}.png"), flat_grey_png(*width, *height)));
    }
    entries.push(("disc/wide.png".into(), flat_rgb_png(3_200, 32)));
    entries.push(("vertical/tall.png".into(), flat_rgb_png(32, 3_200)));
    let dataset = server.upload_zip(zip_archive(&entries)).await;
    let skipped = skipped_reasons(&dataset);
    for i in 0..STRIPS.len() {
        let path = format!("disc/strip{i}.png");
        let reason = skipped
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, r)| r.as_str())
            .unwrap_or_else(|| panic!("{path} was not skipped: {dataset}"));
        assert!(reason.contains("100:1"), "{path}: {reason}");
    }
    assert_eq!(dataset["num_images"], 8 * CLASSES.len() + 2, "{dataset}");

    // Pretraining and fine-tuning build their caches from those images.
    let encoder = server
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": quick_pretrain_config()}))
        .await;
    let encoder = server
        .wait_for_success(encoder["id"].as_str().unwrap(), Duration::from_secs(300))
        .await;
    let classifier = server
        .create_job(json!({"kind": "finetune", "dataset_id": dataset["id"],
            "base_model_id": encoder["model_id"],
            "config": {"transfer": "fine_tune", "epochs": 1, "min_steps": 0, "batch_size": 8, "image_size": 48}}))
        .await;
    let classifier = server
        .wait_for_success(classifier["id"].as_str().unwrap(), Duration::from_secs(300))
        .await;
    let encoder_id = encoder["model_id"].as_str().unwrap().to_string();
    let classifier_id = classifier["model_id"].as_str().unwrap().to_string();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let probe = png(&shape_image("disc", &mut rng));
    for (model, route) in [(&encoder_id, "embed"), (&classifier_id, "classify")] {
        let response = server.post_image(model, route, "", probe.clone()).await;
        assert_eq!(response.status(), 200, "{route}");
    }

    // A dataset stored before strips were refused at upload holds one: the
    // jobs that decode it fail with the reason, and the server stays up.
    let older = server
        .upload_zip(zip_archive(&labelled_entries(3, 23)))
        .await;
    let older_id = older["id"].as_str().unwrap();
    let images = data_dir.join("datasets").join(older_id).join("images");
    let first = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    std::fs::write(&first, flat_grey_png(40_000_000, 1)).unwrap();
    for (kind, config) in [
        ("pretrain", quick_pretrain_config()),
        (
            "finetune",
            json!({"epochs": 1, "batch_size": 4, "backbone": "convnet", "image_size": 40}),
        ),
    ] {
        let job = server
            .create_job(json!({"kind": kind, "dataset_id": older_id, "config": config}))
            .await;
        let job = server
            .wait_for_job(
                job["id"].as_str().unwrap(),
                Duration::from_secs(120),
                |job| job["state"] == "failed" || job["state"] == "succeeded",
            )
            .await;
        assert_eq!(job["state"], "failed", "{kind}: {job}");
        let error = job["error"].as_str().unwrap();
        assert!(error.contains("100:1"), "{kind}: {error}");
    }

    let peak_before = peak_resident_bytes(pid);

    // Every strip, sent to either model, is a 422 that names the limit.
    for (width, height) in STRIPS {
        let body = flat_grey_png(width, height);
        for (model, route) in [(&encoder_id, "embed"), (&classifier_id, "classify")] {
            let response = server.post_image(model, route, "", body.clone()).await;
            let problem = assert_problem(response, 422).await;
            assert!(
                problem["detail"].as_str().unwrap().contains("100:1"),
                "{width}×{height} to {route}: {problem}"
            );
        }
    }

    // An archive entry of 480 MB (under the 512 MiB entry limit) is streamed
    // to disk, not read into memory, and skipped as no image.
    let mut heavy = labelled_entries(2, 22);
    heavy.push(("disc/heavy.png".into(), vec![0u8; 480_000_000]));
    let archive = tar_gz_archive(&heavy);
    let response = server.upload_raw(archive, "application/gzip", None).await;
    assert_eq!(response.status(), 201);
    let stored: Value = response.json().await.unwrap();
    assert!(
        skipped_reasons(&stored)
            .iter()
            .any(|(p, _)| p == "disc/heavy.png"),
        "{stored}"
    );

    // Many large images at once: every decode shares one budget.
    let large = flat_rgb_png(4_000, 4_000);
    let requests = (0..8).map(|_| {
        let images = vec![large.clone(); 3];
        server.post_images(&encoder_id, "embed", "", images)
    });
    for response in futures_util::future::join_all(requests).await {
        let status = response.status().as_u16();
        assert!(status == 200 || status == 503, "got {status}");
    }

    let response = server.get("/healthz").await;
    assert_eq!(response.status(), 200);
    let growth = peak_resident_bytes(pid).saturating_sub(peak_before);
    eprintln!(
        "separate server: peak resident memory {} MiB before the hostile load, grew by {} MiB (decode budget {} MiB)",
        peak_before >> 20,
        growth >> 20,
        TEST_DECODE_BUDGET >> 20
    );
    assert!(
        growth < TEST_DECODE_BUDGET + (192 << 20),
        "peak resident memory grew by {} MiB under hostile load",
        growth >> 20
    );
    server.stop().await;
    remove_environment(&database_url, &data_dir).await;
}
