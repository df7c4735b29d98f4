//! `pretext models`, `pretext classify` and `pretext embed`: list, show and
//! delete models, download their weights, and run images through them.
//!
//! Images go in multipart requests of at most [`BATCH_IMAGES`] images (the
//! server's default per-request limit) and [`BATCH_BYTES`] bytes, so any
//! number of images takes one command.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::client::{ApiClient, ClientOptions};
use super::output::{self, print_fields, print_json, Table};
use super::CliError;

/// Most images in one inference request.
const BATCH_IMAGES: usize = 256;
/// Most image bytes in one inference request, under the server's default
/// 64 MiB body limit with room for the multipart framing.
const BATCH_BYTES: u64 = 48 << 20;

/// `pretext models …`; the filter options also work without `list`.
#[derive(Args, Debug)]
pub struct ModelsArgs {
    #[command(flatten)]
    client: ClientOptions,
    #[command(subcommand)]
    command: Option<ModelsCommand>,
    #[command(flatten)]
    filter: ModelFilter,
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// List models, newest first (the default).
    List(ModelFilter),
    /// Show a model: kind, classes, input, final metrics.
    Show { id: Uuid },
    /// Download a model's weights as a .safetensors file.
    Download {
        id: Uuid,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Delete a model and its weights.
    Delete { id: Uuid },
}

#[derive(Args, Debug)]
struct ModelFilter {
    /// Only models of this kind.
    #[arg(long, value_parser = ["encoder", "classifier"])]
    kind: Option<String>,
    /// Most models to list.
    #[arg(long)]
    limit: Option<u32>,
}

impl ModelFilter {
    fn is_set(&self) -> bool {
        self.kind.is_some() || self.limit.is_some()
    }

    /// This filter, with what it leaves open taken from `other`.
    fn or(self, other: ModelFilter) -> ModelFilter {
        ModelFilter {
            kind: self.kind.or(other.kind),
            limit: self.limit.or(other.limit),
        }
    }
}

/// `pretext classify …`
#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    client: ClientOptions,
    /// The classifier.
    #[arg(long)]
    model: Uuid,
    /// Predictions per image.
    #[arg(long)]
    top_k: Option<u32>,
    /// Image files (PNG, JPEG, GIF, BMP, WebP, TIFF).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// `pretext embed …`
#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    client: ClientOptions,
    /// The encoder or classifier whose trunk embeds.
    #[arg(long)]
    model: Uuid,
    /// The file to write: JSON `{"model_id", "dim", "embeddings": {path:
    /// [...]}}`, or one `{"path", "embedding"}` object per line when the
    /// name ends in `.jsonl`; with --dataset, a float32 `.npy` matrix, one
    /// row per image in the dataset's order.
    #[arg(long)]
    out: PathBuf,
    /// Embed every image of this dataset on the server (an embed job, which
    /// similarity search then uses) instead of local files.
    #[arg(long, conflicts_with = "images")]
    dataset: Option<Uuid>,
    /// Image files (PNG, JPEG, GIF, BMP, WebP, TIFF).
    #[arg(required_unless_present = "dataset")]
    images: Vec<PathBuf>,
}

