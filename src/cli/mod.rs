//! The command-line client: `pretext datasets`, `train`, `jobs`, `models`,
//! `classify`, `embed`, `select`, `label`, `search` and `predict` talk to a running
//! server over its HTTP API, so
//! everything a `curl` walkthrough does takes one command, with progress bars
//! for uploads and training.
//!
//! Results go to stdout (tables, or the server's JSON with `--json`), so they
//! can be piped; bars and notes go to stderr and hide themselves when stderr
//! is not a terminal.
//!
//! # Layout
//! - `client`: the HTTP client, its options (`--url`, `--key`, `--json`) and
//!   the mapping of failures onto [`CliError`].
//! - `datasets`: upload (a folder is packed by `pack` on the fly), list,
//!   show, delete.
//! - `jobs`: `train` (submit, then follow), and list, show, follow, cancel.
//! - `models`: list, show, delete, download weights; `classify` and `embed`.
//! - `dataset_jobs`: the labelling loop: `select`, `label`, `search`, `predict`, and
//!   `embed --dataset`.
//! - `keys`: the operator's API key commands, which use the database
//!   directly rather than a server.
//! - `ceiling`: the compute ceiling of a pretraining config on this machine,
//!   measured in-process (no server).
//! - `output`: tables, key/value listings and progress bars.

pub mod ceiling;
mod client;
mod dataset_jobs;
mod datasets;
mod jobs;
pub mod keys;
mod models;
mod output;
mod pack;

use clap::Subcommand;
use uuid::Uuid;

pub use client::{ApiClient, ClientOptions, FieldError, Problem};

/// The client subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Upload, list, show and delete datasets.
    Datasets(datasets::DatasetsArgs),
    /// Submit a pretraining or fine-tuning job and follow it to its end.
    Train(jobs::TrainArgs),
    /// List, show, follow and cancel jobs.
    Jobs(jobs::JobsArgs),
    /// List, show, delete models and download their weights.
    Models(models::ModelsArgs),
    /// Classify images with a classifier model.
    Classify(models::ClassifyArgs),
    /// Embed images (or, with --dataset, every image of a dataset) with a
    /// model's trunk and write the vectors to a file.
    Embed(models::EmbedArgs),
    /// Choose which of a dataset's unlabelled images to label next.
    Select(dataset_jobs::SelectArgs),
    /// Label a dataset's images from a CSV or JSON Lines file.
    Label(dataset_jobs::LabelArgs),
    /// Find a dataset's images most similar to one image.
    Search(dataset_jobs::SearchArgs),
    /// Classify every image of a dataset and write the predictions locally.
    Predict(dataset_jobs::PredictArgs),
}

/// Every way a client command can fail; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server refused the request with a problem+json body.
    #[error("{}: {}", .0.title, .0.detail)]
    Problem(Problem),
    /// Nothing answered at the server's URL.
    #[error(
        "the server at {url} is unreachable ({reason}); start one with `make run` or \
         `pretext serve`, or point --url (PRETEXT_URL) at a running one"
    )]
    Unreachable { url: String, reason: String },
    /// The connection broke or timed out.
    #[error("the request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    /// The server answered with an error that is not problem+json.
    #[error("the server answered {status}: {body}")]
    UnexpectedStatus { status: String, body: String },
    /// The server's answer is not the JSON this client expects.
    #[error("the server's answer is not what this client expects: {0}")]
    UnexpectedBody(String),
    /// A followed job ended without a model.
    #[error("job {id} {state}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    JobEnded {
        id: Uuid,
        state: String,
        reason: Option<String>,
    },
    /// Following stopped on Ctrl-C; the job goes on.
    #[error(
        "stopped following job {id}; it keeps running on the server.\n  \
         follow it again: pretext jobs follow {id}\n  \
         cancel it:        pretext jobs cancel {id}"
    )]
    Interrupted { id: Uuid },
    /// The command line asks for something impossible.
    #[error("{0}")]
    Usage(String),
    /// A local failure: a file that cannot be read or written.
    #[error(transparent)]
    Local(#[from] anyhow::Error),
}

impl CliError {
    /// The process exit code: 130 after Ctrl-C (the shell's convention),
    /// else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Interrupted { .. } => 130,
            _ => 1,
        }
    }

    /// Prints the error to stderr, with a problem's field errors that its
    /// detail does not already spell out.
    pub fn report(&self) {
        match self {
            CliError::Interrupted { .. } => eprintln!("{self}"),
            CliError::Local(error) => eprintln!("error: {error:#}"),
            CliError::Problem(problem) if problem.status == 401 => {
                eprintln!("error: {self}");
                eprintln!(
                    "  pass the server's API key with --api-key or PRETEXT_API_KEY \
                     (the server prints one at first start; `pretext keys create` makes more)"
                );
            }
            CliError::Problem(problem) => {
                eprintln!("error: {self}");
                for field in &problem.errors {
                    let line = format!("{}: {}", field.field, field.message);
                    if !problem.detail.contains(&line) {
                        eprintln!("  {line}");
                    }
                }
            }
            _ => eprintln!("error: {self}"),
        }
    }
}

impl From<serde_json::Error> for CliError {
    fn from(error: serde_json::Error) -> Self {
        CliError::UnexpectedBody(error.to_string())
    }
}

/// Runs one client command; returns the process exit code.
pub async fn run(command: Command) -> i32 {
    let result = match command {
        Command::Datasets(args) => datasets::run(args).await,
        Command::Train(args) => jobs::train(args).await,
        Command::Jobs(args) => jobs::run(args).await,
        Command::Models(args) => models::run(args).await,
        Command::Classify(args) => models::classify(args).await,
        Command::Embed(args) => models::embed(args).await,
        Command::Select(args) => dataset_jobs::select(args).await,
        Command::Label(args) => dataset_jobs::label(args).await,
        Command::Search(args) => dataset_jobs::search(args).await,
        Command::Predict(args) => dataset_jobs::predict(args).await,
    };
    match result {
        Ok(()) => 0,
        Err(error) => {
            error.report();
            error.exit_code()
        }
    }
}
