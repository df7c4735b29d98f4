//! Test helpers: a real server on a random port against a fresh database in
//! the real Postgres, with one typed method per endpoint, and generated image
//! archives (stripes and discs in random colours) to train on.
#![allow(dead_code)]

use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::time::Duration;

use image::{DynamicImage, ImageBuffer, Rgb};
use pretext::app::Application;
use pretext::config::ServeConfig;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

pub mod api;
pub mod postgres;
pub mod processes;
pub mod proxy;

pub use api::Api;

/// The API key every test server accepts (for the `default` tenant), and
/// that `TestApp::client` sends.
pub const TEST_API_KEY: &str = "ptx_test_key_for_the_integration_tests_0123456789";

/// A client that sends `key` as `Authorization: Bearer <key>` on every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().expect("a header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("a client")
}

/// Set, to the test's path, in the child process that runs one test alone.
const OWN_PROCESS: &str = "PRETEXT_TEST_OWN_PROCESS";

/// For a test that reads what is process-wide (LibTorch's random generators,
/// the metrics registry, this process's memory), which other tests running
/// beside it in this binary would disturb. In the usual run, reruns the test
/// `path` (`module::name`) alone in a child process of this binary, checks
/// that exactly that one test ran and passed, and returns false: the caller
/// returns at once. In that child, returns true: the caller runs the test.
pub fn in_own_process(path: &str) -> bool {
    if std::env::var(OWN_PROCESS).as_deref() == Ok(path) {
        return true;
    }
    let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([path, "--exact", "--test-threads=1", "--nocapture"])
        .env(OWN_PROCESS, path)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{path}, run in its own process, did not pass alone (status {})",
        output.status
    );
    false
}

/// Postgres server the tests use; each test gets its own database on it.
pub fn postgres_server() -> String {
    std::env::var("PRETEXT_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

/// A fresh database URL and data folder.
pub fn fresh_environment() -> (String, PathBuf) {
    let name = format!("pretext_test_{}", uuid::Uuid::new_v4().simple());
    let data_dir = std::env::temp_dir().join(&name);
    (format!("{}/{name}", postgres_server()), data_dir)
}

/// Drops a test's database and removes its data folder, once nothing uses
/// them any more, so that test runs leave nothing behind.
pub async fn remove_environment(database_url: &str, data_dir: &std::path::Path) {
    let name = database_url.rsplit('/').next().expect("a database name");
    assert!(
        name.starts_with("pretext_test_"),
        "not a test database: {name}"
    );
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_server()))
        .await
        .expect("the test Postgres answers");
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("the test database is dropped");
    let _ = std::fs::remove_dir_all(data_dir);
}

/// A running server.
pub struct TestApp {
    pub api: Api,
    pub database_url: String,
    pub data_dir: PathBuf,
    shutdown: CancellationToken,
    /// `None` for a handle made by [`TestApp::with_key`].
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Whether the database and data folder were made for this server alone
    /// (and go when it stops), not handed in by the test.
    owns_environment: bool,
}

/// Knobs tests turn.
#[derive(Clone)]
pub struct TestOptions {
    pub workers: usize,
    pub lease_secs: u64,
    pub max_upload_bytes: Option<u64>,
    pub max_uncompressed_bytes: Option<u64>,
    pub max_archive_entries: Option<u64>,
    pub environment: Option<(String, PathBuf)>,
    /// Any further change to the configuration.
    pub configure: Option<fn(&mut ServeConfig)>,
    /// Requests per second and burst per key; `None` keeps the defaults.
    pub rate_limit: Option<(f64, u32)>,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            lease_secs: 30,
            max_upload_bytes: None,
            max_uncompressed_bytes: None,
            max_archive_entries: None,
            environment: None,
            configure: None,
            rate_limit: None,
        }
    }
}

/// Configuration of a test server.
pub fn test_config(options: &TestOptions, database_url: &str, data_dir: PathBuf) -> ServeConfig {
    let mut config = ServeConfig::with_database(database_url, data_dir);
    config.worker.workers = Some(options.workers);
    config.worker.devices = "cpu".to_string();
    config.inference_device = "cpu".to_string();
    config.worker.lease_secs = options.lease_secs;
    config.worker.poll_interval_ms = 200;
    // The tests of retries want them at once; the fault tests set their own.
    config.worker.retry_backoff_secs = 0;
    config.api_key = Some(TEST_API_KEY.to_string());
    if let Some((per_second, burst)) = options.rate_limit {
        config.rate_limit_per_second = per_second;
        config.rate_limit_burst = burst;
    }
    if let Some(v) = options.max_upload_bytes {
        config.max_upload_bytes = v;
    }
    if let Some(v) = options.max_uncompressed_bytes {
        config.max_uncompressed_bytes = v;
    }
    if let Some(v) = options.max_archive_entries {
        config.max_archive_entries = v;
    }
    if let Some(configure) = options.configure {
        configure(&mut config);
    }
    config
}

