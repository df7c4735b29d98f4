//! `pretext train` and `pretext jobs`: submit pretraining and fine-tuning
//! jobs, follow them with a progress bar until they end, list, show and
//! cancel them.
//!
//! Following is polling `GET /v1/jobs/{id}` once a second; Ctrl-C stops the
//! polling, never the job, and says how to pick it up again.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::client::{ApiClient, ClientOptions};
use super::output::{self, print_fields, print_json, Table};
use super::CliError;
use crate::db::jobs::{JobKind, JobState};

/// How often a followed job is polled.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// `pretext train …`
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    client: ClientOptions,
    #[command(subcommand)]
    command: TrainCommand,
}

#[derive(Subcommand, Debug)]
enum TrainCommand {
    /// Pretrain an encoder on a dataset with the jigsaw task (labels unused).
    Pretrain(JobOptions),
    /// Fine-tune a classifier on a labelled dataset, from a pretrained
    /// model or from scratch.
    Finetune {
        #[command(flatten)]
        job: JobOptions,
        /// The model whose trunk to start from; without it the classifier
        /// trains from scratch (the baseline).
        #[arg(long)]
        base: Option<Uuid>,
    },
}

/// What both kinds of job take.
#[derive(Args, Debug)]
struct JobOptions {
    /// The dataset to train on.
    #[arg(long)]
    dataset: Uuid,
    /// The job's configuration as a JSON object, e.g. '{"epochs":20}';
    /// fields left out get the server's defaults.
    #[arg(long, value_name = "JSON", value_parser = parse_config)]
    config: Option<Map<String, Value>>,
    /// One configuration field as KEY=VALUE, merged over --config; VALUE is
    /// read as JSON when it parses (`epochs=5`, `augment=false`), else as a
    /// string (`mode=linear`). Repeat for more fields.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
    settings: Vec<(String, Value)>,
    /// Print the job's id and return instead of following it.
    #[arg(long)]
    detach: bool,
}

/// `pretext jobs …`; the filter options also work without `list`.
#[derive(Args, Debug)]
pub struct JobsArgs {
    #[command(flatten)]
    client: ClientOptions,
    #[command(subcommand)]
    command: Option<JobsCommand>,
    #[command(flatten)]
    filter: JobFilter,
}

#[derive(Subcommand, Debug)]
enum JobsCommand {
    /// List jobs, newest first (the default).
    List(JobFilter),
    /// Show a job: state, progress, latest metrics, configuration.
    Show { id: Uuid },
    /// Follow a job with a progress bar until it ends.
    Follow { id: Uuid },
    /// Cancel a queued or running job.
    Cancel { id: Uuid },
}

#[derive(Args, Debug)]
struct JobFilter {
    /// Only jobs in this state.
    #[arg(long, value_parser = parse_state)]
    state: Option<JobState>,
    /// Only jobs of this kind.
    #[arg(long, value_parser = parse_kind)]
    kind: Option<JobKind>,
    /// Most jobs to list.
    #[arg(long)]
    limit: Option<u32>,
}

impl JobFilter {
    fn is_set(&self) -> bool {
        self.state.is_some() || self.kind.is_some() || self.limit.is_some()
    }

    /// This filter, with what it leaves open taken from `other`.
    fn or(self, other: JobFilter) -> JobFilter {
        JobFilter {
            state: self.state.or(other.state),
            kind: self.kind.or(other.kind),
            limit: self.limit.or(other.limit),
        }
    }
}

/// A job state named on the command line.
fn parse_state(name: &str) -> Result<JobState, String> {
    JobState::from_name(name).ok_or_else(|| {
        let states: Vec<&str> = JobState::ALL.iter().map(|s| s.name()).collect();
        format!("use one of {}", states.join(", "))
    })
}

/// A job kind named on the command line.
fn parse_kind(name: &str) -> Result<JobKind, String> {
    JobKind::from_name(name).ok_or_else(|| {
        let kinds: Vec<&str> = JobKind::ALL.iter().map(|k| k.name()).collect();
        format!("use one of {}", kinds.join(", "))
    })
}

