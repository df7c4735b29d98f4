//! The API contract, fuzzed: Schemathesis (installed by `make setup`) runs
//! every operation of openapi.yaml against the real server with generated
//! requests, including its stateful phase, which follows the spec's links
//! (an uploaded dataset's id into its images, labels and a pretraining job;
//! a job's id into its metrics, report and cancel). Any server error, any
//! response that contradicts the spec (status, content type, body schema),
//! any schema-valid request refused other than as the spec's
//! `tests/contract/schemathesis.toml` documents, or any missing-key request
//! let through fails the test. The run is fixed (seed, examples per
//! operation) so that it is the same on every machine; the README gives a
//! longer one.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

/// Generated requests per operation and phase.
const EXAMPLES_PER_OPERATION: u32 = 20;

/// The seed of every run.
const SEED: u32 = 1;

const CONTRACT_TIMEOUT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_keeps_to_the_openapi_description_under_generated_requests() {
    let repository = Path::new(env!("CARGO_MANIFEST_DIR"));
    let schemathesis = python().with_file_name("schemathesis");
    assert!(
        schemathesis.is_file(),
        "{} is missing: run `make setup`, which installs Schemathesis",
        schemathesis.display()
    );
    // No workers, so that generated jobs stay queued; no rate limits, which
    // the contract's generated bursts would trip (they have tests of their own).
    let app = spawn_app_with(TestOptions {
        workers: 0,
        configure: Some(|config| {
            config.rate_limit_per_second = 0.0;
            config.auth_failure_limit = 0;
        }),
        ..TestOptions::default()
    })
    .await;
    let report = Path::new(env!("CARGO_TARGET_TMPDIR")).join("contract-junit.xml");
    let run = tokio::process::Command::new(&schemathesis)
        .current_dir(repository)
        .env("SCHEMATHESIS_HOOKS", "tests.contract.hooks")
        .env("PYTHONPATH", repository)
        .args([
            "--no-color",
            "--config-file",
            "tests/contract/schemathesis.toml",
        ])
        .args(["run", "openapi.yaml", "--url", &app.address])
        .args(["--header", &format!("Authorization: Bearer {TEST_API_KEY}")])
        .args(["--checks", "all"])
        .args(["--max-examples", &EXAMPLES_PER_OPERATION.to_string()])
        .args(["--seed", &SEED.to_string()])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&report)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(CONTRACT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("Schemathesis ran over {CONTRACT_TIMEOUT:?}"))
        .expect("Schemathesis starts");
    let log = String::from_utf8_lossy(&output.stdout);
    println!("{log}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "Schemathesis found requests the server answers against its description ({}); \
         each is shown above with a curl command to reproduce it",
        output.status
    );
    // It really ran every operation, and the stateful phase with it.
    let spec = std::fs::read_to_string(repository.join("openapi.yaml")).unwrap();
    // An operation's id sits at six spaces (a link's, deeper, names one).
    let operations = spec
        .lines()
        .filter(|line| line.starts_with("      operationId:"))
        .count();
    assert!(
        log.contains(&format!("Tested: {operations}")),
        "not every one of the {operations} operations was tested"
    );
    assert!(
        log.contains("✅ Stateful"),
        "the stateful phase did not pass"
    );
    app.stop().await;
}
