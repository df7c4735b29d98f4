//! A dataset's images one by one: pages of them with their labels, each
//! image's stored bytes and thumbnails, bad queries named, and another
//! tenant's dataset a 404.

use crate::common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_a_datasets_images_in_pages_and_serves_each_with_a_thumbnail() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let entries = labelled_entries(4, 11);
    let dataset = app.upload_zip(zip_archive(&entries)).await;
    let id = dataset["id"].as_str().unwrap();

    // Every image once, in archive order, across pages of 5.
    let mut listed: Vec<Value> = Vec::new();
    let mut offset = Some(0);
    while let Some(from) = offset {
        let page = app
            .get_json(&format!("/v1/datasets/{id}/images?limit=5&offset={from}"))
            .await;
        assert_eq!(page["total"], 12, "{page}");
        assert_eq!(page["offset"], from, "{page}");
        let images = page["images"].as_array().unwrap();
        assert!(images.len() <= 5 && !images.is_empty(), "{page}");
        listed.extend(images.iter().cloned());
        offset = page["next_offset"].as_u64();
    }
    assert_eq!(listed.len(), 12);
    for (n, (image, (path, _))) in listed.iter().zip(&entries).enumerate() {
        assert_eq!(image["id"], n, "{image}");
        assert_eq!(image["path"], path.as_str(), "{image}");
        let class = path.split('/').next().unwrap();
        assert_eq!(image["label"], class, "{image}");
    }
    let past_the_end = app
        .get_json(&format!("/v1/datasets/{id}/images?offset=40"))
        .await;
    assert_eq!(past_the_end["images"].as_array().unwrap().len(), 0);
    assert!(past_the_end.get("next_offset").is_none());

    // The stored bytes, then a thumbnail no larger than asked.
    let response = app.get(&format!("/v1/datasets/{id}/images/7")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert_eq!(
        response.bytes().await.unwrap().as_ref(),
        entries[7].1.as_slice()
    );
    let original = image::load_from_memory(&entries[7].1).unwrap();
    let response = app
        .get(&format!("/v1/datasets/{id}/images/7?size=16"))
        .await;
    assert_eq!(response.status(), 200);
    let thumbnail = image::load_from_memory(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(thumbnail.width().max(thumbnail.height()), 16);
    assert!(
        original.width() > 16,
        "the test images are larger than the thumbnail"
    );
    // A size above the image's own keeps its size.
    let response = app
        .get(&format!("/v1/datasets/{id}/images/7?size=512"))
        .await;
    let same = image::load_from_memory(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(
        (same.width(), same.height()),
        (original.width(), original.height())
    );

    // An unlabelled dataset lists no labels.
    let unlabelled: Vec<(String, Vec<u8>)> = entries
        .iter()
        .take(3)
        .enumerate()
        .map(|(n, (_, bytes))| (format!("{n}.png"), bytes.clone()))
        .collect();
    let plain = app.upload_zip(zip_archive(&unlabelled)).await;
    let page = app
        .get_json(&format!(
            "/v1/datasets/{}/images",
            plain["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(page["total"], 3);
    assert!(
        page["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["label"].is_null()),
        "{page}"
    );

    // Bad queries name what to change; unknown images and datasets are 404s.
    for (query, field) in [
        ("images?limit=0", "limit"),
        ("images?offset=-1", "offset"),
        ("images/1?size=4", "size"),
    ] {
        let problem =
            assert_problem(app.get(&format!("/v1/datasets/{id}/{query}")).await, 422).await;
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    let problem = assert_problem(app.get(&format!("/v1/datasets/{id}/images/12")).await, 404).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("0 to 11"),
        "{problem}"
    );
    assert_problem(app.get(&format!("/v1/datasets/{id}/images/x")).await, 404).await;
    assert_problem(
        app.get(&format!("/v1/datasets/{id}/images?colour=red"))
            .await,
        422,
    )
    .await;

    // Another tenant sees nothing of it.
    let other = app.with_key(&app.create_key("beta").await);
    assert_problem(other.get(&format!("/v1/datasets/{id}/images")).await, 404).await;
    assert_problem(other.get(&format!("/v1/datasets/{id}/images/0")).await, 404).await;
    app.stop().await;
}