/// A model as the API returns it (the fields shown here).
#[derive(Debug, Deserialize)]
struct Model {
    id: Uuid,
    kind: String,
    backbone: String,
    pretext: Option<String>,
    job_id: Uuid,
    base_model_id: Option<Uuid>,
    dataset_id: Option<Uuid>,
    classes: Vec<String>,
    embedding_dim: u32,
    input: ModelInput,
    metrics: BTreeMap<String, Option<f64>>,
    created_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
struct ModelInput {
    image_size: u32,
    channels: u8,
}

#[derive(Debug, Deserialize)]
struct ModelList {
    models: Vec<Model>,
}

#[derive(Debug, Deserialize)]
struct Prediction {
    label: String,
    score: f64,
}

/// Runs `pretext models …`.
pub async fn run(args: ModelsArgs) -> Result<(), CliError> {
    let api = ApiClient::new(&args.client)?;
    let json = args.client.json;
    match args.command {
        None => list(&api, json, args.filter).await,
        Some(ModelsCommand::List(filter)) => list(&api, json, filter.or(args.filter)).await,
        Some(_) if args.filter.is_set() => Err(CliError::Usage(
            "--kind and --limit go with `pretext models list`".into(),
        )),
        Some(ModelsCommand::Show { id }) => {
            let value = api.get_json(&format!("/v1/models/{id}"), &[]).await?;
            if json {
                print_json(&value);
            } else {
                show(&serde_json::from_value(value)?);
            }
            Ok(())
        }
        Some(ModelsCommand::Download { id, out }) => download(&api, json, id, &out).await,
        Some(ModelsCommand::Delete { id }) => {
            api.delete(&format!("/v1/models/{id}")).await?;
            if !json {
                println!("deleted model {id}");
            }
            Ok(())
        }
    }
}

async fn list(api: &ApiClient, json: bool, filter: ModelFilter) -> Result<(), CliError> {
    let mut query = Vec::new();
    if let Some(kind) = filter.kind {
        query.push(("kind", kind));
    }
    if let Some(limit) = filter.limit {
        query.push(("limit", limit.to_string()));
    }
    let value = api.get_json("/v1/models", &query).await?;
    if json {
        print_json(&value);
        return Ok(());
    }
    let list: ModelList = serde_json::from_value(value)?;
    let mut table = Table::new(vec![
        "ID", "KIND", "BACKBONE", "CLASSES", "ACCURACY", "CREATED",
    ]);
    for model in list.models {
        let accuracy = headline_accuracy(&model).map(|a| format!("{a:.3}"));
        table.row(vec![
            model.id.to_string(),
            model.kind,
            model.backbone,
            model.classes.len().to_string(),
            output::or_dash(accuracy),
            output::time(&model.created_at),
        ]);
    }
    table.print("no models; train one with `pretext train pretrain --dataset ID`");
    Ok(())
}

/// The accuracy a model is judged by: validation accuracy for a
/// classifier, pretext accuracy for an encoder.
fn headline_accuracy(model: &Model) -> Option<f64> {
    ["val_accuracy", "train_eval_accuracy", "pretext_accuracy"]
        .iter()
        .find_map(|name| model.metrics.get(*name).copied().flatten())
}

fn show(model: &Model) {
    let classes = if model.classes.is_empty() {
        "-".to_string()
    } else {
        format!("{}: {}", model.classes.len(), model.classes.join(", "))
    };
    print_fields(&[
        ("id", model.id.to_string()),
        ("kind", model.kind.clone()),
        ("backbone", model.backbone.clone()),
        ("pretext", output::or_dash(model.pretext.as_deref())),
        ("classes", classes),
        ("embedding dim", model.embedding_dim.to_string()),
        (
            "input",
            format!(
                "{0}×{0} px, {1} channel{2}",
                model.input.image_size,
                model.input.channels,
                if model.input.channels == 1 { "" } else { "s" }
            ),
        ),
        ("metrics", output::metrics(&model.metrics)),
        ("job", model.job_id.to_string()),
        ("base model", output::or_dash(model.base_model_id)),
        ("dataset", output::or_dash(model.dataset_id)),
        ("created", output::time(&model.created_at)),
    ]);
}

/// Downloads a model's weights to `out`.
async fn download(api: &ApiClient, json: bool, id: Uuid, out: &Path) -> Result<(), CliError> {
    let written = api
        .download(&format!("/v1/models/{id}/weights"), out)
        .await?;
    if json {
        print_json(&json!({"model_id": id, "path": out, "bytes": written}));
    } else {
        println!("wrote {} to {}", output::bytes(written), out.display());
    }
    Ok(())
}

/// Runs `pretext classify`: one line per image with its top labels.
pub async fn classify(args: ClassifyArgs) -> Result<(), CliError> {
    let api = ApiClient::new(&args.client)?;
    let query = args
        .top_k
        .map(|k| format!("?top_k={k}"))
        .unwrap_or_default();
    let responses = infer(&api, args.model, "classify", &query, &args.images).await?;
    let mut predictions = Vec::new();
    for response in responses {
        match response.get("predictions") {
            Some(Value::Array(batch)) => predictions.extend(batch.iter().cloned()),
            _ => return Err(CliError::UnexpectedBody("no `predictions` array".into())),
        }
    }
    check_count(predictions.len(), args.images.len())?;
    if args.client.json {
        print_json(&json!({"model_id": args.model, "predictions": predictions}));
        return Ok(());
    }
    for (path, prediction) in args.images.iter().zip(predictions) {
        let prediction: Vec<Prediction> = serde_json::from_value(prediction)?;
        let labels = prediction
            .iter()
            .map(|p| format!("{}:{:.4}", p.label, p.score))
            .collect::<Vec<_>>()
            .join("  ");
        println!("{}  {labels}", path.display());
    }
    Ok(())
}

/// Runs `pretext embed`: writes every image's embedding to a file.
pub async fn embed(args: EmbedArgs) -> Result<(), CliError> {
    if let Some(dataset) = args.dataset {
        return super::dataset_jobs::embed_dataset(&args.client, dataset, args.model, &args.out)
            .await;
    }
    let api = ApiClient::new(&args.client)?;
    let responses = infer(&api, args.model, "embed", "", &args.images).await?;
    let mut dim = None;
    let mut embeddings = Vec::new();
    for response in responses {
        dim = response.get("dim").and_then(Value::as_u64).or(dim);
        match response.get("embeddings") {
            Some(Value::Array(batch)) => embeddings.extend(batch.iter().cloned()),
            _ => return Err(CliError::UnexpectedBody("no `embeddings` array".into())),
        }
    }
    check_count(embeddings.len(), args.images.len())?;
    let dim = dim.ok_or_else(|| CliError::UnexpectedBody("no `dim`".into()))?;
    let paths: Vec<String> = args
        .images
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    write_embeddings(&args.out, args.model, dim, &paths, embeddings)?;
    if args.client.json {
        print_json(&json!({
            "model_id": args.model, "dim": dim, "count": paths.len(), "out": args.out
        }));
    } else {
        println!(
            "wrote {} embedding{} of dim {dim} to {}",
            paths.len(),
            if paths.len() == 1 { "" } else { "s" },
            args.out.display()
        );
    }
    Ok(())
}

/// The `embed --out FILE.json` file; fields in this order.
#[derive(Serialize)]
struct EmbeddingFile<'a> {
    model_id: Uuid,
    dim: u64,
    embeddings: BTreeMap<&'a str, &'a Value>,
}

