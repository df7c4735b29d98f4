//! A model run over a whole dataset: an embed job's embeddings downloaded as
//! `.npy` with the names of their rows, searched by similarity from an image
//! id or an uploaded image, and projected to a 2-D map; a predict job's CSV and JSON Lines agreeing with
//! `/classify`; bad requests named, and another tenant's dataset and files
//! out of reach.

use crate::common::*;
use pretext::data::npy::read_f32_matrix;
use serde_json::{json, Value};

/// Trains a small classifier from scratch on `dataset_id`; returns its id.
async fn small_classifier(app: &TestApp, dataset_id: &str) -> String {
    let id = app
        .create_job_id(json!({"kind": "finetune", "dataset_id": dataset_id,
            "config": {"backbone": "convnet", "image_size": 32, "max_steps": 20,
                       "batch_size": 8, "val_fraction": 0.0}}))
        .await;
    let job = app.run_until_succeeded(&id).await;
    job["model_id"].as_str().unwrap().to_string()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

async fn download(app: &TestApp, job_id: &str, name: &str) -> reqwest::Response {
    let response = app.get(&format!("/v1/jobs/{job_id}/outputs/{name}")).await;
    assert_eq!(response.status(), 200, "{name}");
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeds_a_dataset_then_searches_it_by_image_id_and_by_upload() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let entries = labelled_entries(8, 21);
    let dataset = app.upload_zip(zip_archive(&entries)).await;
    let dataset_id = dataset["id"].as_str().unwrap();
    let model_id = small_classifier(&app, dataset_id).await;

    // No embeddings yet: the answer says how to make them.
    let by_id = |image: usize| format!("model_id={model_id}&image_id={image}");
    let response = app.search(dataset_id, &by_id(0), None).await;
    let problem = assert_problem(response, 409).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("kind embed"),
        "{problem}"
    );
    let map_path = format!("/v1/datasets/{dataset_id}/map?model_id={model_id}");
    let problem = assert_problem(app.get(&map_path).await, 409).await;
    assert!(problem["detail"].as_str().unwrap().contains("kind embed"));

    let job_id = app
        .create_job_id(json!({"kind": "embed", "dataset_id": dataset_id,
            "base_model_id": model_id, "config": {"batch_size": 10}}))
        .await;
    let queued = app.job(&job_id).await;
    assert_eq!(queued["config"], json!({"batch_size": 10}));
    let response = app
        .get(&format!("/v1/jobs/{job_id}/outputs/embeddings.npy"))
        .await;
    assert_problem(response, 409).await;
    let job = app.run_until_succeeded(&job_id).await;
    assert_eq!(job["progress"]["steps"], 3, "24 images, 10 per pass: {job}");
    assert_eq!(job["progress"]["step"], 3);

    let report = app.get_json(&format!("/v1/jobs/{job_id}/report")).await;
    assert_eq!(report["images"], 24, "{report}");
    assert_eq!(report["model_id"], model_id.as_str());
    let dim = report["embedding_dim"].as_u64().unwrap() as usize;
    let names: Vec<&str> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    // A classifier's probabilities come too (for uncertainty sampling).
    assert_eq!(names, ["embeddings.npy", "images.csv", "probabilities.npy"]);
    let response = download(&app, &job_id, "probabilities.npy").await;
    let (rows, classes, probabilities) = read_f32_matrix(&response.bytes().await.unwrap()).unwrap();
    assert_eq!((rows, classes), (24, 3));
    for row in probabilities.chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{row:?}");
    }

    // The matrix: one row per image, in archive order, as /embed answers.
    let response = download(&app, &job_id, "embeddings.npy").await;
    assert_eq!(
        response.headers()["content-disposition"],
        "attachment; filename=\"embeddings.npy\""
    );
    let (rows, cols, values) = read_f32_matrix(&response.bytes().await.unwrap()).unwrap();
    assert_eq!((rows, cols), (24, dim));
    let row = |i: usize| &values[i * dim..(i + 1) * dim];
    let answer: Value = app
        .post_image(&model_id, "embed", "", entries[13].1.clone())
        .await
        .json()
        .await
        .unwrap();
    let served: Vec<f32> = serde_json::from_value(answer["embeddings"][0].clone()).unwrap();
    assert!(cosine(row(13), &served) > 0.999);
    let table = download(&app, &job_id, "images.csv")
        .await
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 25);
    assert_eq!(lines[0], "image_id,path,label");
    let (path, _) = &entries[13];
    let class = path.split('/').next().unwrap();
    assert_eq!(lines[14], format!("13,{path},{class}"));

    // From an image of the dataset: its nearest others, as a brute-force
    // ranking of the downloaded matrix has them.
    let found = app
        .search(dataset_id, &format!("{}&k=4", by_id(5)), None)
        .await;
    assert_eq!(found.status(), 200);
    let found: Value = found.json().await.unwrap();
    assert_eq!(found["embed_job_id"], job_id.as_str());
    assert_eq!(found["method"], "exact", "24 images are searched exactly");
    let mut expected: Vec<(usize, f32)> = (0..24)
        .filter(|&i| i != 5)
        .map(|i| (i, cosine(row(5), row(i))))
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));
    let results = found["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for (hit, (image, score)) in results.iter().zip(&expected) {
        assert_eq!(hit["image_id"], *image, "{found}");
        assert!((hit["score"].as_f64().unwrap() as f32 - score).abs() < 1e-4);
        assert_eq!(hit["path"], entries[*image].0.as_str());
    }

    // From an uploaded image: the dataset's copy of it comes first.
    let response = app
        .search(
            dataset_id,
            &format!("model_id={model_id}&k=3"),
            Some(entries[9].1.clone()),
        )
        .await;
    assert_eq!(response.status(), 200);
    let found: Value = response.json().await.unwrap();
    assert_eq!(found["results"][0]["image_id"], 9, "{found}");
    assert!(found["results"][0]["score"].as_f64().unwrap() > 0.999);

    // The map: every image at its first two principal components (of the
    // unit-length embeddings), with its label and the classifier's guess.
    let map = app.get_json(&map_path).await;
    assert_eq!(map["embed_job_id"], job_id.as_str(), "{map}");
    assert_eq!(map["method"], "pca");
    assert_eq!(map["total"], 24);
    let points = map["points"].as_array().unwrap();
    assert_eq!(points.len(), 24);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for (i, point) in points.iter().enumerate() {
        assert_eq!(point["image_id"], i);
        assert_eq!(point["label"], entries[i].0.split('/').next().unwrap());
        let row = &probabilities[i * 3..i * 3 + 3];
        let best = (0..3).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        assert_eq!(point["prediction"], CLASSES[best], "{point}");
        assert!((point["confidence"].as_f64().unwrap() as f32 - row[best]).abs() < 1e-6);
        xs.push(point["x"].as_f64().unwrap());
        ys.push(point["y"].as_f64().unwrap());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mx, my) = (mean(&xs), mean(&ys));
    assert!(mx.abs() < 1e-4 && my.abs() < 1e-4, "centred: {mx} {my}");
    let variance_x = xs.iter().map(|x| x * x).sum::<f64>() / 24.0;
    let variance_y = ys.iter().map(|y| y * y).sum::<f64>() / 24.0;
    let covariance = xs.iter().zip(&ys).map(|(x, y)| x * y).sum::<f64>() / 24.0;
    assert!(variance_x >= variance_y, "{variance_x} {variance_y}");
    assert!(
        covariance.abs() < 1e-4 * variance_x.max(1e-9),
        "{covariance}"
    );
    // The variance ratio is the share of the unit rows' total variance.
    let unit: Vec<Vec<f64>> = (0..24)
        .map(|i| {
            let r: Vec<f64> = row(i).iter().map(|&v| v as f64).collect();
            let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
            r.iter().map(|v| v / n).collect()
        })
        .collect();
    let total: f64 = (0..dim)
        .map(|d| {
            let m = unit.iter().map(|r| r[d]).sum::<f64>() / 24.0;
            unit.iter().map(|r| (r[d] - m).powi(2)).sum::<f64>() / 24.0
        })
        .sum();
    let ratio = map["explained_variance_ratio"][0].as_f64().unwrap();
    assert!(
        (ratio - variance_x / total).abs() < 1e-3,
        "{ratio} vs {}",
        variance_x / total
    );
    let sampled = app.get_json(&format!("{map_path}&limit=5")).await;
    let ids: Vec<u64> = sampled["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["image_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [0, 4, 9, 14, 19], "an even sample of the 24");
    assert_eq!(sampled["points"][1]["x"], map["points"][4]["x"]);
    let problem = assert_problem(app.get(&format!("{map_path}&limit=0")).await, 422).await;
    assert_eq!(problem["errors"][0]["field"], "limit", "{problem}");

    // Bad queries are named.
    for (query, field) in [(by_id(24), "image_id"), (format!("{}&k=0", by_id(0)), "k")] {
        let response = app.search(dataset_id, &query, None).await;
        let problem = assert_problem(response, 422).await;
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    let response = app
        .get(&format!("/v1/jobs/{job_id}/outputs/weights.bin"))
        .await;
    let problem = assert_problem(response, 404).await;
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("embeddings.npy"));

    // Another tenant sees neither the dataset nor the files.
    let other = app.with_key(&app.create_key("other").await);
    let response = other.search(dataset_id, &by_id(0), None).await;
    assert_problem(response, 404).await;
    assert_problem(other.get(&map_path).await, 404).await;
    let response = other
        .get(&format!("/v1/jobs/{job_id}/outputs/embeddings.npy"))
        .await;
    assert_problem(response, 404).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_dataset_is_searched_through_its_approximate_graph_once_built() {
    // "Large" here is 10 images, so that a small dataset gets the graph.
    let app = spawn_app_with(TestOptions {
        workers: 0,
        configure: Some(|config| config.ann_min_images = 10),
        ..Default::default()
    })
    .await;
    let entries = labelled_entries(10, 23);
    let dataset = app.upload_zip(zip_archive(&entries)).await;
    let dataset_id = dataset["id"].as_str().unwrap();
    let model_id = small_classifier(&app, dataset_id).await;
    let job_id = app
        .create_job_id(
            json!({"kind": "embed", "dataset_id": dataset_id, "base_model_id": model_id}),
        )
        .await;
    app.run_until_succeeded(&job_id).await;
    let response = download(&app, &job_id, "embeddings.npy").await;
    let (rows, dim, values) = read_f32_matrix(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(rows, 30);
    let row = |i: usize| &values[i * dim..(i + 1) * dim];

    // The first search reads the embeddings and starts the graph; searches
    // say how they went, and soon go through the graph.
    let query = format!("model_id={model_id}&image_id=11&k=5");
    let mut methods = Vec::new();
    let mut last = Value::Null;
    for _ in 0..100 {
        let found = app.search(dataset_id, &query, None).await;
        assert_eq!(found.status(), 200);
        last = found.json().await.unwrap();
        methods.push(last["method"].as_str().unwrap().to_string());
        if methods.last().unwrap() == "approximate" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        methods.last().map(String::as_str),
        Some("approximate"),
        "{methods:?}"
    );
    // Until the graph is ready, searches are exact.
    assert!(
        methods[..methods.len() - 1].iter().all(|m| m == "exact"),
        "{methods:?}"
    );

    // On 30 images the graph finds the exact neighbours, with their scores.
    let mut expected: Vec<(usize, f32)> = (0..30)
        .filter(|&i| i != 11)
        .map(|i| (i, cosine(row(11), row(i))))
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));
    let results = last["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for (hit, (image, score)) in results.iter().zip(&expected) {
        assert_eq!(hit["image_id"], *image, "{last}");
        assert!((hit["score"].as_f64().unwrap() as f32 - score).abs() < 1e-4);
    }
    // An uploaded image goes through the graph too.
    let found: Value = app
        .search(
            dataset_id,
            &format!("model_id={model_id}&k=1"),
            Some(entries[3].1.clone()),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(found["method"], "approximate");
    assert_eq!(found["results"][0]["image_id"], 3, "{found}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predicts_every_image_of_a_dataset_as_csv_and_json_lines() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let entries = labelled_entries(6, 33);
    let dataset = app.upload_zip(zip_archive(&entries)).await;
    let dataset_id = dataset["id"].as_str().unwrap();
    let classifier_id = small_classifier(&app, dataset_id).await;

    // An encoder has no classes to predict.
    let encoder = app
        .create_job_id(json!({"kind": "pretrain", "dataset_id": dataset_id,
            "config": {"backbone": "convnet", "image_size": 32, "max_steps": 1, "batch_size": 8}}))
        .await;
    let encoder_id = app.run_until_succeeded(&encoder).await["model_id"]
        .as_str()
        .unwrap()
        .to_string();
    let response = app
        .post_json(
            "/v1/jobs",
            &json!({"kind": "predict", "dataset_id": dataset_id, "base_model_id": encoder_id}),
        )
        .await;
    let problem = assert_problem(response, 422).await;
    assert_eq!(problem["errors"][0]["field"], "base_model_id", "{problem}");
    let response = app
        .post_json(
            "/v1/jobs",
            &json!({"kind": "predict", "dataset_id": dataset_id, "base_model_id": classifier_id,
                    "config": {"top_k": 0}}),
        )
        .await;
    let problem = assert_problem(response, 422).await;
    assert_eq!(problem["errors"][0]["field"], "config.top_k", "{problem}");

    let job_id = app
        .create_job_id(json!({"kind": "predict", "dataset_id": dataset_id,
            "base_model_id": classifier_id, "config": {"top_k": 2}}))
        .await;
    app.run_until_succeeded(&job_id).await;
    let report = app.get_json(&format!("/v1/jobs/{job_id}/report")).await;
    assert_eq!(report["images"], 18, "{report}");
    assert_eq!(report["classes"], json!(CLASSES));

    let table = download(&app, &job_id, "predictions.csv").await;
    assert_eq!(table.headers()["content-type"], "text/csv");
    let table = table.text().await.unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 19);
    assert_eq!(
        rows[0],
        "image_id,path,label,class_1,score_1,class_2,score_2"
    );
    let lines = download(&app, &job_id, "predictions.jsonl")
        .await
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = lines
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 18);
    for (n, ((path, bytes), line)) in entries.iter().zip(&lines).enumerate() {
        assert_eq!(line["image_id"], n);
        assert_eq!(line["path"], path.as_str());
        assert_eq!(line["label"], path.split('/').next().unwrap());
        let predictions = line["predictions"].as_array().unwrap();
        assert_eq!(predictions.len(), 2);
        let cells: Vec<&str> = rows[n + 1].split(',').collect();
        assert_eq!(cells[3], predictions[0]["label"], "{}", rows[n + 1]);
        // What /classify says of the same image.
        let answer: Value = app
            .post_image(&classifier_id, "classify", "?top_k=1", bytes.clone())
            .await
            .json()
            .await
            .unwrap();
        let served = &answer["predictions"][0][0];
        assert_eq!(predictions[0]["label"], served["label"], "image {n}");
        let score = |v: &Value| v["score"].as_f64().unwrap();
        assert!((score(&predictions[0]) - score(served)).abs() < 1e-4);
        assert!(score(&predictions[0]) >= score(&predictions[1]));
    }

    // A finetune job wrote no files.
    let finetune = app.get_json("/v1/jobs?kind=finetune").await["jobs"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let response = app
        .get(&format!("/v1/jobs/{finetune}/outputs/predictions.csv"))
        .await;
    assert_problem(response, 404).await;
    app.stop().await;
}
