//! One typed method per endpoint over HTTP, shared by a server running in
//! the test process ([`super::TestApp`]) and one running as its own process
//! ([`super::processes::ApiProcess`]).

use std::time::{Duration, Instant};

use serde_json::Value;

/// Where a server listens and the client (with its key) that talks to it.
#[derive(Clone)]
pub struct Api {
    pub address: String,
    pub client: reqwest::Client,
}

impl Api {
    pub fn new(address: String, key: &str) -> Self {
        Self {
            address,
            client: super::client_with_key(key),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn upload_raw(
        &self,
        body: Vec<u8>,
        content_type: &str,
        name: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url("/v1/datasets"))
            .header("content-type", content_type)
            .body(body);
        if let Some(name) = name {
            request = request.query(&[("name", name)]);
        }
        request.send().await.expect("request sent")
    }

    pub async fn upload_zip(&self, archive: Vec<u8>) -> Value {
        let response = self
            .upload_raw(archive, "application/zip", Some("shapes"))
            .await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        response.json().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// `POST /v1/datasets/{id}/search?{query}`, with `image` as the body when given.
    pub async fn search(
        &self,
        dataset_id: &str,
        query: &str,
        image: Option<Vec<u8>>,
    ) -> reqwest::Response {
        let request = self
            .client
            .post(self.url(&format!("/v1/datasets/{dataset_id}/search?{query}")));
        let request = match image {
            Some(png) => request.header("content-type", "image/png").body(png),
            None => request,
        };
        request.send().await.expect("request sent")
    }

    /// `PUT /v1/datasets/{id}/labels` with a label file of `content_type`.
    pub async fn put_labels(
        &self,
        dataset_id: &str,
        content_type: &str,
        file: &str,
    ) -> reqwest::Response {
        self.client
            .put(self.url(&format!("/v1/datasets/{dataset_id}/labels")))
            .header("content-type", content_type)
            .body(file.to_string())
            .send()
            .await
            .expect("request sent")
    }

    /// Submits a job; panics unless it is accepted.
    pub async fn create_job(&self, body: Value) -> Value {
        let response = self.post_json("/v1/jobs", &body).await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        response.json().await.unwrap()
    }

    /// Submits a job and returns its id.
    pub async fn create_job_id(&self, body: Value) -> String {
        let job = self.create_job(body).await;
        job["id"].as_str().expect("a job id").to_string()
    }

    pub async fn cancel_job(&self, id: &str) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/jobs/{id}/cancel")))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn job(&self, id: &str) -> Value {
        self.get_json(&format!("/v1/jobs/{id}")).await
    }

    /// The steps at which job `id` recorded metric `name`, in order.
    pub async fn metric_steps(&self, id: &str, name: &str) -> Vec<i64> {
        let metrics = self
            .get_json(&format!("/v1/jobs/{id}/metrics?name={name}"))
            .await;
        metrics["points"]
            .as_array()
            .unwrap_or_else(|| panic!("no points: {metrics}"))
            .iter()
            .map(|p| p["step"].as_i64().unwrap())
            .collect()
    }

    /// Polls a job until `done` holds for it, or panics after `timeout`.
    pub async fn wait_for_job(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            assert!(
                start.elapsed() < timeout,
                "job {id} did not get there in {timeout:?}: {job:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls a job until it ends; panics unless it succeeded.
    pub async fn wait_for_success(&self, id: &str, timeout: Duration) -> Value {
        let job = self
            .wait_for_job(id, timeout, |j| {
                matches!(
                    j["state"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                )
            })
            .await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        job
    }

    pub async fn post_image(
        &self,
        model_id: &str,
        action: &str,
        query: &str,
        png: Vec<u8>,
    ) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/models/{model_id}/{action}{query}")))
            .header("content-type", "image/png")
            .body(png)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_images(
        &self,
        model_id: &str,
        action: &str,
        query: &str,
        pngs: Vec<Vec<u8>>,
    ) -> reqwest::Response {
        let mut form = reqwest::multipart::Form::new();
        for (i, png) in pngs.into_iter().enumerate() {
            let part = reqwest::multipart::Part::bytes(png)
                .file_name(format!("{i}.png"))
                .mime_str("image/png")
                .unwrap();
            form = form.part("file", part);
        }
        self.client
            .post(self.url(&format!("/v1/models/{model_id}/{action}{query}")))
            .multipart(form)
            .send()
            .await
            .expect("request sent")
    }
}
