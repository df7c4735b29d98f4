//! Wiring: configuration → storage → database (created and migrated) →
//! inference executor and training workers → HTTP server, and a shutdown that
//! waits for all of them. [`Application`] is `pretext serve` (the API, with
//! or without workers); [`WorkerProcess`] is `pretext worker` (workers alone).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::keys::ensure_initial_key;
use crate::auth::rate_limit::RateLimiter;
use crate::auth::throttle::FailedAuthThrottle;
use crate::auth::{Auth, Tenant};
use crate::config::{ServeConfig, WorkerConfig};
use crate::db::connect_and_migrate;
use crate::db::datasets::{any_dataset_recorded, recorded_dataset_ids};
use crate::db::job_events::JobEvents;
use crate::db::keys::{ensure_tenant, DEFAULT_TENANT};
use crate::http::{router, AppState};
use crate::jobs::worker::{spawn_workers, WorkerSettings};
use crate::ml::device::{
    device_name, enable_kernel_autotuning, parse_device, parse_devices, set_cpu_mixed_precision,
};
use crate::ml::inference::{InferenceExecutor, InferenceSettings};
use crate::storage::Storage;

/// How long shutdown waits for running jobs to checkpoint and let go.
const WORKER_SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// A built, listening service.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    workers: Vec<JoinHandle<()>>,
    shutdown: CancellationToken,
    generated_key: Option<String>,
}

impl Application {
    /// Connects, migrates, binds the listener and then starts the workers,
    /// so that a server that cannot listen never claims a job.
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let training_workers = Workers::open(&config.worker).await?;
        let (storage, pool, devices) = (
            training_workers.storage.clone(),
            training_workers.pool.clone(),
            training_workers.devices.clone(),
        );
        let worker_count = training_workers.count;
        sweep_leftovers(&storage, &pool, leftover_age(&config)).await;
        let (auth, generated_key) = authentication(&pool, &config).await?;
        let inference_device = if config.inference_device == "auto" {
            devices[0]
        } else {
            parse_device(&config.inference_device).map_err(anyhow::Error::msg)?
        };
        enable_kernel_autotuning(&[inference_device]);
        let inference = InferenceExecutor::start(
            inference_device,
            InferenceSettings {
                cache_size: config.model_cache_size,
                max_batch_size: config.max_batch_size,
                max_batch_delay: Duration::from_millis(config.max_batch_delay_ms),
                queue_depth: config.inference_queue_depth,
            },
        )?;
        let listener = TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("Failed to listen on {}", config.bind))?;
        let workers = training_workers.spawn(&shutdown)?;
        tracing::info!(
            devices = ?devices.iter().map(|d| device_name(*d)).collect::<Vec<_>>(),
            workers = worker_count,
            inference = %device_name(inference_device),
            intra_op_threads = tch::get_num_threads(),
            storage = %storage.url(),
            "pretext ready"
        );
        let job_events = JobEvents::start(&pool, shutdown.clone()).await;
        let state = AppState {
            pool,
            storage,
            config: Arc::new(config),
            inference,
            workers: worker_count,
            job_events,
            shutdown: shutdown.clone(),
            auth: Arc::new(auth),
            embeddings: Default::default(),
            projections: Default::default(),
            manifests: Default::default(),
            label_sets: Default::default(),
            probabilities: Default::default(),
        };
        Ok(Self {
            listener,
            state,
            workers,
            shutdown,
            generated_key,
        })
    }

    /// The API key made at this start because none existed; to be shown
    /// once, since only its hash is kept.
    pub fn generated_key(&self) -> Option<&str> {
        self.generated_key.as_deref()
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// A token that stops the server and its workers when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The shared state (database pool, storage), for tests and tools.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token is cancelled, then waits for in-flight
    /// requests and for workers to checkpoint and release their jobs.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        // Peer addresses, for throttling failed authentications.
        let app = router(self.state).into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .context("the HTTP server failed")?;
        drain_workers(self.workers).await;
        Ok(())
    }
}

/// How old an upload file or an unrecorded dataset folder must be before
/// the start-up sweep removes it: older than the upload deadline, no upload
/// still running (in this process or another sharing the storage) can own
/// it. With the deadline off, a day.
fn leftover_age(config: &ServeConfig) -> Duration {
    match config.upload_timeout_secs {
        0 => Duration::from_secs(24 * 3600),
        secs => Duration::from_secs(secs),
    }
}

