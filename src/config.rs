//! Service configuration: one `clap` struct per process kind, every field
//! settable by flag or environment variable. The flags a training worker needs
//! live in [`WorkerConfig`], which `serve` flattens into its own.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Configuration of `pretext worker`: the database, storage, devices and
/// queue settings that `serve` shares.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerConfig {
    /// Postgres connection string; the database is created if it is missing.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/pretext"
    )]
    pub database_url: String,

    /// Folder holding datasets, checkpoints and model weights; with an
    /// `s3://` storage URL, this process's local copy of what it uses.
    #[arg(long, env = "PRETEXT_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// Where artifacts are kept: `file://<folder>` (the data folder by
    /// default) or `s3://<bucket>/<prefix>`, shared by every process.
    #[arg(long, env = "PRETEXT_STORAGE_URL")]
    pub storage_url: Option<String>,

    /// Training workers to run in this process: one per device by default;
    /// 0 runs the API alone.
    #[arg(long, env = "PRETEXT_WORKERS")]
    pub workers: Option<usize>,

    /// Devices for training: `auto` (every CUDA GPU, else the CPU), `cpu`,
    /// or a comma-separated list such as `cuda:0,cuda:1`.
    #[arg(long, env = "PRETEXT_DEVICES", default_value = "auto")]
    pub devices: String,

    /// Seconds a claimed job's lease lasts; a heartbeat renews it at a third of that.
    #[arg(long, env = "PRETEXT_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,

    /// Milliseconds between queue polls when no notification arrives.
    #[arg(long, env = "PRETEXT_POLL_INTERVAL_MS", default_value_t = 2000)]
    pub poll_interval_ms: u64,

    /// Seconds before a job that failed for a cause that may pass (a full
    /// disk, an unreachable object store) is tried again; doubled at each
    /// further attempt, at most 10 minutes; 0 tries again at once.
    #[arg(long, env = "PRETEXT_RETRY_BACKOFF_SECS", default_value_t = 30)]
    pub retry_backoff_secs: u64,

    /// Most pixels (width × height) one image may claim before it is refused.
    #[arg(long, env = "PRETEXT_MAX_IMAGE_PIXELS", default_value_t = 50_000_000)]
    pub max_image_pixels: u64,

    /// Bytes of decoded pixels the process holds at once, shared by every
    /// decode (requests, archive ingestion, dataset caches): a decode waits
    /// for room, and an image that needs more than all of it is refused.
    #[arg(long, env = "PRETEXT_DECODE_MEMORY_BYTES", default_value_t = crate::data::decode::DEFAULT_DECODE_MEMORY_BYTES)]
    pub decode_memory_bytes: u64,

    /// Train on the CPU with the forward passes in bfloat16 autocast
    /// (weights and optimizer stay float32). Pays on CPUs with AVX-512 BF16
    /// or AMX; elsewhere compare with `pretext ceiling --cpu-bf16 false`.
    #[arg(long, env = "PRETEXT_CPU_BF16", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub cpu_bf16: bool,
}