/// A job as the API returns it (the fields shown here).
#[derive(Debug, Deserialize)]
pub(super) struct Job {
    pub(super) id: Uuid,
    kind: JobKind,
    pub(super) state: JobState,
    dataset_id: Option<Uuid>,
    base_model_id: Option<Uuid>,
    config: Value,
    progress: Progress,
    latest_metrics: BTreeMap<String, Option<f64>>,
    model_id: Option<Uuid>,
    pub(super) error: Option<String>,
    attempts: u32,
    max_attempts: u32,
    cancel_requested: bool,
    device: Option<String>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize)]
struct Progress {
    epoch: u64,
    epochs: u64,
    step: u64,
    steps: u64,
    checkpoint_step: u64,
}

#[derive(Debug, Deserialize)]
struct JobList {
    jobs: Vec<Job>,
}

impl Job {
    fn has_ended(&self) -> bool {
        self.state.is_final()
    }

    fn metric(&self, name: &str) -> Option<f64> {
        self.latest_metrics.get(name).copied().flatten()
    }
}

/// Runs `pretext train …`: submits the job, then follows it unless
/// `--detach`.
pub async fn train(args: TrainArgs) -> Result<(), CliError> {
    let api = ApiClient::new(&args.client)?;
    let json = args.client.json;
    let (kind, options, base) = match args.command {
        TrainCommand::Pretrain(options) => (JobKind::Pretrain, options, None),
        TrainCommand::Finetune { job, base } => (JobKind::Finetune, job, base),
    };
    let mut request = json!({
        "kind": kind,
        "dataset_id": options.dataset,
        "config": merge_config(options.config, options.settings),
    });
    if let Some(base) = base {
        request["base_model_id"] = json!(base);
    }
    let value = api.post_json("/v1/jobs", Some(&request)).await?;
    let job: Job = serde_json::from_value(value.clone())?;
    if options.detach {
        if json {
            print_json(&value);
        } else {
            print_fields(&[("job", job.id.to_string())]);
            eprintln!("follow it with `pretext jobs follow {}`", job.id);
        }
        return Ok(());
    }
    if !json {
        eprintln!("queued {kind} job {}", job.id);
    }
    follow(&api, job.id, json).await
}

/// Runs `pretext jobs …`.
pub async fn run(args: JobsArgs) -> Result<(), CliError> {
    let api = ApiClient::new(&args.client)?;
    let json = args.client.json;
    match args.command {
        None => list(&api, json, args.filter).await,
        Some(JobsCommand::List(filter)) => list(&api, json, filter.or(args.filter)).await,
        Some(_) if args.filter.is_set() => Err(CliError::Usage(
            "--state, --kind and --limit go with `pretext jobs list`".into(),
        )),
        Some(JobsCommand::Show { id }) => {
            let value = api.get_json(&format!("/v1/jobs/{id}"), &[]).await?;
            if json {
                print_json(&value);
            } else {
                show(&serde_json::from_value(value)?);
            }
            Ok(())
        }
        Some(JobsCommand::Follow { id }) => follow(&api, id, json).await,
        Some(JobsCommand::Cancel { id }) => {
            let value = api
                .post_json(&format!("/v1/jobs/{id}/cancel"), None)
                .await?;
            if json {
                print_json(&value);
                return Ok(());
            }
            let job: Job = serde_json::from_value(value)?;
            if job.state == JobState::Cancelled {
                println!("cancelled job {id}");
            } else {
                println!("cancelling job {id}: it stops within a few seconds");
            }
            Ok(())
        }
    }
}

