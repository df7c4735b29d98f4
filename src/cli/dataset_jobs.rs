//! The labelling loop from the command line: `pretext select` (which images
//! to label next, optionally as a CSV to fill in), `pretext label` (a label
//! file applied to a dataset), `pretext search` (a dataset's images most
//! similar to one), `pretext predict` (a predict job followed with a progress bar,
//! its CSV or JSON Lines written locally) and `pretext embed --dataset` (an
//! embed job, its `embeddings.npy` written locally).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use super::client::{ApiClient, ClientOptions};
use super::jobs::follow_to_end;
use super::output::{self, print_fields, print_json, Table};
use super::CliError;
use crate::db::jobs::JobState;

/// `pretext label`.
#[derive(Args, Debug)]
pub struct LabelArgs {
    #[command(flatten)]
    client: ClientOptions,
    /// The dataset to label.
    #[arg(long)]
    dataset: Uuid,
    /// The label file: CSV with a header naming `image_id` or `path`, and
    /// `label`; or JSON Lines (`.jsonl`, `.ndjson`) of `{"image_id" or
    /// "path", "label"}` objects.
    file: PathBuf,
}

/// `pretext search`.
#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    client: ClientOptions,
    /// The dataset to search.
    #[arg(long)]
    dataset: Uuid,
    /// The model whose embeddings compare images (the dataset must have
    /// been embedded with it: `pretext embed --dataset … --model …`).
    #[arg(long)]
    model: Uuid,
    /// Search from this image of the dataset.
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    image_id: Option<u64>,
    /// Search from this image file.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Images to return.
    #[arg(short, long, default_value_t = 10)]
    k: u32,
}

/// `pretext select`.
#[derive(Args, Debug)]
pub struct SelectArgs {
    #[command(flatten)]
    client: ClientOptions,
    /// The dataset to choose from (its unlabelled images).
    #[arg(long)]
    dataset: Uuid,
    /// The model whose embeddings (and, for uncertainty, probabilities) to
    /// use; the dataset must have been embedded with it.
    #[arg(long)]
    model: Uuid,
    /// Images to choose.
    #[arg(long, default_value_t = 100)]
    budget: u32,
    /// representative, diversity, uncertainty or uncertain_diverse (the
    /// server's default when omitted).
    #[arg(long)]
    strategy: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the chosen images as a CSV to fill in (`image_id,path,label`
    /// with the labels empty), for `pretext label`.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `pretext predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    client: ClientOptions,
    /// The dataset whose every image to classify.
    #[arg(long)]
    dataset: Uuid,
    /// The classifier.
    #[arg(long)]
    model: Uuid,
    /// Classes per image, most probable first.
    #[arg(long, default_value_t = 5)]
    top_k: u32,
    /// The file to write: JSON Lines when its name ends in `.jsonl`, else CSV.
    #[arg(long)]
    out: PathBuf,
}

/// The media type of a label file, by its extension.
fn label_media_type(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "ndjson") => "application/jsonl",
        _ => "text/csv",
    }
}

/// Runs `pretext label`.
pub async fn label(args: LabelArgs) -> Result<(), CliError> {
    let api = ApiClient::new(&args.client)?;
    let body = tokio::fs::read(&args.file)
        .await
        .with_context(|| format!("Failed to read {}", args.file.display()))?;
    let request = api
        .request(
            Method::PUT,
            &format!("/v1/datasets/{}/labels", args.dataset),
        )
        .header("content-type", label_media_type(&args.file))
        .body(body);
    let value = api.send_json(request).await?;
    if args.client.json {
        print_json(&value);
        return Ok(());
    }
    let number = |key: &str| value[key].as_u64().unwrap_or(0).to_string();
    print_fields(&[
        ("dataset", args.dataset.to_string()),
        ("label version", number("version")),
        ("changed", number("changed")),
        ("labelled", number("labelled")),
        ("classes", class_counts(&value["class_counts"])),
    ]);
    Ok(())
}

/// `{"a": 5, "b": 3}` as `a 5, b 3`.
fn class_counts(counts: &Value) -> String {
    let counts: Vec<String> = counts
        .as_object()
        .into_iter()
        .flatten()
        .map(|(class, count)| format!("{class} {count}"))
        .collect();
    output::or_dash((!counts.is_empty()).then(|| counts.join(", ")))
}

/// Runs `pretext select`.
pub async fn select(args: SelectArgs) -> Result<(), CliError> {
    let api = ApiClient::new(&args.client)?;
    let mut body = json!({"budget": args.budget, "model_id": args.model, "seed": args.seed});
    if let Some(strategy) = &args.strategy {
        body["strategy"] = json!(strategy);
    }
    let value = api
        .post_json(
            &format!("/v1/datasets/{}/selections", args.dataset),
            Some(&body),
        )
        .await?;
    let images: Vec<(u64, String)> = value["images"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|image| {
            let id = image["image_id"].as_u64().unwrap_or(0);
            (id, image["path"].as_str().unwrap_or("").to_string())
        })
        .collect();
    if let Some(out) = &args.out {
        write_label_template(out, &images)
            .with_context(|| format!("Failed to write {}", out.display()))?;
    }
    if args.client.json {
        print_json(&value);
        return Ok(());
    }
    let mut table = Table::new(vec!["IMAGE", "PATH"]);
    for (id, path) in &images {
        table.row(vec![id.to_string(), path.clone()]);
    }
    table.print("no image left to choose");
    eprintln!(
        "selection {} ({}){}",
        value["id"].as_str().unwrap_or("?"),
        value["strategy"].as_str().unwrap_or("?"),
        args.out
            .as_ref()
            .map(|out| format!(
                "; fill in the labels of {} and run `pretext label`",
                out.display()
            ))
            .unwrap_or_default()
    );
    Ok(())
}

