//! `GET /v1/jobs/{id}/events`: a job's live progress as Server-Sent Events.
//!
//! The stream reads the database (the worker writes progress and metrics
//! there anyway), so it needs nothing from the worker and works whichever
//! process runs the job. It reads again when Postgres notifies that the job
//! changed ([`crate::db::job_events`]), and every few seconds in case a
//! notification was lost. Every event's SSE `id` is the highest `job_metrics`
//! id delivered so far; a client that reconnects with `Last-Event-ID` gets the
//! job's current state and progress, then only the metrics it has not seen.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::error::ApiError;
use super::extract::ApiPath;
use super::AppState;
use crate::auth::Tenant;
use crate::db::job_events::JobChanges;
use crate::db::jobs::{get_job, list_metrics_after, Job, JobState};

/// How often the database is read when no notification came.
const FALLBACK_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest time between two reads of one stream, however often its job
/// changes: changes in between are sent together.
const MIN_READ_INTERVAL: Duration = Duration::from_millis(100);
/// Comment lines that keep proxies from closing a quiet stream.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Metric rows read per query; a backlog is read in several pages.
const METRICS_PAGE: i64 = 500;

/// `GET /v1/jobs/{id}/events`
pub async fn stream(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let after = last_event_id(&headers)?;
    // Subscribed before the first read, so no change after it goes unheard.
    let changes = state.job_events.subscribe();
    if get_job(&state.pool, tenant.id, id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no job with id {id}")));
    }
    let watch = JobWatch {
        pool: state.pool.clone(),
        tenant_id: tenant.id,
        job_id: id,
        shutdown: state.shutdown.clone(),
        changes,
        last_metric_id: after,
        last_state: None,
        last_progress: None,
        pending: VecDeque::new(),
        last_read: None,
        ended: false,
    };
    let events = futures_util::stream::unfold(watch, |watch| async move {
        watch
            .next_event()
            .await
            .map(|(event, watch)| (Ok(event), watch))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE_INTERVAL)))
}

/// The `Last-Event-ID` a reconnecting client sends; 0 when absent.
fn last_event_id(headers: &HeaderMap) -> Result<i64, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(0);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|id| *id >= 0)
        .ok_or_else(|| {
            ApiError::BadRequest(
                "Last-Event-ID must be the id of an event this stream sent (a non-negative integer)"
                    .to_string(),
            )
        })
}

/// The body of a `progress` event: the job's progress and latest metric values.
#[derive(Serialize, PartialEq)]
struct ProgressEvent {
    #[serde(flatten)]
    progress: serde_json::Value,
    latest_metrics: serde_json::Value,
}

/// What one client's stream has sent so far, and what it still has to send.
struct JobWatch {
    pool: PgPool,
    tenant_id: Uuid,
    job_id: Uuid,
    shutdown: CancellationToken,
    changes: JobChanges,
    last_metric_id: i64,
    last_state: Option<JobState>,
    last_progress: Option<ProgressEvent>,
    pending: VecDeque<Event>,
    /// When the database was last read; `None` before the first read.
    last_read: Option<tokio::time::Instant>,
    ended: bool,
}

impl JobWatch {
    /// The next event, waiting for news as long as the job runs; `None` once
    /// the `end` event is out, the job is gone, or the server shuts down.
    async fn next_event(mut self) -> Option<(Event, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((event, self));
            }
            if self.ended {
                return None;
            }
            if let Some(last_read) = self.last_read {
                tokio::select! {
                    _ = self.changes.changed(self.job_id) => {}
                    _ = tokio::time::sleep(FALLBACK_POLL_INTERVAL) => {}
                    _ = self.shutdown.cancelled() => return None,
                }
                tokio::time::sleep_until(last_read + MIN_READ_INTERVAL).await;
            }
            self.last_read = Some(tokio::time::Instant::now());
            if let Err(error) = self.poll().await {
                // The next poll may succeed; the client keeps its connection.
                tracing::warn!(job_id = %self.job_id, %error, "job events not read");
            }
        }
    }

    /// Reads the job and its new metrics and queues the events they make.
    async fn poll(&mut self) -> sqlx::Result<()> {
        // The job is read before its metrics: a worker writes a job's last
        // metrics before it marks the job ended, so when the job reads as
        // ended the metrics read next are complete.
        let Some(job) = get_job(&self.pool, self.tenant_id, self.job_id).await? else {
            self.ended = true;
            return Ok(());
        };
        if self.last_state != Some(job.state) {
            self.last_state = Some(job.state);
            self.queue("state", &job);
        }
        let progress = ProgressEvent {
            progress: serde_json::to_value(job.progress.0).unwrap_or_default(),
            latest_metrics: job.latest_metrics.0.clone(),
        };
        if self.last_progress.as_ref() != Some(&progress) {
            self.queue("progress", &progress);
            self.last_progress = Some(progress);
        }
        loop {
            let page = list_metrics_after(
                &self.pool,
                self.tenant_id,
                self.job_id,
                self.last_metric_id,
                METRICS_PAGE,
            )
            .await?;
            for metric in &page {
                self.last_metric_id = metric.id;
                self.queue("metric", metric);
            }
            if (page.len() as i64) < METRICS_PAGE {
                break;
            }
        }
        if is_finished(&job) {
            self.queue("end", &job);
            self.ended = true;
        }
        Ok(())
    }

    fn queue(&mut self, name: &str, data: &impl Serialize) {
        let event = Event::default()
            .event(name)
            .id(self.last_metric_id.to_string())
            .json_data(data)
            .unwrap_or_else(|error| Event::default().comment(format!("{name} not sent: {error}")));
        self.pending.push_back(event);
    }
}

fn is_finished(job: &Job) -> bool {
    job.state.is_final()
}
