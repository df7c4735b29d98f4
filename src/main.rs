//! The `pretext` binary: parses the command line and runs the service until
//! Ctrl-C or SIGTERM, runs one client command against a running service, or
//! manages API keys in the database.

use clap::{Parser, Subcommand};
use pretext::app::{Application, WorkerProcess};
use pretext::config::{ServeConfig, WorkerConfig};
use pretext::data::decode::DecodeBudget;
use tokio_util::sync::CancellationToken;

/// Self-supervised pretraining and transfer as an HTTP service.
#[derive(Parser)]
#[command(name = "pretext", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API and the training workers (the default).
    Serve(Box<ServeConfig>),
    /// Run training workers alone, without the HTTP API.
    Worker(WorkerConfig),
    /// Create, list and revoke API keys (directly in the database).
    Keys(pretext::cli::keys::KeysArgs),
    /// Time a pretraining config's step on a synthetic batch in memory: the
    /// ceiling a job's images per second is compared with.
    Ceiling(pretext::cli::ceiling::CeilingArgs),
    #[command(flatten)]
    Client(pretext::cli::Command),
}

async fn wait_for_signal(token: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down: finishing requests, checkpointing running jobs");
    token.cancel();
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn,sqlx=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        None | Some(Command::Serve(_)) | Some(Command::Worker(_))
    ) {
        tune_allocator();
    }
    let config = match cli.command {
        Some(Command::Serve(config)) => *config,
        Some(Command::Worker(config)) => {
            DecodeBudget::install(config.decode_memory_bytes);
            exit_on_error(run_workers(config).await)
        }
        Some(Command::Keys(args)) => std::process::exit(pretext::cli::keys::run(args).await),
        Some(Command::Ceiling(args)) => {
            tune_allocator();
            std::process::exit(pretext::cli::ceiling::run(args))
        }
        Some(Command::Client(command)) => std::process::exit(pretext::cli::run(command).await),
        None => cli.serve,
    };
    DecodeBudget::install(config.worker.decode_memory_bytes);
    let result = async {
        let app = Application::build(config).await?;
        if let Some(key) = app.generated_key() {
            println!("No API key existed, so one was made for the `default` tenant:");
            println!("  {key}");
            println!(
                "Keep it: it is shown only this once. Send it as `Authorization: Bearer <key>` \
                 (the CLI reads PRETEXT_API_KEY); `pretext keys create` makes more."
            );
        }
        println!("pretext listening on http://{}", app.local_addr());
        tokio::spawn(wait_for_signal(app.shutdown_token()));
        app.run_until_stopped().await
    }
    .await;
    exit_on_error(result)
}

/// Lets LibTorch reuse freed tensor memory between steps (see
/// [`pretext::ml::allocator`]), and says so.
fn tune_allocator() {
    use pretext::ml::allocator::{self, AllocatorTuning};
    match allocator::keep_freed_tensor_memory() {
        AllocatorTuning::Applied => tracing::info!(
            trim_threshold_bytes = allocator::TRIM_THRESHOLD_BYTES,
            top_pad_bytes = allocator::TOP_PAD_BYTES,
            "malloc keeps freed tensor memory for reuse"
        ),
        AllocatorTuning::LeftToEnvironment => {
            tracing::info!("malloc settings left as the environment's MALLOC_* variables set them")
        }
        AllocatorTuning::Unavailable => {
            tracing::warn!("malloc settings unchanged: not glibc, or glibc refused them")
        }
    }
}

async fn run_workers(config: WorkerConfig) -> anyhow::Result<()> {
    let process = WorkerProcess::start(config).await?;
    println!("pretext running {} workers", process.worker_count());
    tokio::spawn(wait_for_signal(process.shutdown_token()));
    process.run_until_stopped().await
}

fn exit_on_error(result: anyhow::Result<()>) -> ! {
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
    std::process::exit(0)
}