/// The chosen images as a label file to fill in: `image_id,path,label`,
/// labels empty.
fn write_label_template(out: &Path, images: &[(u64, String)]) -> anyhow::Result<()> {
    let mut writer = csv::Writer::from_path(out)?;
    writer.write_record(["image_id", "path", "label"])?;
    for (id, path) in images {
        writer.write_record([id.to_string().as_str(), path, ""])?;
    }
    writer.flush()?;
    Ok(())
}

/// Runs `pretext search`.
pub async fn search(args: SearchArgs) -> Result<(), CliError> {
    let api = ApiClient::new(&args.client)?;
    let mut query = vec![
        ("model_id", args.model.to_string()),
        ("k", args.k.to_string()),
    ];
    let mut request = api.request(
        Method::POST,
        &format!("/v1/datasets/{}/search", args.dataset),
    );
    match (&args.image, args.image_id) {
        (Some(file), _) => {
            let bytes = tokio::fs::read(file)
                .await
                .with_context(|| format!("Failed to read {}", file.display()))?;
            request = request
                .header("content-type", "application/octet-stream")
                .body(bytes);
        }
        (None, Some(id)) => query.push(("image_id", id.to_string())),
        (None, None) => return Err(CliError::Usage("give --image-id or --image".to_string())),
    }
    let value = api.send_json(request.query(&query)).await?;
    if args.client.json {
        print_json(&value);
        return Ok(());
    }
    let mut table = Table::new(vec!["IMAGE", "SCORE", "LABEL", "PATH"]);
    for hit in value["results"].as_array().into_iter().flatten() {
        table.row(vec![
            hit["image_id"].to_string(),
            format!("{:.4}", hit["score"].as_f64().unwrap_or(f64::NAN)),
            output::or_dash(hit["label"].as_str()),
            hit["path"].as_str().unwrap_or("").to_string(),
        ]);
    }
    table.print("no images found");
    Ok(())
}

/// Submits a job that runs `model` over `dataset`, follows it, and
/// downloads its file `name` to `out`.
async fn run_and_download(
    api: &ApiClient,
    json: bool,
    request: Value,
    name: &str,
    out: &Path,
) -> Result<(), CliError> {
    let job: Value = api.post_json("/v1/jobs", Some(&request)).await?;
    let id: Uuid = serde_json::from_value(job["id"].clone())?;
    if !json {
        eprintln!(
            "queued {} job {id}",
            request["kind"].as_str().unwrap_or("?")
        );
    }
    let (job, _) = follow_to_end(api, id).await?;
    if job.state != JobState::Succeeded {
        return Err(CliError::JobEnded {
            id,
            state: job.state.to_string(),
            reason: job.error,
        });
    }
    let written = api
        .download(&format!("/v1/jobs/{id}/outputs/{name}"), out)
        .await?;
    if json {
        print_json(&json!({"job_id": id, "file": name, "path": out, "bytes": written}));
    } else {
        println!("wrote {} to {}", output::bytes(written), out.display());
    }
    Ok(())
}

/// Runs `pretext predict`.
pub async fn predict(args: PredictArgs) -> Result<(), CliError> {
    let api = ApiClient::new(&args.client)?;
    let name = match args.out.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => "predictions.jsonl",
        _ => "predictions.csv",
    };
    let request = json!({
        "kind": "predict",
        "dataset_id": args.dataset,
        "base_model_id": args.model,
        "config": {"top_k": args.top_k},
    });
    run_and_download(&api, args.client.json, request, name, &args.out).await
}

/// Runs `pretext embed --dataset`: every image's embedding, as `.npy`.
pub async fn embed_dataset(
    client: &ClientOptions,
    dataset: Uuid,
    model: Uuid,
    out: &Path,
) -> Result<(), CliError> {
    let api = ApiClient::new(client)?;
    let request = json!({"kind": "embed", "dataset_id": dataset, "base_model_id": model});
    run_and_download(&api, client.json, request, "embeddings.npy", out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_files_are_sent_as_their_extension_says() {
        assert_eq!(
            label_media_type(Path::new("labels.jsonl")),
            "application/jsonl"
        );
        assert_eq!(
            label_media_type(Path::new("labels.ndjson")),
            "application/jsonl"
        );
        assert_eq!(label_media_type(Path::new("labels.csv")), "text/csv");
    }
}