/// Removes what a process that stopped mid-upload left behind: upload files
/// in `uploads/`, and dataset folders (here, not their shared copy) that no
/// row names, once older than `min_age`. With no dataset recorded at all
/// (a fresh or mistyped database), folders are kept and only counted: they
/// may belong to another database. A sweep that fails is logged, not fatal.
async fn sweep_leftovers(storage: &Storage, pool: &sqlx::PgPool, min_age: Duration) {
    let swept = async {
        let leftovers = storage.find_leftovers(min_age).await?;
        for path in &leftovers.uploads {
            storage.remove_upload(path).await?;
        }
        let recorded = recorded_dataset_ids(pool, &leftovers.datasets).await?;
        let unrecorded: Vec<_> = leftovers
            .datasets
            .iter()
            .filter(|id| !recorded.contains(id))
            .collect();
        if !unrecorded.is_empty() && !any_dataset_recorded(pool).await? {
            tracing::warn!(
                folders = unrecorded.len(),
                "dataset folders without a row kept: the database records no dataset at all"
            );
            return anyhow::Ok((leftovers.uploads.len(), 0));
        }
        for id in &unrecorded {
            storage.remove_dir(&storage.dataset_dir(**id)).await?;
        }
        anyhow::Ok((leftovers.uploads.len(), unrecorded.len()))
    }
    .await;
    match swept {
        Ok((0, 0)) => {}
        Ok((uploads, datasets)) => {
            tracing::info!(
                uploads,
                datasets,
                "removed files left by an interrupted upload"
            )
        }
        Err(error) => tracing::warn!(error = format!("{error:#}"), "leftover files not swept"),
    }
}

/// Storage, database and the settings of one process's training workers,
/// before they start.
struct Workers {
    storage: Storage,
    pool: sqlx::PgPool,
    devices: Vec<tch::Device>,
    settings: WorkerSettings,
    /// How many workers to start (one per device unless told otherwise).
    count: usize,
}

impl Workers {
    /// Opens storage, connects and migrates.
    async fn open(config: &WorkerConfig) -> anyhow::Result<Self> {
        let storage = Storage::from_url(config.storage_url.as_deref(), &config.data_dir)?;
        let pool = connect_and_migrate(&config.database_url).await?;
        let devices = parse_devices(&config.devices).map_err(anyhow::Error::msg)?;
        enable_kernel_autotuning(&devices);
        set_cpu_mixed_precision(config.cpu_bf16);
        let count = config.workers.unwrap_or(devices.len());
        let settings = WorkerSettings {
            lease: Duration::from_secs(config.lease_secs.max(1)),
            poll_interval: Duration::from_millis(config.poll_interval_ms.max(10)),
            max_image_pixels: config.max_image_pixels,
            retry_backoff: Duration::from_secs(config.retry_backoff_secs),
        };
        Ok(Self {
            storage,
            pool,
            devices,
            settings,
            count,
        })
    }

    /// Starts the workers; they run until `shutdown`.
    fn spawn(&self, shutdown: &CancellationToken) -> anyhow::Result<Vec<JoinHandle<()>>> {
        spawn_workers(
            &self.pool,
            &self.storage,
            &self.devices,
            self.count,
            &self.settings,
            shutdown,
        )
    }
}

/// Waits for workers to checkpoint and release their jobs, at most
/// [`WORKER_SHUTDOWN_GRACE`].
async fn drain_workers(workers: Vec<JoinHandle<()>>) {
    let drained = tokio::time::timeout(
        WORKER_SHUTDOWN_GRACE,
        futures_util::future::join_all(workers),
    )
    .await;
    if drained.is_err() {
        tracing::warn!("workers did not stop within {WORKER_SHUTDOWN_GRACE:?}; exiting anyway");
    }
}

/// A process running training workers without the HTTP API.
pub struct WorkerProcess {
    workers: Vec<JoinHandle<()>>,
    shutdown: CancellationToken,
}

impl WorkerProcess {
    /// Connects, migrates and starts the workers.
    pub async fn start(config: WorkerConfig) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let workers = Workers::open(&config).await?;
        let tasks = workers.spawn(&shutdown)?;
        tracing::info!(
            devices = ?workers.devices.iter().map(|d| device_name(*d)).collect::<Vec<_>>(),
            workers = tasks.len(),
            storage = %workers.storage.url(),
            "pretext workers ready"
        );
        Ok(Self {
            workers: tasks,
            shutdown,
        })
    }

    /// How many workers run in this process.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// A token that stops the workers when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled, then waits for workers to
    /// checkpoint and release their jobs.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        drain_workers(self.workers).await;
        Ok(())
    }
}

/// Authentication as configured, and the key made at first start, if any.
async fn authentication(
    pool: &sqlx::PgPool,
    config: &ServeConfig,
) -> anyhow::Result<(Auth, Option<String>)> {
    let limiter = RateLimiter::new(config.rate_limit_per_second, config.rate_limit_burst);
    if config.insecure_no_auth {
        tracing::warn!(
            "authentication is OFF (--insecure-no-auth): anyone who reaches this server acts as \
             the `{DEFAULT_TENANT}` tenant; use this for local development only"
        );
        let id = ensure_tenant(pool, DEFAULT_TENANT)
            .await
            .context("Failed to find the default tenant")?;
        let tenant = Tenant {
            id,
            name: DEFAULT_TENANT.to_string(),
        };
        let auth = Auth {
            insecure_tenant: Some(tenant),
            limiter,
            failed_auth: None,
        };
        return Ok((auth, None));
    }
    let generated = ensure_initial_key(pool, config.api_key.as_deref()).await?;
    let auth = Auth {
        insecure_tenant: None,
        limiter,
        failed_auth: FailedAuthThrottle::new(
            config.auth_failure_limit,
            Duration::from_secs(config.auth_failure_window_secs),
        ),
    };
    Ok((auth, generated))
}
