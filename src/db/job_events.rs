//! Change notifications of jobs: one `LISTEN` connection per process that
//! fans the ids of changed jobs out to every subscriber (the event streams).
//!
//! Triggers (migration `job_event_notifications`) send a job's id on the
//! channel whenever its state, progress or latest metrics change, a metric row
//! is added or the job is removed, whichever process made the change.
//! Notifications are a hint, not a log: one sent while the connection is down
//! is lost, so subscribers still read the database and poll now and then.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The channel the triggers notify on.
pub const JOB_EVENTS_CHANNEL: &str = "pretext_job_events";
/// Ids held for a subscriber that has not read them yet; one that falls
/// further behind is told it lagged.
const BACKLOG: usize = 1024;
/// Wait before connecting again after the listening connection failed.
const RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// What a subscriber hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobChange {
    /// This job changed.
    Job(Uuid),
    /// Notifications may have been missed: read every job watched again.
    Unknown,
}

/// The process's listener; cheap to clone.
#[derive(Clone)]
pub struct JobEvents {
    sender: broadcast::Sender<JobChange>,
}

/// One subscriber's queue of changes.
pub struct JobChanges {
    receiver: broadcast::Receiver<JobChange>,
}

impl JobEvents {
    /// Connects and listens in the background until `shutdown`. Once this
    /// returns with the first connection made, every later change is heard;
    /// if that connection fails, it keeps trying in the background.
    pub async fn start(pool: &PgPool, shutdown: CancellationToken) -> Self {
        let (sender, _) = broadcast::channel(BACKLOG);
        let first = connect(pool)
            .await
            .inspect_err(|error| tracing::warn!(%error, "job notifications not connected yet"))
            .ok();
        tokio::spawn(listen(pool.clone(), first, sender.clone(), shutdown));
        Self { sender }
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> JobChanges {
        JobChanges {
            receiver: self.sender.subscribe(),
        }
    }
}

impl JobChanges {
    /// The next change; never returns once the listener has stopped.
    pub async fn next(&mut self) -> JobChange {
        match self.receiver.recv().await {
            Ok(change) => change,
            Err(broadcast::error::RecvError::Lagged(_)) => JobChange::Unknown,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }

    /// Waits until `job_id` (or possibly any job) changed.
    pub async fn changed(&mut self, job_id: Uuid) {
        loop {
            match self.next().await {
                JobChange::Job(id) if id != job_id => continue,
                _ => return,
            }
        }
    }
}

/// Holds a `LISTEN` connection (`first`, when [`JobEvents::start`] made
/// one), reconnecting after failures, and forwards every job id it hears.
/// After a reconnection subscribers are told that changes may have been
/// missed.
async fn listen(
    pool: PgPool,
    mut first: Option<PgListener>,
    sender: broadcast::Sender<JobChange>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let mut listener = match first.take() {
            Some(listener) => listener,
            None => match connect(&pool).await {
                Ok(listener) => {
                    let _ = sender.send(JobChange::Unknown);
                    listener
                }
                Err(error) => {
                    tracing::warn!(%error, "job notifications unavailable; event streams poll");
                    tokio::select! {
                        _ = tokio::time::sleep(RECONNECT_DELAY) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            },
        };
        loop {
            let notification = tokio::select! {
                n = listener.try_recv() => n,
                _ = shutdown.cancelled() => return,
            };
            match notification {
                Ok(Some(notification)) => match notification.payload().parse::<Uuid>() {
                    // No subscriber is not an error.
                    Ok(id) => drop(sender.send(JobChange::Job(id))),
                    Err(_) => tracing::warn!(
                        payload = notification.payload(),
                        "job notification without a job id ignored"
                    ),
                },
                Ok(None) => {
                    tracing::warn!("job notification connection lost; reconnecting");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "job notifications failed; reconnecting");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_DELAY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn connect(pool: &PgPool) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(JOB_EVENTS_CHANNEL).await?;
    Ok(listener)
}
