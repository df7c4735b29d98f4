//! Live progress: a client follows a pretraining job over Server-Sent Events
//! from queued to succeeded, then reconnects with `Last-Event-ID` and gets
//! only what it had not seen.

use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct SseEvent {
    name: String,
    id: i64,
    data: Value,
}

/// Reads the events of a response body as they arrive.
struct EventReader {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl EventReader {
    fn new(response: reqwest::Response) -> Self {
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next event; `None` once the server has closed the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_event(&block) {
                    return Some(event);
                }
            }
            let chunk = self.body.next().await?.expect("the stream reads");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Every event until the server closes the stream; panics after `timeout`.
    async fn until_closed(mut self, timeout: Duration) -> Vec<SseEvent> {
        let read = async {
            let mut events = Vec::new();
            while let Some(event) = self.next().await {
                events.push(event);
            }
            events
        };
        tokio::time::timeout(timeout, read)
            .await
            .expect("the stream ends")
    }
}

/// Parses the `event:`/`id:`/`data:` lines of one event; `None` for a
/// keep-alive comment.
fn parse_event(block: &str) -> Option<SseEvent> {
    let (mut name, mut id, mut data) = (None, None, String::new());
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().parse().expect("ids are integers"));
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    Some(SseEvent {
        name: name?,
        id: id.expect("every event has an id"),
        data: serde_json::from_str(&data).expect("data is JSON"),
    })
}

async fn open_stream(app: &TestApp, job_id: &str, last_event_id: Option<i64>) -> reqwest::Response {
    let mut request = app
        .client
        .get(app.url(&format!("/v1/jobs/{job_id}/events")))
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = request.send().await.expect("request sent");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    response
}

