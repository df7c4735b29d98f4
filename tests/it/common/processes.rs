//! The real `pretext` binary as separate processes: an API server, training
//! workers with their logs kept, and a local S3 server (moto) for the
//! object-storage backend.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{Api, TEST_API_KEY};

/// A `pretext` command with the test's API key and plain-text logs.
fn pretext(args: &[&str], env: &[(String, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pretext"));
    command
        .args(args)
        .env("PRETEXT_API_KEY", TEST_API_KEY)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info,sqlx=warn")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Copies a child's stderr into a shared string.
fn keep_log(child: &mut Child) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    log
}

/// Waits for a stdout line starting with `prefix` and returns the rest of
/// it; every stdout line (the service logs there too) goes on into the log,
/// so the pipe stays open for the life of the process.
async fn wait_for_line(child: &mut Child, prefix: &str, log: &Arc<Mutex<String>>) -> String {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (found_tx, found_rx) = tokio::sync::oneshot::channel();
    let sink = log.clone();
    let prefix_owned = prefix.to_string();
    tokio::spawn(async move {
        let mut found_tx = Some(found_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix(prefix_owned.as_str()) {
                if let Some(tx) = found_tx.take() {
                    let _ = tx.send(rest.to_string());
                }
            }
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    match tokio::time::timeout(Duration::from_secs(60), found_rx).await {
        Ok(Ok(rest)) => rest,
        _ => panic!(
            "pretext did not print `{prefix}`; its log:\n{}",
            log.lock().unwrap()
        ),
    }
}

/// `pretext serve` in its own process.
pub struct ApiProcess {
    pub child: Child,
    pub api: Api,
    pub log: Arc<Mutex<String>>,
}

/// Starts `pretext serve` with `args` after the usual test flags.
pub async fn start_api(
    database_url: &str,
    data_dir: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> ApiProcess {
    let data_dir = data_dir.to_str().unwrap();
    let mut all = vec![
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--devices",
        "cpu",
        "--inference-device",
        "cpu",
        "--database-url",
        database_url,
        "--data-dir",
        data_dir,
    ];
    all.extend_from_slice(args);
    let mut child = pretext(&all, env)
        .spawn()
        .expect("the pretext binary starts");
    let log = keep_log(&mut child);
    let address = wait_for_line(&mut child, "pretext listening on ", &log).await;
    ApiProcess {
        child,
        api: Api::new(address, TEST_API_KEY),
        log,
    }
}

impl std::ops::Deref for ApiProcess {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl ApiProcess {
    /// Kills the process and waits for it to go.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        send_sigterm(&self.child);
    }
}

fn send_sigterm(child: &Child) {
    let pid = child.id().expect("the process is running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `pretext worker` in its own process, with its log kept.
pub struct WorkerChild {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
}

/// Starts `pretext worker` with one CPU worker.
pub async fn start_worker(
    database_url: &str,
    data_dir: &Path,
    lease_secs: u64,
    env: &[(String, String)],
) -> WorkerChild {
    let lease = lease_secs.to_string();
    let args = [
        "worker",
        "--devices",
        "cpu",
        "--poll-interval-ms",
        "200",
        "--lease-secs",
        &lease,
        "--database-url",
        database_url,
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];
    let mut child = pretext(&args, env)
        .spawn()
        .expect("the pretext binary starts");
    let log = keep_log(&mut child);
    wait_for_line(&mut child, "pretext running ", &log).await;
    WorkerChild { child, log }
}

impl WorkerChild {
    /// The ids of the jobs this worker logged as claimed, once per claim.
    pub fn claimed_jobs(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .lines()
            .filter(|line| line.contains("job claimed"))
            .filter_map(|line| {
                let rest = &line[line.find("job_id=")? + "job_id=".len()..];
                Some(rest.split_whitespace().next()?.to_string())
            })
            .collect()
    }

    /// Kills the process and waits for it to go.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        send_sigterm(&self.child);
    }
}

/// A moto S3 server on a free port.
pub struct S3Server {
    pub child: Child,
    pub endpoint: String,
}

/// Starts `python -m moto.server`, or says why it could not.
pub async fn start_moto() -> Result<S3Server, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let mut child = Command::new(super::python())
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "{} -m moto.server did not start: {e}",
                super::python().display()
            )
        })?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = err.read_to_string(&mut stderr).await;
            }
            return Err(format!("moto.server exited with {status}: {stderr}"));
        }
        if client.get(&endpoint).send().await.is_ok() {
            return Ok(S3Server { child, endpoint });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err("moto.server did not answer within 30 s".to_string())
}

/// Starts moto for `test`; without it, a failure under CI and a loud skip
/// elsewhere.
pub async fn start_moto_or_skip(test: &str) -> Option<S3Server> {
    match start_moto().await {
        Ok(moto) => Some(moto),
        Err(reason)
            if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0") =>
        {
            panic!("moto could not be started ({reason}); `make setup` installs moto[server]")
        }
        Err(reason) => {
            eprintln!(
                "\n!!!!! SKIPPED {test}: moto could not be started ({reason}); \
                 `make setup` installs moto[server] !!!!!\n"
            );
            None
        }
    }
}

impl S3Server {
    /// The `AWS_*` variables that point a process at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Creates a bucket.
    pub async fn create_bucket(&self, bucket: &str) {
        let response = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }

    /// The keys stored in `bucket` under `prefix`.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let body = reqwest::Client::new()
            .get(format!("{}/{bucket}", self.endpoint))
            .query(&[("list-type", "2"), ("prefix", prefix)])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        body.split("<Key>")
            .skip(1)
            .filter_map(|part| part.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}