async fn list(api: &ApiClient, json: bool, filter: JobFilter) -> Result<(), CliError> {
    let mut query = Vec::new();
    if let Some(state) = filter.state {
        query.push(("state", state.to_string()));
    }
    if let Some(kind) = filter.kind {
        query.push(("kind", kind.to_string()));
    }
    if let Some(limit) = filter.limit {
        query.push(("limit", limit.to_string()));
    }
    let value = api.get_json("/v1/jobs", &query).await?;
    if json {
        print_json(&value);
        return Ok(());
    }
    let list: JobList = serde_json::from_value(value)?;
    let mut table = Table::new(vec!["ID", "KIND", "STATE", "PROGRESS", "MODEL", "CREATED"]);
    for job in list.jobs {
        let progress = if job.progress.steps > 0 {
            format!(
                "{}/{} steps, epoch {}/{}",
                job.progress.step, job.progress.steps, job.progress.epoch, job.progress.epochs
            )
        } else {
            "-".to_string()
        };
        table.row(vec![
            job.id.to_string(),
            job.kind.to_string(),
            job.state.to_string(),
            progress,
            output::or_dash(job.model_id),
            output::time(&job.created_at),
        ]);
    }
    table.print("no jobs; start one with `pretext train pretrain --dataset ID`");
    Ok(())
}

fn show(job: &Job) {
    let mut state = job.state.to_string();
    if job.cancel_requested && !job.has_ended() {
        state.push_str(" (cancel requested)");
    }
    let p = &job.progress;
    print_fields(&[
        ("id", job.id.to_string()),
        ("kind", job.kind.to_string()),
        ("state", state),
        ("dataset", output::or_dash(job.dataset_id)),
        ("base model", output::or_dash(job.base_model_id)),
        ("model", output::or_dash(job.model_id)),
        (
            "progress",
            format!(
                "epoch {}/{}, step {}/{}, last checkpoint at step {}",
                p.epoch, p.epochs, p.step, p.steps, p.checkpoint_step
            ),
        ),
        ("metrics", output::metrics(&job.latest_metrics)),
        (
            "attempts",
            format!("{} of {}", job.attempts, job.max_attempts),
        ),
        ("device", output::or_dash(job.device.as_deref())),
        ("error", output::or_dash(job.error.as_deref())),
        ("created", output::time(&job.created_at)),
        ("started", output::maybe_time(&job.started_at)),
        ("finished", output::maybe_time(&job.finished_at)),
        ("config", job.config.to_string()),
    ]);
}

/// Follows a job until it ends, with a bar over its steps; prints its model
/// on success and fails with its error otherwise.
async fn follow(api: &ApiClient, id: Uuid, json: bool) -> Result<(), CliError> {
    let (job, value) = follow_to_end(api, id).await?;
    if json {
        print_json(&value);
    }
    match (job.state, job.model_id) {
        (JobState::Succeeded, Some(model_id)) => {
            if !json {
                eprintln!(
                    "job {id} succeeded{}: {}",
                    took(&job),
                    output::metrics(&job.latest_metrics)
                );
                print_fields(&[("model", model_id.to_string())]);
            }
            Ok(())
        }
        (JobState::Succeeded, None) => Err(CliError::JobEnded {
            id,
            state: JobState::Succeeded.to_string(),
            reason: Some("but its model has been deleted since".to_string()),
        }),
        _ => Err(CliError::JobEnded {
            id,
            state: job.state.to_string(),
            reason: job.error,
        }),
    }
}

/// Follows a job with a bar over its steps until it ends, whichever way;
/// Ctrl-C stops following (the job goes on).
pub(super) async fn follow_to_end(api: &ApiClient, id: Uuid) -> Result<(Job, Value), CliError> {
    let bar = output::count_bar(0, "steps");
    let outcome = tokio::select! {
        outcome = poll_until_ended(api, id, &bar) => outcome,
        _ = tokio::signal::ctrl_c() => Err(CliError::Interrupted { id }),
    };
    bar.finish_and_clear();
    outcome
}