/// Starts a server with default options.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestOptions::default()).await
}

/// Starts a server without workers: its jobs stay queued until the test runs
/// them with [`TestApp::run_queued_jobs`].
pub async fn spawn_app_without_workers() -> TestApp {
    spawn_app_with(TestOptions {
        workers: 0,
        ..TestOptions::default()
    })
    .await
}

/// Starts a server.
pub async fn spawn_app_with(options: TestOptions) -> TestApp {
    let owns_environment = options.environment.is_none();
    let (database_url, data_dir) = options
        .environment
        .clone()
        .unwrap_or_else(fresh_environment);
    let config = test_config(&options, &database_url, data_dir.clone());
    let app = Application::build(config)
        .await
        .expect("the application builds");
    let address = format!("http://{}", app.local_addr());
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp {
        api: Api::new(address, TEST_API_KEY),
        database_url,
        data_dir,
        shutdown,
        server: Some(server),
        owns_environment,
    }
}

impl std::ops::Deref for TestApp {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl TestApp {
    /// Stops the server and waits for it (a [`TestApp::with_key`] handle
    /// stops nothing).
    pub async fn stop(self) {
        let Some(server) = self.server else {
            return;
        };
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(60), server).await;
        if self.owns_environment {
            remove_environment(&self.database_url, &self.data_dir).await;
        }
    }

    /// Runs every queued job to its end, one after the other, on a worker of
    /// the test's own (on the CPU, with the server's storage and database),
    /// the way a server's worker would; returns their ids in the order they ran.
    pub async fn run_queued_jobs(&self) -> Vec<String> {
        let pool = sqlx::PgPool::connect(&self.database_url)
            .await
            .expect("the test database answers");
        let storage = pretext::storage::Storage::open(&self.data_dir).expect("the storage opens");
        let defaults = ServeConfig::with_database(&self.database_url, self.data_dir.clone());
        let settings = pretext::jobs::worker::WorkerSettings {
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(200),
            max_image_pixels: defaults.worker.max_image_pixels,
            retry_backoff: Duration::ZERO,
        };
        let worker = pretext::jobs::worker::Worker::new(pool, storage, tch::Device::Cpu, settings)
            .expect("a worker starts");
        let shutdown = CancellationToken::new();
        let mut ran = Vec::new();
        while let Some(id) = worker
            .try_execute_next_job(&shutdown)
            .await
            .expect("the worker runs the queue")
        {
            ran.push(id.to_string());
        }
        ran
    }

    /// Runs the queue (see [`TestApp::run_queued_jobs`]) and returns job `id`,
    /// which must have run and succeeded.
    pub async fn run_until_succeeded(&self, id: &str) -> Value {
        let ran = self.run_queued_jobs().await;
        assert!(
            ran.iter().any(|r| r == id),
            "job {id} was not in the queue: {ran:?}"
        );
        let job = self.job(id).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        job
    }

    /// A handle on the same server whose requests send `key` instead.
    pub fn with_key(&self, key: &str) -> TestApp {
        TestApp {
            api: Api::new(self.address.clone(), key),
            database_url: self.database_url.clone(),
            data_dir: self.data_dir.clone(),
            shutdown: self.shutdown.clone(),
            server: None,
            owns_environment: false,
        }
    }

    /// A new key for the tenant called `tenant` (created if new), made in
    /// the database as `pretext keys create` does.
    pub async fn create_key(&self, tenant: &str) -> String {
        let pool = sqlx::PgPool::connect(&self.database_url)
            .await
            .expect("the test database answers");
        let key = pretext::auth::keys::generate_key();
        pretext::auth::keys::store_key(&pool, tenant, "test", &key)
            .await
            .expect("the key is stored");
        pool.close().await;
        key
    }
}

/// Asserts a problem+json response with `status`; returns its body.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    let actual = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    assert_eq!(actual, status, "{text}");
    assert_eq!(content_type, "application/problem+json", "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["status"], status);
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert!(
        body["type"].as_str().is_some() && body["title"].as_str().is_some(),
        "{body}"
    );
    body
}