/// One line of an `embed --out FILE.jsonl` file.
#[derive(Serialize)]
struct EmbeddingLine<'a> {
    path: &'a str,
    embedding: &'a Value,
}

fn write_embeddings(
    out: &Path,
    model_id: Uuid,
    dim: u64,
    paths: &[String],
    embeddings: Vec<Value>,
) -> Result<(), CliError> {
    let file = std::fs::File::create(out)
        .with_context(|| format!("Failed to create {}", out.display()))?;
    let mut writer = BufWriter::new(file);
    let lines = out.extension().is_some_and(|e| e == "jsonl");
    let written: std::io::Result<()> = (|| {
        if lines {
            for (path, embedding) in paths.iter().zip(&embeddings) {
                serde_json::to_writer(&mut writer, &EmbeddingLine { path, embedding })?;
                writer.write_all(b"\n")?;
            }
        } else {
            let embeddings = paths.iter().map(String::as_str).zip(&embeddings).collect();
            let file = EmbeddingFile {
                model_id,
                dim,
                embeddings,
            };
            serde_json::to_writer(&mut writer, &file)?;
            writer.write_all(b"\n")?;
        }
        writer.flush()
    })();
    written.with_context(|| format!("Failed to write {}", out.display()))?;
    Ok(())
}

/// Sends the images in batches to `/v1/models/{model}/{action}{query}`,
/// with a bar over the images; returns each batch's answer, in order.
async fn infer(
    api: &ApiClient,
    model: Uuid,
    action: &str,
    query: &str,
    images: &[PathBuf],
) -> Result<Vec<Value>, CliError> {
    let sizes = images
        .iter()
        .map(|path| {
            std::fs::metadata(path)
                .map(|m| m.len())
                .with_context(|| format!("Failed to read {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let bar = output::count_bar(images.len() as u64, "images");
    let mut responses = Vec::new();
    for batch in batches(&sizes, BATCH_IMAGES, BATCH_BYTES) {
        let mut form = reqwest::multipart::Form::new();
        for path in &images[batch.clone()] {
            let bytes = tokio::fs::read(path)
                .await
                .with_context(|| format!("Failed to read {}", path.display()))?;
            let part = reqwest::multipart::Part::bytes(bytes)
                .file_name(path.display().to_string())
                .mime_str("application/octet-stream")
                .expect("a valid media type");
            form = form.part("file", part);
        }
        let request = api
            .request(Method::POST, &format!("/v1/models/{model}/{action}{query}"))
            .multipart(form);
        let response = api.send_json(request).await;
        if response.is_err() {
            bar.finish_and_clear();
        }
        responses.push(response?);
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    Ok(responses)
}

/// Consecutive ranges of items, each of at most `max_items` items and, past
/// its first item, at most `max_bytes` bytes.
fn batches(sizes: &[u64], max_items: usize, max_bytes: u64) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, size) in sizes.iter().enumerate() {
        if i > start && (i - start == max_items || bytes + size > max_bytes) {
            ranges.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        ranges.push(start..sizes.len());
    }
    ranges
}

fn check_count(got: usize, sent: usize) -> Result<(), CliError> {
    if got == sent {
        Ok(())
    } else {
        Err(CliError::UnexpectedBody(format!(
            "{got} results for {sent} images"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_on_count_and_on_bytes() {
        assert_eq!(batches(&[], 2, 100), Vec::<Range<usize>>::new());
        assert_eq!(batches(&[1; 5], 2, 100), [0..2, 2..4, 4..5]);
        assert_eq!(batches(&[60, 30, 20, 90], 10, 100), [0..2, 2..3, 3..4]);
        // An image larger than the byte budget still goes, alone.
        assert_eq!(batches(&[10, 500, 10], 10, 100), [0..1, 1..2, 2..3]);
    }
}
