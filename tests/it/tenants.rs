//! API keys, tenants and request limits: two tenants never see, use, cancel
//! or delete each other's datasets, jobs and models; requests without a
//! valid key get 401, too many get 429 (as does an address that keeps
//! presenting bad keys), too large 413, too slow 504; the
//! `keys` commands and the first start of the real binary hand out keys that
//! work.

use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Ids of what a tenant owns after a pretraining run.
struct Owned {
    dataset: String,
    job: String,
    model: String,
}

async fn train_something(app: &TestApp, seed: u64) -> Owned {
    let dataset = app
        .upload_zip(zip_archive(&labelled_entries(8, seed)))
        .await;
    let dataset = dataset["id"].as_str().unwrap().to_string();
    let job = app
        .create_job_id(
            json!({"kind": "pretrain", "dataset_id": dataset, "config": quick_pretrain_config()}),
        )
        .await;
    let done = app.wait_for_success(&job, Duration::from_secs(180)).await;
    Owned {
        dataset,
        job,
        model: done["model_id"].as_str().unwrap().to_string(),
    }
}

fn ids(list: &Value, field: &str) -> Vec<String> {
    list[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {list}"))
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_string())
        .collect()
}

async fn status(response: reqwest::Response) -> u16 {
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_or_touch_each_others_datasets_jobs_and_models() {
    let app = spawn_app().await;
    let other = app.with_key(&app.create_key("beta").await);
    let mine = train_something(&app, 1).await;
    let theirs = train_something(&other, 2).await;
    let png = png(&shape_image("disc", &mut rand::thread_rng()));

    // Lists hold only the tenant's own.
    for (tenant, own, foreign) in [(&app, &mine, &theirs), (&other, &theirs, &mine)] {
        let datasets = ids(&tenant.get_json("/v1/datasets").await, "datasets");
        assert_eq!(datasets, vec![own.dataset.clone()]);
        let jobs = ids(&tenant.get_json("/v1/jobs").await, "jobs");
        assert_eq!(jobs, vec![own.job.clone()]);
        let models = ids(&tenant.get_json("/v1/models").await, "models");
        assert_eq!(models, vec![own.model.clone()]);
        assert!(!datasets.contains(&foreign.dataset));
    }

    // Reading by id: the owner gets their own, the other tenant the answer
    // of a missing id.
    let dataset = app
        .get_json(&format!("/v1/datasets/{}", mine.dataset))
        .await;
    assert_eq!(dataset["id"], mine.dataset.as_str(), "{dataset}");
    assert_eq!(
        (
            &dataset["name"],
            &dataset["num_images"],
            &dataset["classes"]
        ),
        (&json!("shapes"), &json!(24), &json!(CLASSES)),
        "{dataset}"
    );
    let job = app.get_json(&format!("/v1/jobs/{}", mine.job)).await;
    assert_eq!(job["id"], mine.job.as_str(), "{job}");
    assert_eq!(
        (&job["kind"], &job["state"]),
        (&json!("pretrain"), &json!("succeeded")),
        "{job}"
    );
    assert_eq!(job["dataset_id"], mine.dataset.as_str(), "{job}");
    assert_eq!(job["model_id"], mine.model.as_str(), "{job}");
    let model = app.get_json(&format!("/v1/models/{}", mine.model)).await;
    assert_eq!(model["id"], mine.model.as_str(), "{model}");
    assert_eq!(model["kind"], "encoder", "{model}");
    assert_eq!(model["job_id"], mine.job.as_str(), "{model}");
    assert_eq!(model["dataset_id"], mine.dataset.as_str(), "{model}");
    let metrics = app
        .get_json(&format!("/v1/jobs/{}/metrics", mine.job))
        .await;
    let points = metrics["points"].as_array().expect("a list of points");
    assert!(
        points
            .iter()
            .any(|p| p["name"].as_str().is_some() && p["value"].is_number()),
        "the training run's metrics: {metrics}"
    );
    let sample = app
        .get(&format!("/v1/datasets/{}/samples/0", mine.dataset))
        .await;
    assert_eq!(sample.status(), 200);
    let image = image::load_from_memory(&sample.bytes().await.unwrap()).expect("an image");
    assert_eq!((image.width(), image.height()), (32, 32));
    let weights = app.get(&format!("/v1/models/{}/weights", mine.model)).await;
    assert_eq!(weights.status(), 200);
    let weights = weights.bytes().await.unwrap();
    assert!(
        weights.len() > 8 && weights[8] == b'{',
        "a safetensors file starts with its header's length, then its JSON"
    );
    let events = app
        .get(&format!("/v1/jobs/{}/events", mine.job))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        events.contains(mine.job.as_str()) && events.contains("event: end"),
        "{events}"
    );
    let reads = [
        format!("/v1/datasets/{}", mine.dataset),
        format!("/v1/datasets/{}/samples/0", mine.dataset),
        format!("/v1/jobs/{}", mine.job),
        format!("/v1/jobs/{}/metrics", mine.job),
        format!("/v1/jobs/{}/events", mine.job),
        format!("/v1/models/{}", mine.model),
        format!("/v1/models/{}/weights", mine.model),
    ];
    for path in &reads {
        let body = assert_problem(other.get(path).await, 404).await;
        assert!(
            !body["detail"].as_str().unwrap().contains("tenant"),
            "GET {path}: {body}"
        );
    }
    // A pretrain job without an evaluation dataset has no report: 409 for
    // the owner, 404 for the other tenant.
    let report = format!("/v1/jobs/{}/report", mine.job);
    assert_problem(app.get(&report).await, 409).await;
    assert_problem(other.get(&report).await, 404).await;

    // Inference with another tenant's model.
    for action in ["embed", "classify"] {
        assert_problem(
            other.post_image(&mine.model, action, "", png.clone()).await,
            404,
        )
        .await;
    }
    let embedded = app.post_image(&mine.model, "embed", "", png.clone()).await;
    assert_eq!(embedded.status(), 200);

    // Jobs that name another tenant's dataset or model, in any field.
    let foreign_references = [
        json!({"kind": "pretrain", "dataset_id": mine.dataset}),
        json!({"kind": "finetune", "dataset_id": theirs.dataset, "base_model_id": mine.model}),
        json!({"kind": "evaluate", "dataset_id": theirs.dataset, "base_model_id": mine.model}),
        json!({"kind": "pretrain", "dataset_id": theirs.dataset,
               "config": {"eval_dataset_id": mine.dataset}}),
        json!({"kind": "evaluate", "dataset_id": theirs.dataset, "base_model_id": theirs.model,
               "config": {"protocol": "knn", "test_dataset_id": mine.dataset}}),
    ];
    for body in &foreign_references {
        let response = other.post_json("/v1/jobs", body).await;
        assert_eq!(
            response.status(),
            404,
            "{body}: {}",
            response.text().await.unwrap()
        );
    }
    // The same references to its own things are accepted.
    let test_set = other.upload_zip(zip_archive(&labelled_entries(2, 3))).await;
    let own = other
        .create_job(json!({"kind": "evaluate", "dataset_id": theirs.dataset,
                           "base_model_id": theirs.model,
                           "config": {"protocol": "knn", "test_dataset_id": test_set["id"]}}))
        .await;
    let own_id = own["id"].as_str().unwrap();
    assert_eq!(status(other.cancel_job(own_id).await).await, 200);

    // Cancelling and deleting another tenant's things: 404, and nothing changes.
    assert_problem(other.cancel_job(&mine.job).await, 404).await;
    assert_problem(app.cancel_job(&mine.job).await, 409).await;
    for path in [
        format!("/v1/datasets/{}", mine.dataset),
        format!("/v1/models/{}", mine.model),
    ] {
        assert_problem(other.delete(&path).await, 404).await;
        assert_eq!(status(app.get(&path).await).await, 200, "{path} survives");
    }
    assert_eq!(
        status(app.delete(&format!("/v1/models/{}", mine.model)).await).await,
        204
    );
    assert_eq!(
        status(app.delete(&format!("/v1/datasets/{}", mine.dataset)).await).await,
        204
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_key_get_401_and_open_routes_stay_open() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let url = app.url("/v1/datasets");
    let bare = reqwest::Client::new();
    let revoked_key = app.create_key("gamma").await;
    assert_eq!(
        status(app.with_key(&revoked_key).get("/v1/datasets").await).await,
        200
    );
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let keys = pretext::db::keys::list_keys(&pool).await.unwrap();
    let gamma = keys.iter().find(|k| k.tenant == "gamma").unwrap();
    assert!(revoked_key.starts_with(&gamma.prefix));
    pretext::db::keys::revoke_key(&pool, gamma.id)
        .await
        .unwrap()
        .unwrap();

    let attempts = [
        ("no header", bare.get(&url)),
        (
            "another scheme",
            bare.get(&url).header("authorization", "Basic dXNlcjpwYXNz"),
        ),
        ("no key", bare.get(&url).header("authorization", "Bearer ")),
        ("an unknown key", bare.get(&url).bearer_auth("ptx_0000")),
        ("a revoked key", bare.get(&url).bearer_auth(&revoked_key)),
    ];
    for (what, request) in attempts {
        let response = request.send().await.unwrap();
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer realm=\"pretext\"",
            "{what}"
        );
        let body = assert_problem(response, 401).await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer <key>"),
            "{what}: {body}"
        );
    }
    // Every /v1 route is behind the key, whatever the method.
    let some_id = uuid::Uuid::new_v4();
    let guarded = [
        bare.post(app.url("/v1/jobs")).json(&json!({})),
        bare.delete(app.url(&format!("/v1/models/{some_id}"))),
        bare.get(app.url(&format!("/v1/jobs/{some_id}/events"))),
        bare.post(app.url("/v1/datasets")).body(vec![0u8; 10]),
    ];
    for request in guarded {
        assert_eq!(request.send().await.unwrap().status(), 401);
    }
    for open in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.yaml",
        "/",
        "/assets/app.js",
    ] {
        let response = bare.get(app.url(open)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{open} needs no key");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        rate_limit: Some((0.5, 2)),
        ..Default::default()
    })
    .await;
    let other = app.with_key(&app.create_key("beta").await);
    assert_eq!(status(app.get("/v1/datasets").await).await, 200);
    assert_eq!(status(app.get("/v1/jobs").await).await, 200);
    let response = app.get("/v1/models").await;
    let retry_after = retry_after_secs(&response);
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body = assert_problem(response, 429).await;
    assert!(body["detail"].as_str().unwrap().contains("retry after"));
    // Each key has its own bucket; open routes have none.
    assert_eq!(status(other.get("/v1/datasets").await).await, 200);
    assert_eq!(status(app.get("/healthz").await).await, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_keeps_presenting_bad_keys_is_refused_for_a_window() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        configure: Some(|config| {
            config.auth_failure_limit = 3;
            config.auth_failure_window_secs = 2;
        }),
        ..Default::default()
    })
    .await;
    let guesser = app.with_key("ptx_a_guess");
    for _ in 0..3 {
        assert_problem(guesser.get("/v1/datasets").await, 401).await;
    }
    let response = guesser.get("/v1/jobs").await;
    let retry_after = retry_after_secs(&response);
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body = assert_problem(response, 429).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("failed authentications from this address"),
        "{body}"
    );
    // While refused, no key is looked up: a valid one from the same address
    // is refused too. Open routes stay open.
    assert_problem(app.get("/v1/datasets").await, 429).await;
    assert_eq!(status(app.get("/healthz").await).await, 200);
    // After the window the valid key works again. Successes between guesses
    // do not wipe the count: three more bad keys are refused again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for _ in 0..3 {
        assert_eq!(status(app.get("/v1/datasets").await).await, 200);
        assert_problem(guesser.get("/v1/datasets").await, 401).await;
    }
    assert_problem(app.get("/v1/datasets").await, 429).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_body_over_the_limit_gets_413() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let padding = "x".repeat(2 << 20);
    let body = json!({"kind": "pretrain", "dataset_id": uuid::Uuid::new_v4(), "padding": padding});
    assert_problem(app.post_json("/v1/jobs", &body).await, 413).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_outlasts_its_deadline_gets_504_and_nothing_is_stored() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        configure: Some(|config| config.request_timeout_secs = 1),
        ..Default::default()
    })
    .await;
    // A client that sends its headers and half its body, then stalls.
    let body = json!({"kind": "pretrain", "dataset_id": uuid::Uuid::new_v4()}).to_string();
    let address = app.url("").trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TEST_API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
        .write_all(&body.as_bytes()[..body.len() / 2])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = read_answer_until(&mut stream, "PRETEXT_REQUEST_TIMEOUT_SECS").await;
    let elapsed = started.elapsed();
    let answer = answer.to_lowercase();
    assert!(answer.starts_with("http/1.1 504"), "{answer}");
    assert!(
        answer.contains("content-type: application/problem+json"),
        "{answer}"
    );
    assert!(
        elapsed >= Duration::from_millis(900),
        "answered before the deadline: {elapsed:?}"
    );
    // The server goes on serving, and the stalled request left nothing behind.
    let jobs = app.get_json("/v1/jobs").await;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");
    app.stop().await;
}

