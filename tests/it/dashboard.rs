//! The dashboard: the page and every file it loads are served with their
//! types, dataset samples are served for its thumbnails, and (with
//! `PRETEXT_BROWSER_TESTS=1`, as `make test` sets) headless Chromium follows a
//! job to the end on it and classifies an image through it, and maps a
//! dataset's embeddings and labels a selection of its images on it.

use std::collections::HashSet;
use std::io::Cursor;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use rand::SeedableRng;
use serde_json::json;

/// How long the browser script may take: two short training jobs on the CPU.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(600);

fn api_only() -> TestOptions {
    TestOptions {
        workers: 0,
        ..TestOptions::default()
    }
}

fn content_type(response: &reqwest::Response) -> String {
    response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Each occurrence of `prefix` in `text` up to the next double quote after it.
fn quoted_after<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    text.match_indices(prefix).filter_map(move |(start, _)| {
        let rest = &text[start..];
        rest[prefix.len()..]
            .find('"')
            .map(|end| &rest[..prefix.len() + end])
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_page_and_every_file_it_loads_with_its_type() {
    let app = spawn_app_with(api_only()).await;

    let page = app.get("/").await;
    assert_eq!(page.status(), 200);
    assert_eq!(content_type(&page), "text/html; charset=utf-8");
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        policy.contains("default-src 'none'") && policy.contains("script-src 'self'"),
        "{policy}"
    );
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/assets/app.js">"#));

    // Follow the page's references and the scripts' imports.
    let mut pending: Vec<String> = quoted_after(&html, "/assets/")
        .map(str::to_string)
        .collect();
    let mut served = HashSet::new();
    while let Some(path) = pending.pop() {
        if !served.insert(path.clone()) {
            continue;
        }
        let response = app.get(&path).await;
        assert_eq!(response.status(), 200, "{path}");
        let expected = match path.rsplit('.').next() {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            other => panic!("{path}: unexpected kind of asset {other:?}"),
        };
        assert_eq!(content_type(&response), expected, "{path}");
        let body = response.text().await.unwrap();
        assert!(!body.is_empty(), "{path}");
        if path.ends_with(".js") {
            for import in quoted_after(&body, "from \"./") {
                let import = &import["from \"./".len()..];
                pending.push(format!("/assets/{import}"));
            }
        }
    }
    for path in [
        "/assets/app.js",
        "/assets/api.js",
        "/assets/charts.js",
        "/assets/style.css",
    ] {
        assert!(served.contains(path), "{path} is never loaded: {served:?}");
    }

    let problem = assert_problem(app.get("/assets/missing.js").await, 404).await;
    assert!(problem["detail"].as_str().unwrap().contains("missing.js"));
    app.stop().await;
}

fn jpeg(image: &image::DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_first_sixteen_images_of_a_dataset_as_samples() {
    let app = spawn_app_with(api_only()).await;

    let entries = labelled_entries(6, 3);
    let dataset = app.upload_zip(zip_archive(&entries)).await;
    let id = dataset["id"].as_str().unwrap();
    for n in [0, 7, 15] {
        let response = app.get(&format!("/v1/datasets/{id}/samples/{n}")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(content_type(&response), "image/png");
        assert_eq!(
            response.bytes().await.unwrap().as_ref(),
            entries[n].1.as_slice(),
            "sample {n} is the {n}-th image of the archive, as stored"
        );
    }
    for n in ["16", "-1", "one"] {
        let problem = assert_problem(
            app.get(&format!("/v1/datasets/{id}/samples/{n}")).await,
            404,
        )
        .await;
        assert!(
            problem["detail"].as_str().unwrap().contains("0 to 15"),
            "{problem}"
        );
    }

    // A small unlabelled dataset: each sample has its own format's type.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let small = vec![
        ("a.png".to_string(), png(&shape_image("disc", &mut rng))),
        (
            "b.jpg".to_string(),
            jpeg(&shape_image("vertical", &mut rng)),
        ),
    ];
    let dataset = app.upload_zip(zip_archive(&small)).await;
    let small_id = dataset["id"].as_str().unwrap();
    let response = app.get(&format!("/v1/datasets/{small_id}/samples/1")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(content_type(&response), "image/jpeg");
    let problem = assert_problem(
        app.get(&format!("/v1/datasets/{small_id}/samples/2")).await,
        404,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("has 2 images"),
        "{problem}"
    );

    let unknown = uuid::Uuid::now_v7();
    assert_problem(
        app.get(&format!("/v1/datasets/{unknown}/samples/0")).await,
        404,
    )
    .await;
    assert_problem(app.get("/v1/datasets/not-a-uuid/samples/0").await, 400).await;
    assert_eq!(
        app.delete(&format!("/v1/datasets/{small_id}"))
            .await
            .status(),
        204
    );
    assert_problem(
        app.get(&format!("/v1/datasets/{small_id}/samples/0")).await,
        404,
    )
    .await;
    app.stop().await;
}

/// Where a browser script writes its screenshots, emptied; `None` (with a
/// note) unless `PRETEXT_BROWSER_TESTS=1`.
fn browser_test_dir(name: &str) -> Option<std::path::PathBuf> {
    if std::env::var("PRETEXT_BROWSER_TESTS").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set PRETEXT_BROWSER_TESTS=1 (as `make test` does) to drive the dashboard in Chromium"
        );
        return None;
    }
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "tests/browser/node_modules is missing: run `make browser-setup`"
    );
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    Some(out_dir)
}

/// Runs `tests/browser/<script>` against `app`, fails with its log unless it
/// passes, and checks that it saved each of `screenshots` in `out_dir`.
async fn run_browser_script(app: &TestApp, script: &str, out_dir: &Path, screenshots: &[&str]) {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let run = tokio::process::Command::new("node")
        .arg(browser_dir.join(script))
        .arg(&app.address)
        .arg(out_dir)
        .arg(TEST_API_KEY)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(BROWSER_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("{script} ran over {BROWSER_TIMEOUT:?}"))
        .expect("node runs (install Node.js 20 or later)");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{log}");
    assert!(
        output.status.success(),
        "{script} failed ({}); screenshots in {}:\n{log}",
        output.status,
        out_dir.display()
    );
    for name in screenshots {
        assert!(out_dir.join(name).is_file(), "{name} was not saved");
    }
    println!("screenshots in {}", out_dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_watches_a_job_succeed_then_finetunes_and_classifies_on_the_dashboard() {
    let Some(out_dir) = browser_test_dir("dashboard") else {
        return;
    };
    let app = spawn_app().await;
    let dataset = app.upload_zip(zip_archive(&labelled_entries(30, 1))).await;
    let mut config = quick_pretrain_config();
    config["epochs"] = json!(4);
    app.create_job(json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": config}))
        .await;

    // What the script drops on the page: an image to classify and an archive.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    std::fs::write(
        out_dir.join("probe.png"),
        png(&shape_image("disc", &mut rng)),
    )
    .unwrap();
    let unlabelled: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| {
            (
                format!("{i}.png"),
                png(&shape_image(CLASSES[i % 3], &mut rng)),
            )
        })
        .collect();
    std::fs::write(out_dir.join("unlabelled.zip"), zip_archive(&unlabelled)).unwrap();

    run_browser_script(
        &app,
        "dashboard.mjs",
        &out_dir,
        &[
            "dashboard-datasets.png",
            "dashboard-jobs.png",
            "dashboard-classify.png",
        ],
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_maps_an_unlabelled_dataset_then_labels_a_selection_on_the_dashboard() {
    let Some(out_dir) = browser_test_dir("explore") else {
        return;
    };
    let app = spawn_app().await;
    // 24 unlabelled images: image n is of class n % 3, as the script expects.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let images: Vec<(String, Vec<u8>)> = (0..24)
        .map(|n| {
            (
                format!("{n:02}.png"),
                png(&shape_image(CLASSES[n % 3], &mut rng)),
            )
        })
        .collect();
    let dataset = app
        .upload_raw(zip_archive(&images), "application/zip", Some("loop"))
        .await;
    assert_eq!(dataset.status(), 201);
    let dataset: serde_json::Value = dataset.json().await.unwrap();
    let job = app
        .create_job_id(json!({"kind": "pretrain", "dataset_id": dataset["id"],
            "config": quick_pretrain_config()}))
        .await;
    app.wait_for_success(&job, Duration::from_secs(300)).await;

    run_browser_script(
        &app,
        "explore.mjs",
        &out_dir,
        &[
            "dashboard-labelling.png",
            "dashboard-map.png",
            "dashboard-explore.png",
        ],
    )
    .await;
    app.stop().await;
}