fn named<'a>(events: &'a [SseEvent], name: &str) -> Vec<&'a SseEvent> {
    events.iter().filter(|e| e.name == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_job_live_then_resumes_from_the_last_event_id() {
    let app = spawn_app().await;
    let dataset = app.upload_zip(zip_archive(&labelled_entries(30, 5))).await;
    // Long enough (a few seconds) for the stream's polls to see it running.
    let mut config = quick_pretrain_config();
    config["epochs"] = json!(60);
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": config}))
        .await;
    let job_id = job["id"].as_str().unwrap().to_string();

    let events = EventReader::new(open_stream(&app, &job_id, None).await)
        .until_closed(Duration::from_secs(180))
        .await;

    // The job as it stood comes first; the stream closes after `end`.
    assert_eq!(events[0].name, "state", "{events:#?}");
    assert_eq!(events[0].data["id"], job_id.as_str());
    let last = events.last().unwrap();
    assert_eq!(last.name, "end");
    assert_eq!(last.data["state"], "succeeded");
    assert!(last.data["model_id"].is_string(), "{}", last.data);
    assert_eq!(named(&events, "end").len(), 1);

    let states: Vec<&str> = named(&events, "state")
        .iter()
        .map(|e| e.data["state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"running"), "{states:?}");
    assert_eq!(states.last(), Some(&"succeeded"));

    let progress = named(&events, "progress");
    assert!(!progress.is_empty());
    let final_progress = &progress.last().unwrap().data;
    assert_eq!(final_progress["step"], final_progress["steps"]);
    assert!(final_progress["latest_metrics"]["loss"].is_number());

    // Every metric row arrives once, in id order, with the SSE id its own.
    let metrics = named(&events, "metric");
    let stored = app.get_json(&format!("/v1/jobs/{job_id}/metrics")).await["points"]
        .as_array()
        .unwrap()
        .len();
    assert!(metrics.len() >= 4, "{metrics:#?}");
    assert_eq!(metrics.len(), stored);
    for pair in metrics.windows(2) {
        assert!(pair[0].id < pair[1].id, "{pair:#?}");
    }
    for metric in &metrics {
        assert_eq!(metric.data["id"], metric.id);
        assert!(metric.data["value"].as_f64().unwrap().is_finite());
        assert!(metric.data["name"].is_string() && metric.data["step"].is_number());
    }
    // Event ids are the highest metric id so far, so they never go back.
    for pair in events.windows(2) {
        assert!(pair[0].id <= pair[1].id);
    }
    assert_eq!(last.id, metrics.last().unwrap().id);

    // Reconnecting mid-stream: the current state, then only later metrics.
    let seen = metrics[metrics.len() / 2].id;
    let resumed = EventReader::new(open_stream(&app, &job_id, Some(seen)).await)
        .until_closed(Duration::from_secs(30))
        .await;
    assert_eq!(resumed[0].name, "state");
    assert_eq!(resumed[0].data["state"], "succeeded");
    assert_eq!(resumed[0].id, seen);
    let later: Vec<i64> = metrics
        .iter()
        .map(|e| e.id)
        .filter(|id| *id > seen)
        .collect();
    let replayed: Vec<i64> = named(&resumed, "metric").iter().map(|e| e.id).collect();
    assert!(!later.is_empty());
    assert_eq!(replayed, later);
    assert_eq!(resumed.last().unwrap().name, "end");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_jobs_and_bad_ids_are_refused_before_the_stream_starts() {
    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let missing = uuid::Uuid::now_v7();
    assert_problem(app.get(&format!("/v1/jobs/{missing}/events")).await, 404).await;
    assert_problem(app.get("/v1/jobs/not-a-uuid/events").await, 400).await;

    let dataset = app.upload_zip(zip_archive(&labelled_entries(2, 5))).await;
    let job = app
        .create_job(json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": quick_pretrain_config()}))
        .await;
    let job_id = job["id"].as_str().unwrap();
    let response = app
        .client
        .get(app.url(&format!("/v1/jobs/{job_id}/events")))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    assert_problem(response, 400).await;

    // A queued job with no worker: its state is sent at once, and a cancel
    // ends the stream.
    let mut reader = EventReader::new(open_stream(&app, job_id, None).await);
    let first = tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .expect("the first event comes at once")
        .unwrap();
    assert_eq!((first.name.as_str(), first.id), ("state", 0));
    assert_eq!(first.data["state"], "queued");
    assert_eq!(app.cancel_job(job_id).await.status(), 200);
    let rest = reader.until_closed(Duration::from_secs(10)).await;
    let last = rest.last().expect("events after the cancel");
    assert_eq!(last.name, "end");
    assert_eq!(last.data["state"], "cancelled");
    app.stop().await;
}

/// What the triggers and the listener deliver: a job's id when its state
/// changes or a metric is added, in commit order, and nothing for a lease
/// renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_changes_are_notified_and_lease_renewals_are_not() {
    use pretext::db::job_events::{JobChange, JobEvents};

    let app = spawn_app_with(TestOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let dataset = app.upload_zip(zip_archive(&labelled_entries(2, 5))).await;
    let pretrain =
        json!({"kind": "pretrain", "dataset_id": dataset["id"], "config": quick_pretrain_config()});
    let first = app.create_job_id(pretrain.clone()).await;
    let second = app.create_job_id(pretrain).await;
    let id = |text: &str| uuid::Uuid::parse_str(text).unwrap();

    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let events = JobEvents::start(&pool, shutdown.clone()).await;
    let mut changes = events.subscribe();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), changes.next())
            .await
            .expect("a notification arrives")
    };

    assert_eq!(app.cancel_job(&first).await.status(), 200);
    assert_eq!(next().await, JobChange::Job(id(&first)));

    sqlx::query(
        "insert into job_metrics (job_id, step, epoch, name, value) values ($1, 1, 0, 'loss', 1.5)",
    )
    .bind(id(&first))
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(next().await, JobChange::Job(id(&first)));

    // A renewed lease of the first job, then a change of the second: only
    // the second is heard.
    sqlx::query("update jobs set lease_expires_at = now() + interval '1 minute' where id = $1")
        .bind(id(&first))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(app.cancel_job(&second).await.status(), 200);
    assert_eq!(next().await, JobChange::Job(id(&second)));

    shutdown.cancel();
    pool.close().await;
    app.stop().await;
}