/// The shape classes of the generated datasets.
pub const CLASSES: [&str; 3] = ["disc", "horizontal", "vertical"];

/// A 32×32 image of `class` in random colours.
pub fn shape_image(class: &str, rng: &mut impl Rng) -> DynamicImage {
    let fg = Rgb([
        rng.gen_range(128..=255u8),
        rng.gen_range(128..=255u8),
        rng.gen_range(128..=255u8),
    ]);
    let bg = Rgb([
        rng.gen_range(0..96u8),
        rng.gen_range(0..96u8),
        rng.gen_range(0..96u8),
    ]);
    let phase = rng.gen_range(0..8u32);
    let (cx, cy, r) = (
        rng.gen_range(10..22) as f32,
        rng.gen_range(10..22) as f32,
        rng.gen_range(6..10) as f32,
    );
    let img = ImageBuffer::from_fn(32, 32, |x, y| {
        let on = match class {
            "horizontal" => (y + phase) % 8 < 4,
            "vertical" => (x + phase) % 8 < 4,
            _ => ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() < r,
        };
        if on {
            fg
        } else {
            bg
        }
    });
    DynamicImage::ImageRgb8(img)
}

/// Unlabelled images whose every patch shows where it sits: brightness grows
/// with the distance from a jittered centre, so after per-patch normalisation
/// a corner patch still shows a diagonal gradient and an edge patch a straight
/// one. Colours and noise vary per image.
pub fn radial_entries(count: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let (cx, cy) = (rng.gen_range(13.0..19.0f32), rng.gen_range(13.0..19.0f32));
            let tint = [
                rng.gen_range(0.5..1.0f32),
                rng.gen_range(0.5..1.0f32),
                rng.gen_range(0.5..1.0f32),
            ];
            let mut noise = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64 + 1));
            let img = ImageBuffer::from_fn(32, 32, |x, y| {
                let distance = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
                let level = (distance / 23.0).min(1.0) * 230.0;
                Rgb(tint.map(|t| (level * t + noise.gen_range(0.0..25.0f32)) as u8))
            });
            (format!("{i}.png"), png(&DynamicImage::ImageRgb8(img)))
        })
        .collect()
}

/// PNG bytes of an image.
pub fn png(image: &DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A labelled set of `(path, bytes)` entries: `per_class` images per class.
pub fn labelled_entries(per_class: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut entries = Vec::new();
    for class in CLASSES {
        for i in 0..per_class {
            entries.push((
                format!("{class}/{i}.png"),
                png(&shape_image(class, &mut rng)),
            ));
        }
    }
    entries
}

/// A zip archive of entries.
pub fn zip_archive(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        writer.start_file(name.as_str(), options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

/// A tar.gz archive of entries.
pub fn tar_gz_archive(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    for (name, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        // Written raw so tests can put unsafe names in archives.
        let raw = name.as_bytes();
        header.as_old_mut().name[..raw.len()].copy_from_slice(raw);
        header.set_cksum();
        builder.append(&header, bytes.as_slice()).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// A small, fast pretraining config for tests.
pub fn quick_pretrain_config() -> Value {
    json!({
        "backbone": "convnet",
        "image_size": 32,
        "epochs": 2,
        "batch_size": 16,
        "num_permutations": 10,
        "checkpoint_interval_secs": 1
    })
}

/// The project's Python (with torch and torchvision; `make setup` installs it).
pub fn python() -> PathBuf {
    std::env::var_os("PRETEXT_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
        })
}

/// The upload files being received (or left behind) in a data folder's `uploads/`.
pub fn upload_files(data_dir: &std::path::Path) -> Vec<PathBuf> {
    std::fs::read_dir(data_dir.join("uploads"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "part"))
                .collect()
        })
        .unwrap_or_default()
}

/// The names of the folders in a data folder's `datasets/`.
pub fn dataset_folders(data_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("datasets"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits up to `timeout` for `condition` to hold; panics saying `what` otherwise.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection that has sent the head of `POST /v1/datasets` with a
/// `Content-Length` of `length` and no body yet, for tests of clients that
/// stall or go away.
pub async fn start_raw_upload(
    api: &Api,
    content_type: &str,
    length: usize,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = api.address.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /v1/datasets HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TEST_API_KEY}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// Reads a raw HTTP answer until it contains `needle` (10 s at most between reads).
pub async fn read_answer_until(stream: &mut tokio::net::TcpStream, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains(needle) {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(
            read > 0,
            "the connection closed: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}
