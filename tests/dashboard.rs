//! Dataset samples: the first images of a dataset, served for thumbnails.

mod common;

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
