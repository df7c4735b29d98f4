//! Wiring: configuration → storage → database (created and migrated) →
//! inference executor and training workers → HTTP server, and a shutdown that
//! waits for all of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::ServeConfig;
use crate::db::connect_and_migrate;
use crate::http::{router, AppState};
use crate::jobs::worker::{spawn_workers, WorkerSettings};
use crate::ml::device::{device_name, parse_device, parse_devices};
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
}

impl Application {
    /// Connects, migrates, starts workers and binds the listener.
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        let storage = Storage::open(&config.data_dir)?;
        let pool = connect_and_migrate(&config.database_url).await?;
        let devices = parse_devices(&config.devices).map_err(anyhow::Error::msg)?;
        let inference_device = if config.inference_device == "auto" {
            devices[0]
        } else {
            parse_device(&config.inference_device).map_err(anyhow::Error::msg)?
        };
        let worker_count = config.workers.unwrap_or(devices.len());
        let shutdown = CancellationToken::new();
        let settings = WorkerSettings {
            lease: Duration::from_secs(config.lease_secs.max(1)),
            poll_interval: Duration::from_millis(config.poll_interval_ms.max(10)),
            max_image_pixels: config.max_image_pixels,
        };
        let workers = spawn_workers(
            &pool,
            &storage,
            &devices,
            worker_count,
            &settings,
            &shutdown,
        )?;
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
        tracing::info!(
            devices = ?devices.iter().map(|d| device_name(*d)).collect::<Vec<_>>(),
            workers = worker_count,
            inference = %device_name(inference_device),
            intra_op_threads = tch::get_num_threads(),
            storage = %storage.root().display(),
            "pretext ready"
        );
        let state = AppState {
            pool,
            storage,
            config: Arc::new(config),
            inference,
            workers: worker_count,
            shutdown: shutdown.clone(),
        };
        Ok(Self {
            listener,
            state,
            workers,
            shutdown,
        })
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
        let app = router(self.state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .context("the HTTP server failed")?;
        let drained = tokio::time::timeout(
            WORKER_SHUTDOWN_GRACE,
            futures_util::future::join_all(self.workers),
        )
        .await;
        if drained.is_err() {
            tracing::warn!("workers did not stop within {WORKER_SHUTDOWN_GRACE:?}; exiting anyway");
        }
        Ok(())
    }
}
