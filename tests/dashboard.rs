//! The dashboard: the page and every file it loads are served with their
//! types, and dataset samples are served for its thumbnails.

mod common;

use std::collections::HashSet;
use std::io::Cursor;

use common::*;
use rand::SeedableRng;

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