/// Polls a job once a second, updating `bar`, until it ends.
async fn poll_until_ended(
    api: &ApiClient,
    id: Uuid,
    bar: &ProgressBar,
) -> Result<(Job, Value), CliError> {
    let path = format!("/v1/jobs/{id}");
    loop {
        let value = api.get_json(&path, &[]).await?;
        let job: Job = serde_json::from_value(value.clone())?;
        if job.has_ended() {
            return Ok((job, value));
        }
        if job.progress.steps > 0 {
            bar.set_length(job.progress.steps);
            bar.set_position(job.progress.step);
        }
        bar.set_message(progress_message(&job));
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The bar's message: what the job is doing, its epoch and latest metrics.
fn progress_message(job: &Job) -> String {
    let mut parts = Vec::new();
    match job.state {
        JobState::Queued if job.attempts > 0 => parts.push(format!(
            "queued again after attempt {} of {}",
            job.attempts, job.max_attempts
        )),
        JobState::Queued => parts.push("queued, waiting for a worker".to_string()),
        _ if job.progress.steps == 0 => parts.push("loading the dataset".to_string()),
        _ => {
            parts.push(format!(
                "epoch {}/{}",
                job.progress.epoch, job.progress.epochs
            ));
            for (name, label) in [
                ("loss", "loss"),
                ("pretext_accuracy", "acc"),
                ("train_accuracy", "acc"),
                ("val_accuracy", "val acc"),
            ] {
                if let Some(value) = job.metric(name) {
                    parts.push(format!("{label} {}", output::number(value)));
                }
            }
        }
    }
    if job.cancel_requested {
        parts.push("cancelling".to_string());
    }
    parts.join("  ")
}

/// " in 1m 12s" when the job's start and end are known.
fn took(job: &Job) -> String {
    match (job.started_at, job.finished_at) {
        (Some(start), Some(end)) => {
            let secs = (end - start).num_seconds().max(0);
            if secs >= 60 {
                format!(" in {}m {}s", secs / 60, secs % 60)
            } else {
                format!(" in {secs}s")
            }
        }
        _ => String::new(),
    }
}

/// Parses `--config`: a JSON object.
fn parse_config(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("the config must be a JSON object, e.g. '{\"epochs\":20}'".to_string()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

/// Parses `--set KEY=VALUE`: VALUE as JSON when it parses, else a string.
fn parse_setting(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("the key is empty in {text:?}"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((key.to_string(), value))
}

/// `--config` with every `--set` applied over it, in order.
fn merge_config(config: Option<Map<String, Value>>, settings: Vec<(String, Value)>) -> Value {
    let mut config = config.unwrap_or_default();
    config.extend(settings);
    Value::Object(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_json_when_they_parse_and_strings_otherwise() {
        assert_eq!(
            parse_setting("epochs=5").unwrap(),
            ("epochs".into(), json!(5))
        );
        assert_eq!(
            parse_setting("learning_rate=0.01").unwrap(),
            ("learning_rate".into(), json!(0.01))
        );
        assert_eq!(
            parse_setting("augment=false").unwrap(),
            ("augment".into(), json!(false))
        );
        assert_eq!(
            parse_setting("mode=linear").unwrap(),
            ("mode".into(), json!("linear"))
        );
        assert_eq!(
            parse_setting("max_steps=null").unwrap(),
            ("max_steps".into(), Value::Null)
        );
        assert_eq!(
            parse_setting("name=a=b").unwrap(),
            ("name".into(), json!("a=b"))
        );
        assert!(parse_setting("epochs").is_err());
        assert!(parse_setting("=5").is_err());
    }

    #[test]
    fn settings_override_the_config_in_order() {
        let config = parse_config(r#"{"epochs": 1, "batch_size": 16}"#).unwrap();
        let merged = merge_config(
            Some(config),
            vec![
                ("epochs".into(), json!(3)),
                ("mode".into(), json!("linear")),
                ("epochs".into(), json!(4)),
            ],
        );
        assert_eq!(
            merged,
            json!({"epochs": 4, "batch_size": 16, "mode": "linear"})
        );
        assert!(parse_config("[1]").is_err());
        assert!(parse_config("{").is_err());
        assert_eq!(merge_config(None, vec![]), json!({}));
    }
}
