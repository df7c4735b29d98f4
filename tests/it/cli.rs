//! The command-line client against a real server: the real binary uploads a
//! folder, trains, classifies and embeds, and reports server errors,
//! unreachable servers and Ctrl-C the way a person at a terminal needs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use rand::SeedableRng;
use serde_json::{json, Value};

/// What one run of the binary printed, and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The value of the first stdout line `key  value`.
    fn field(&self, key: &str) -> String {
        self.stdout
            .lines()
            .find_map(|line| {
                let (k, v) = line.split_once("  ")?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no `{key}` line in:\n{}", self.stdout))
    }

    fn assert_success(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

/// The `pretext` binary with `args`, talking to the server at `url`.
fn pretext(url: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pretext"));
    command
        .args(args)
        .arg("--url")
        .arg(url)
        .env_remove("PRETEXT_URL")
        .env("PRETEXT_API_KEY", TEST_API_KEY)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs the binary to its end.
async fn run(url: &str, args: &[&str]) -> Run {
    let output = tokio::time::timeout(Duration::from_secs(300), pretext(url, args).output())
        .await
        .unwrap_or_else(|_| panic!("`pretext {}` did not end in 5 minutes", args.join(" ")))
        .expect("the pretext binary runs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// Writes entries as files under `root`; returns `root`.
fn write_folder(root: &Path, entries: &[(String, Vec<u8>)]) -> PathBuf {
    for (name, bytes) in entries {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    root.to_path_buf()
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_a_folder_then_pretrains_then_finetunes_then_classifies_and_embeds() {
    let app = spawn_app().await;
    let url = app.address.clone();
    let scratch = tempfile::tempdir().unwrap();
    let folder = write_folder(&scratch.path().join("shapes"), &labelled_entries(30, 7));

    // Upload the folder: class folders become labels.
    let upload = run(&url, &["datasets", "upload", text(&folder)]).await;
    upload.assert_success();
    let dataset_id = upload.field("id");
    let dataset = app.get_json(&format!("/v1/datasets/{dataset_id}")).await;
    assert_eq!(dataset["classes"], json!(CLASSES));
    assert_eq!(dataset["num_images"], 90);
    assert_eq!(dataset["name"], "shapes");
    assert_eq!(upload.field("skipped"), "0");
    let listed = run(&url, &["datasets", "list"]).await;
    listed.assert_success();
    assert!(listed.stdout.contains(&dataset_id), "{}", listed.stdout);

    // Pretrain; the model id is printed once the job succeeds.
    let config = r#"{"backbone":"convnet","image_size":32,"epochs":1,"batch_size":16,"num_permutations":10}"#;
    let pretrain = run(
        &url,
        &[
            "train",
            "pretrain",
            "--dataset",
            &dataset_id,
            "--config",
            config,
        ],
    )
    .await;
    pretrain.assert_success();
    let encoder_id = pretrain.field("model");
    let encoder = app.get_json(&format!("/v1/models/{encoder_id}")).await;
    assert_eq!(encoder["kind"], "encoder");
    assert_eq!(encoder["backbone"], "convnet");

    // Fine-tune it, with fields given one by one.
    let finetune = run(
        &url,
        &[
            "train",
            "finetune",
            "--dataset",
            &dataset_id,
            "--base",
            &encoder_id,
            "--set",
            "epochs=2",
            "--set",
            "batch_size=8",
            "--set",
            "min_steps=20",
        ],
    )
    .await;
    finetune.assert_success();
    let classifier_id = finetune.field("model");
    let classifier = app.get_json(&format!("/v1/models/{classifier_id}")).await;
    assert_eq!(classifier["kind"], "classifier");
    assert_eq!(classifier["base_model_id"], encoder_id.as_str());
    let job = app
        .get_json(&format!(
            "/v1/jobs/{}",
            classifier["job_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(job["config"]["epochs"], 2);
    assert_eq!(job["config"]["batch_size"], 8);

    // Classify two images: one line each, the path then two label:score pairs.
    let mut rng = rand::rngs::StdRng::seed_from_u64(70);
    let img1 = scratch.path().join("img1.png");
    let img2 = scratch.path().join("img2.png");
    std::fs::write(&img1, png(&shape_image("vertical", &mut rng))).unwrap();
    std::fs::write(&img2, png(&shape_image("disc", &mut rng))).unwrap();
    let classified = run(
        &url,
        &[
            "classify",
            "--model",
            &classifier_id,
            text(&img1),
            text(&img2),
            "--top-k",
            "2",
        ],
    )
    .await;
    classified.assert_success();
    let lines: Vec<&str> = classified.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", classified.stdout);
    for (line, image) in lines.iter().zip([&img1, &img2]) {
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some(text(image)));
        let pairs: Vec<&str> = words.collect();
        assert_eq!(pairs.len(), 2, "{line}");
        for pair in pairs {
            let (label, score) = pair.split_once(':').unwrap();
            assert!(CLASSES.contains(&label), "{line}");
            assert!(
                (0.0..=1.0).contains(&score.parse::<f64>().unwrap()),
                "{line}"
            );
        }
    }

    // Embed into a JSON file keyed by path.
    let out = scratch.path().join("embeddings.json");
    let embedded = run(
        &url,
        &[
            "embed",
            "--model",
            &encoder_id,
            text(&img1),
            "--out",
            text(&out),
        ],
    )
    .await;
    embedded.assert_success();
    assert!(embedded.stdout.contains("dim 256"), "{}", embedded.stdout);
    let file: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(file["dim"], 256);
    assert_eq!(file["model_id"], encoder_id.as_str());
    assert_eq!(
        file["embeddings"][text(&img1)].as_array().unwrap().len(),
        256
    );

    // Download the encoder's weights.
    let weights = scratch.path().join("encoder.safetensors");
    run(
        &url,
        &["models", "download", &encoder_id, "--out", text(&weights)],
    )
    .await
    .assert_success();
    let served = app
        .get(&format!("/v1/models/{encoder_id}/weights"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(std::fs::read(&weights).unwrap(), served.as_ref());

    // Lists: --json prints the server's JSON, tables otherwise.
    let jobs = run(&url, &["jobs", "list", "--json"]).await;
    jobs.assert_success();
    let jobs: Value = serde_json::from_str(&jobs.stdout).expect("jobs list --json is JSON");
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 2);
    let models = run(&url, &["models", "--kind", "classifier"]).await;
    models.assert_success();
    assert!(models.stdout.contains(&classifier_id), "{}", models.stdout);
    assert!(!models.stdout.contains(&encoder_id), "{}", models.stdout);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_print_the_problem_and_exit_1() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let url = app.address.clone();

    // A missing dataset: the problem's title and detail.
    let missing = uuid::Uuid::now_v7().to_string();
    let problem = assert_problem(app.get(&format!("/v1/datasets/{missing}")).await, 404).await;
    let shown = run(&url, &["datasets", "show", &missing]).await;
    assert_eq!(shown.code, Some(1));
    assert_eq!(
        shown.stderr.trim(),
        format!("error: Not found: {}", problem["detail"].as_str().unwrap())
    );
    assert!(shown.stdout.is_empty());

    // An archive file uploads as it is; an invalid config names its field.
    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("few.zip");
    std::fs::write(&archive, zip_archive(&labelled_entries(2, 3))).unwrap();
    let upload = run(
        &url,
        &["datasets", "upload", text(&archive), "--name", "few"],
    )
    .await;
    upload.assert_success();
    assert_eq!(upload.field("name"), "few");
    let refused = run(
        &url,
        &[
            "train",
            "pretrain",
            "--dataset",
            &upload.field("id"),
            "--set",
            "epochs=0",
        ],
    )
    .await;
    assert_eq!(refused.code, Some(1));
    assert!(
        refused
            .stderr
            .starts_with("error: Invalid request: config.epochs"),
        "{}",
        refused.stderr
    );
    let jobs = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0);
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_named_with_how_to_start_one() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let listed = run(&url, &["jobs"]).await;
    assert_eq!(listed.code, Some(1));
    assert!(
        listed
            .stderr
            .contains(&format!("the server at {url} is unreachable")),
        "{}",
        listed.stderr
    );
    assert!(listed.stderr.contains("pretext serve"), "{}", listed.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_following_but_leaves_the_job_running() {
    let app = spawn_app().await;
    let url = app.address.clone();
    let dataset = app.upload_zip(zip_archive(&labelled_entries(10, 5))).await;
    let dataset_id = dataset["id"].as_str().unwrap();

    let child = pretext(
        &url,
        &[
            "train",
            "pretrain",
            "--dataset",
            dataset_id,
            "--config",
            r#"{"backbone":"convnet","image_size":32,"batch_size":4,"num_permutations":10}"#,
            "--set",
            "epochs=1000",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("the pretext binary runs");
    let job_id = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let jobs = app.get_json("/v1/jobs?state=running").await;
            if let Some(job) = jobs["jobs"].as_array().unwrap().first() {
                if job["progress"]["step"].as_i64() > Some(0) {
                    return job["id"].as_str().unwrap().to_string();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the job runs within a minute");
    // Let the client poll at least once before it is interrupted.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the client stops on Ctrl-C")
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!("pretext jobs follow {job_id}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("pretext jobs cancel {job_id}")),
        "{stderr}"
    );

    let job = app.job(&job_id).await;
    assert_eq!(job["state"], "running");
    assert_eq!(job["cancel_requested"], false);

    // The printed command cancels it.
    let cancelled = run(&url, &["jobs", "cancel", &job_id]).await;
    cancelled.assert_success();
    let job = app
        .wait_for_job(&job_id, Duration::from_secs(20), |j| {
            j["state"] != "running"
        })
        .await;
    assert_eq!(job["state"], "cancelled");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boolean_environment_variables_accept_the_usual_spellings() {
    for (value, open) in [("1", true), ("yes", true), ("0", false), ("off", false)] {
        let (database_url, data_dir) = fresh_environment();
        let server = crate::common::processes::start_api(
            &database_url,
            &data_dir,
            &["--workers", "0"],
            &[("PRETEXT_INSECURE_NO_AUTH".into(), value.into())],
        )
        .await;
        let anonymous = reqwest::get(server.url("/v1/datasets")).await.unwrap();
        assert_eq!(
            anonymous.status().as_u16(),
            if open { 200 } else { 401 },
            "PRETEXT_INSECURE_NO_AUTH={value}"
        );
        server.stop().await;
        remove_environment(&database_url, &data_dir).await;
    }
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_pretext"))
        .arg("serve")
        .env("PRETEXT_INSECURE_NO_AUTH", "maybe")
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("maybe") && stderr.contains("insecure-no-auth"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_an_unlabelled_folder_then_predicts_embeds_and_searches_it() {
    let app = spawn_app().await;
    let url = app.address.clone();
    let scratch = tempfile::tempdir().unwrap();
    // Images at the folder's root: an unlabelled dataset.
    let shapes = labelled_entries(6, 12);
    let flat: Vec<(String, Vec<u8>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (_, bytes))| (format!("{i:02}.png"), bytes.clone()))
        .collect();
    let folder = write_folder(&scratch.path().join("scans"), &flat);
    let upload = run(&url, &["datasets", "upload", text(&folder)]).await;
    upload.assert_success();
    let dataset_id = upload.field("id");

    // Label every image from a CSV of archive paths.
    let labels = scratch.path().join("labels.csv");
    let rows: String = flat
        .iter()
        .zip(&shapes)
        .map(|((path, _), (class_path, _))| {
            format!("{path},{}\n", class_path.split('/').next().unwrap())
        })
        .collect();
    std::fs::write(&labels, format!("path,label\n{rows}")).unwrap();
    let labelled = run(&url, &["label", "--dataset", &dataset_id, text(&labels)]).await;
    labelled.assert_success();
    assert_eq!(labelled.field("label version"), "1");
    assert_eq!(labelled.field("labelled"), "18");
    let broken = scratch.path().join("broken.csv");
    std::fs::write(&broken, "path,label\nnot-there.png,disc\n").unwrap();
    let refused = run(&url, &["label", "--dataset", &dataset_id, text(&broken)]).await;
    assert_eq!(refused.code, Some(1));
    assert!(refused.stderr.contains("line 2"), "{}", refused.stderr);

    let finetune = run(
        &url,
        &[
            "train",
            "finetune",
            "--dataset",
            &dataset_id,
            "--set",
            "backbone=convnet",
            "--set",
            "image_size=32",
            "--set",
            "max_steps=10",
            "--set",
            "batch_size=8",
        ],
    )
    .await;
    finetune.assert_success();
    let classifier_id = finetune.field("model");

    // Predict every image into a local CSV: a header, then one row per image.
    let predictions = scratch.path().join("predictions.csv");
    let predicted = run(
        &url,
        &[
            "predict",
            "--dataset",
            &dataset_id,
            "--model",
            &classifier_id,
            "--top-k",
            "2",
            "--out",
            text(&predictions),
        ],
    )
    .await;
    predicted.assert_success();
    let table = std::fs::read_to_string(&predictions).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "image_id,path,label,class_1,score_1,class_2,score_2"
    );
    assert_eq!(lines.len(), 19);
    assert!(lines[1].starts_with("0,00.png,disc,"), "{}", lines[1]);

    // Embed the dataset, then search it from one of its images.
    let npy = scratch.path().join("embeddings.npy");
    let embedded = run(
        &url,
        &[
            "embed",
            "--dataset",
            &dataset_id,
            "--model",
            &classifier_id,
            "--out",
            text(&npy),
        ],
    )
    .await;
    embedded.assert_success();
    let (rows, _, _) = pretext::data::npy::read_f32_matrix(&std::fs::read(&npy).unwrap()).unwrap();
    assert_eq!(rows, 18);
    let found = run(
        &url,
        &[
            "search",
            "--dataset",
            &dataset_id,
            "--model",
            &classifier_id,
            "--image-id",
            "3",
            "-k",
            "4",
        ],
    )
    .await;
    found.assert_success();
    let hits: Vec<&str> = found.stdout.lines().skip(1).collect();
    assert_eq!(hits.len(), 4, "{}", found.stdout);
    assert!(
        hits.iter().all(|hit| !hit.starts_with("3 ")),
        "{}",
        found.stdout
    );

    // A fresh upload of the same images: choose four to label, fill in the
    // template `select` wrote, and send it back.
    let fresh = run(&url, &["datasets", "upload", text(&folder)]).await;
    fresh.assert_success();
    let fresh_id = fresh.field("id");
    run(
        &url,
        &[
            "embed",
            "--dataset",
            &fresh_id,
            "--model",
            &classifier_id,
            "--out",
            text(&npy),
        ],
    )
    .await
    .assert_success();
    let template = scratch.path().join("to_label.csv");
    let selected = run(
        &url,
        &[
            "select",
            "--dataset",
            &fresh_id,
            "--model",
            &classifier_id,
            "--budget",
            "4",
            "--out",
            text(&template),
        ],
    )
    .await;
    selected.assert_success();
    let rows: Vec<String> = std::fs::read_to_string(&template)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(rows[0], "image_id,path,label");
    assert_eq!(rows.len(), 5, "{rows:?}");
    let filled: String = rows[1..]
        .iter()
        .map(|row| {
            let id: usize = row.split(',').next().unwrap().parse().unwrap();
            format!("{row}{}\n", shapes[id].0.split('/').next().unwrap())
        })
        .collect();
    std::fs::write(&template, format!("image_id,path,label\n{filled}")).unwrap();
    let labelled = run(&url, &["label", "--dataset", &fresh_id, text(&template)]).await;
    labelled.assert_success();
    assert_eq!(labelled.field("labelled"), "4");
    app.stop().await;
}