/// Configuration of `pretext serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeConfig {
    #[command(flatten)]
    pub worker: WorkerConfig,

    /// Address the HTTP API listens on.
    #[arg(long, env = "PRETEXT_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// Device for inference: `auto` (the first CUDA GPU, else the CPU), `cpu` or `cuda:N`.
    #[arg(long, env = "PRETEXT_INFERENCE_DEVICE", default_value = "auto")]
    pub inference_device: String,

    /// Largest accepted archive upload, in bytes.
    #[arg(long, env = "PRETEXT_MAX_UPLOAD_BYTES", default_value_t = 4 << 30)]
    pub max_upload_bytes: u64,

    /// Most entries an archive may hold.
    #[arg(long, env = "PRETEXT_MAX_ARCHIVE_ENTRIES", default_value_t = 250_000)]
    pub max_archive_entries: u64,

    /// Most bytes an archive may expand to.
    #[arg(long, env = "PRETEXT_MAX_UNCOMPRESSED_BYTES", default_value_t = 16 << 30)]
    pub max_uncompressed_bytes: u64,

    /// Largest body accepted by `/embed` and `/classify`, in bytes.
    #[arg(long, env = "PRETEXT_MAX_INFERENCE_BYTES", default_value_t = 64 << 20)]
    pub max_inference_bytes: usize,

    /// Datasets of at least this many images are searched through an
    /// approximate (HNSW) graph, built in the background when their
    /// embeddings are first read; smaller ones, and large ones until their
    /// graph is built, are searched exactly.
    #[arg(long, env = "PRETEXT_ANN_MIN_IMAGES", default_value_t = 200_000)]
    pub ann_min_images: usize,

    /// Most images one `/embed` or `/classify` request may carry.
    #[arg(long, env = "PRETEXT_MAX_INFERENCE_IMAGES", default_value_t = 256)]
    pub max_inference_images: usize,

    /// An API key the server accepts for the `default` tenant (stored by
    /// hash at start; storing it again changes nothing). With no key here
    /// and none stored, the server makes one and prints it once.
    #[arg(long, env = "PRETEXT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Turn authentication off, for local development only: every request
    /// acts as the `default` tenant.
    #[arg(long, env = "PRETEXT_INSECURE_NO_AUTH", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_no_auth: bool,

    /// Requests per second each API key may send on average; 0 turns the
    /// limit off.
    #[arg(long, env = "PRETEXT_RATE_LIMIT_PER_SECOND", default_value_t = 100.0)]
    pub rate_limit_per_second: f64,

    /// Requests each API key may send at once before the average applies.
    #[arg(long, env = "PRETEXT_RATE_LIMIT_BURST", default_value_t = 200)]
    pub rate_limit_burst: u32,

    /// Failed authentications (unknown or revoked keys) one client address
    /// may make within `--auth-failure-window-secs` before its `/v1`
    /// requests are refused with 429, without a key lookup, for a window;
    /// 0 turns the throttle off.
    #[arg(long, env = "PRETEXT_AUTH_FAILURE_LIMIT", default_value_t = 10)]
    pub auth_failure_limit: u32,

    /// Seconds over which failed authentications are counted, and for which
    /// an address over the limit is refused.
    #[arg(long, env = "PRETEXT_AUTH_FAILURE_WINDOW_SECS", default_value_t = 60)]
    pub auth_failure_window_secs: u64,

    /// Bytes of stored datasets each tenant may hold; an upload past it is
    /// refused with 413. 0 turns the quota off.
    #[arg(long, env = "PRETEXT_QUOTA_STORED_BYTES", default_value_t = 100 << 30)]
    pub quota_stored_bytes: u64,

    /// Datasets each tenant may hold; 0 turns the quota off.
    #[arg(long, env = "PRETEXT_QUOTA_DATASETS", default_value_t = 1000)]
    pub quota_datasets: u64,

    /// Models each tenant may hold (a pretrain or finetune job past it is
    /// refused at submission); 0 turns the quota off.
    #[arg(long, env = "PRETEXT_QUOTA_MODELS", default_value_t = 1000)]
    pub quota_models: u64,

    /// Jobs each tenant may have queued or running at once; 0 turns the
    /// quota off.
    #[arg(long, env = "PRETEXT_QUOTA_ACTIVE_JOBS", default_value_t = 100)]
    pub quota_active_jobs: u64,

    /// Seconds an ordinary request may take before it is answered 504
    /// (uploads and event streams excepted); 0 turns the deadline off.
    #[arg(long, env = "PRETEXT_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,

    /// Seconds a dataset upload (`POST /v1/datasets`) may take, ingestion
    /// included; 0 turns the deadline off.
    #[arg(long, env = "PRETEXT_UPLOAD_TIMEOUT_SECS", default_value_t = 3600)]
    pub upload_timeout_secs: u64,

    /// Largest JSON body accepted (`POST /v1/jobs`), in bytes.
    #[arg(long, env = "PRETEXT_MAX_JSON_BYTES", default_value_t = 1 << 20)]
    pub max_json_bytes: usize,

    /// Loaded models kept in memory for inference (least recently used evicted).
    #[arg(long, env = "PRETEXT_MODEL_CACHE_SIZE", default_value_t = 4)]
    pub model_cache_size: usize,

    /// Most images merged into one inference forward pass: concurrent
    /// `/embed` and `/classify` requests for the same model share a batch up
    /// to this size; a larger request runs on its own.
    #[arg(long, env = "PRETEXT_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,

    /// Longest wait, in milliseconds, for more requests to join a batch after
    /// its first was queued (only while other requests are being decoded).
    #[arg(long, env = "PRETEXT_MAX_BATCH_DELAY_MS", default_value_t = 2)]
    pub max_batch_delay_ms: u64,

    /// Inference requests that may wait for the executor; beyond that the API
    /// answers `503` with `Retry-After`.
    #[arg(long, env = "PRETEXT_INFERENCE_QUEUE_DEPTH", default_value_t = 64)]
    pub inference_queue_depth: usize,
}

impl ServeConfig {
    /// A configuration with every default, for tests and embedding.
    pub fn with_database(database_url: &str, data_dir: PathBuf) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: ServeConfig,
        }
        let mut config = Wrapper::parse_from(["pretext"]).config;
        config.worker.database_url = database_url.to_string();
        config.worker.data_dir = data_dir;
        config.bind = "127.0.0.1:0".parse().expect("valid address");
        config
    }
}