/// The real binary with `args`, against `database_url`, with no key in its environment.
fn pretext(database_url: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pretext"));
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("PRETEXT_API_KEY")
        .env_remove("PRETEXT_INSECURE_NO_AUTH")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn run_ok(database_url: &str, args: &[&str]) -> String {
    let output = pretext(database_url, args).output().await.unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "pretext {}: {stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_commands_create_list_and_revoke_keys() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let db = app.database_url.clone();
    let created = run_ok(&db, &["keys", "create", "--tenant", "acme", "--name", "ci"]).await;
    let key = created.trim().to_string();
    assert!(key.starts_with("ptx_") && key.len() > 40, "{created}");
    let acme = app.with_key(&key);
    assert_eq!(
        ids(&acme.get_json("/v1/datasets").await, "datasets").len(),
        0
    );

    let listed = run_ok(&db, &["keys", "list"]).await;
    assert!(
        !listed.contains(&key),
        "the key itself is never listed:\n{listed}"
    );
    assert!(listed.contains(&key[..12]), "its prefix is:\n{listed}");
    let row = listed
        .lines()
        .find(|line| line.contains("acme"))
        .unwrap_or_else(|| panic!("no acme key in\n{listed}"));
    assert!(row.contains(" ci "), "{row}");
    assert!(row.trim_end().ends_with('-'), "not revoked yet: {row}");
    let id = row.split_whitespace().next().unwrap();

    run_ok(&db, &["keys", "revoke", id]).await;
    assert_problem(acme.get("/v1/datasets").await, 401).await;
    let listed = run_ok(&db, &["keys", "list"]).await;
    let row = listed.lines().find(|line| line.starts_with(id)).unwrap();
    assert!(row.trim_end().ends_with("UTC"), "a revoked date: {row}");
    // The test key of the default tenant still works.
    assert_eq!(status(app.get("/v1/datasets").await).await, 200);

    let unknown = pretext(&db, &["keys", "revoke", &uuid::Uuid::new_v4().to_string()])
        .output()
        .await
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no key with id"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_prints_a_key_that_works() {
    let (database_url, data_dir) = fresh_environment();
    let mut child = pretext(
        &database_url,
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--devices",
            "cpu",
            "--workers",
            "0",
        ],
    )
    .arg("--data-dir")
    .arg(&data_dir)
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (key, address) = tokio::time::timeout(Duration::from_secs(60), async {
        let mut key = None;
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(k) = line.trim().strip_prefix("ptx_") {
                key = Some(format!("ptx_{k}"));
            }
            if let Some(address) = line.strip_prefix("pretext listening on ") {
                return (key, address.to_string());
            }
        }
        panic!("the binary exited before listening");
    })
    .await
    .expect("the binary listens within a minute");
    let key = key.expect("a key is printed before the server listens");
    let with_key = client_with_key(&key)
        .get(format!("{address}/v1/datasets"))
        .send()
        .await
        .unwrap();
    assert_eq!(with_key.status(), 200);
    let without = reqwest::get(format!("{address}/v1/datasets"))
        .await
        .unwrap();
    assert_eq!(without.status(), 401);
    child.kill().await.unwrap();

    // Keys exist now: a second start prints none, and a configured key is
    // accepted beside the first one.
    let mut child = pretext(
        &database_url,
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--devices",
            "cpu",
            "--workers",
            "0",
        ],
    )
    .arg("--data-dir")
    .arg(&data_dir)
    .env("PRETEXT_API_KEY", "configured-key-for-this-test")
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let address = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            assert!(!line.contains("ptx_"), "no second key: {line}");
            if let Some(address) = line.strip_prefix("pretext listening on ") {
                return address.to_string();
            }
        }
        panic!("the binary exited before listening");
    })
    .await
    .expect("the binary listens within a minute");
    for key in [key.as_str(), "configured-key-for-this-test"] {
        let response = client_with_key(key)
            .get(format!("{address}/v1/jobs"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{key}");
    }
    child.kill().await.unwrap();
    remove_environment(&database_url, &data_dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auth_every_request_acts_as_the_default_tenant() {
    let (database_url, data_dir) = fresh_environment();
    let options = TestOptions {
        workers: 0,
        ..Default::default()
    };
    let mut config = test_config(&options, &database_url, data_dir.clone());
    config.api_key = None;
    config.insecure_no_auth = true;
    let app = pretext::app::Application::build(config).await.unwrap();
    assert!(app.generated_key().is_none());
    let address = format!("http://{}", app.local_addr());
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    let bare = reqwest::Client::new();
    let uploaded = bare
        .post(format!("{address}/v1/datasets?name=open"))
        .header("content-type", "application/zip")
        .body(zip_archive(&labelled_entries(2, 3)))
        .send()
        .await
        .unwrap();
    assert_eq!(uploaded.status(), 201);
    let listed: Value = bare
        .get(format!("{address}/v1/datasets"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["datasets"][0]["name"], "open");
    shutdown.cancel();
    let _ = server.await;
    remove_environment(&database_url, &data_dir).await;
}

/// The seconds a `Retry-After` header asks to wait.
fn retry_after_secs(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}
