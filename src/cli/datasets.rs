//! `pretext datasets`: upload a folder or an archive with a progress bar,
//! list, show and delete datasets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use futures_util::TryStreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use tokio_util::io::ReaderStream;
use uuid::Uuid;

use super::client::{ApiClient, ClientOptions};
use super::output::{self, print_fields, print_json, Table};
use super::{pack, CliError};

/// `pretext datasets …`
#[derive(Args, Debug)]
pub struct DatasetsArgs {
    #[command(flatten)]
    client: ClientOptions,
    #[command(subcommand)]
    command: DatasetsCommand,
}

#[derive(Subcommand, Debug)]
enum DatasetsCommand {
    /// Upload a folder of images (one subfolder per class makes a labelled
    /// dataset) or a .zip, .tar or .tar.gz archive.
    Upload {
        /// A folder (packed into a .tar.gz on the fly) or an archive file.
        path: PathBuf,
        /// Dataset name; default the folder's or archive's name.
        #[arg(long)]
        name: Option<String>,
    },
    /// List datasets, newest first.
    List {
        /// Most datasets to list.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show a dataset: classes, counts, skipped entries.
    Show { id: Uuid },
    /// Delete a dataset and its stored images.
    Delete { id: Uuid },
}

/// A dataset as the API returns it (the fields shown here).
#[derive(Debug, Deserialize)]
struct Dataset {
    id: Uuid,
    name: String,
    num_images: u64,
    labeled: bool,
    channels: u8,
    classes: Vec<String>,
    class_counts: BTreeMap<String, u64>,
    skipped: Vec<SkippedEntry>,
    skipped_count: u64,
    bytes: u64,
    median_side: u32,
    created_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
struct SkippedEntry {
    path: String,
    reason: String,
}

#[derive(Debug, Deserialize)]
struct DatasetList {
    datasets: Vec<Dataset>,
}

/// Runs `pretext datasets …`.
pub async fn run(args: DatasetsArgs) -> Result<(), CliError> {
    let api = ApiClient::new(&args.client)?;
    let json = args.client.json;
    match args.command {
        DatasetsCommand::Upload { path, name } => upload(&api, json, &path, name).await,
        DatasetsCommand::List { limit } => {
            let query: Vec<_> = limit
                .map(|l| ("limit", l.to_string()))
                .into_iter()
                .collect();
            let value = api.get_json("/v1/datasets", &query).await?;
            if json {
                print_json(&value);
                return Ok(());
            }
            let list: DatasetList = serde_json::from_value(value)?;
            let mut table = Table::new(vec!["ID", "NAME", "IMAGES", "CLASSES", "CREATED"]);
            for d in list.datasets {
                let classes = if d.labeled {
                    d.classes.len().to_string()
                } else {
                    "unlabelled".to_string()
                };
                table.row(vec![
                    d.id.to_string(),
                    d.name,
                    d.num_images.to_string(),
                    classes,
                    output::time(&d.created_at),
                ]);
            }
            table.print("no datasets yet; upload one with `pretext datasets upload FOLDER`");
            Ok(())
        }
        DatasetsCommand::Show { id } => {
            let value = api.get_json(&format!("/v1/datasets/{id}"), &[]).await?;
            print_dataset(value, json)
        }
        DatasetsCommand::Delete { id } => {
            api.delete(&format!("/v1/datasets/{id}")).await?;
            if !json {
                println!("deleted dataset {id}");
            }
            Ok(())
        }
    }
}

/// Uploads a folder (packed first) or an archive, with a bar over the bytes
/// sent, and prints the stored dataset.
async fn upload(
    api: &ApiClient,
    json: bool,
    path: &Path,
    name: Option<String>,
) -> Result<(), CliError> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("Failed to read {}", path.display()))?;
    let name = match name {
        Some(name) => name,
        None => default_name(path)?,
    };
    // Held until the upload ends: dropping it deletes the packed archive.
    let packed;
    let archive = if metadata.is_dir() {
        packed = pack(path).await?;
        packed.path().to_path_buf()
    } else {
        path.to_path_buf()
    };

    let file = tokio::fs::File::open(&archive)
        .await
        .with_context(|| format!("Failed to open {}", archive.display()))?;
    let total = file
        .metadata()
        .await
        .with_context(|| format!("Failed to read {}", archive.display()))?
        .len();
    let bar = output::byte_bar(total, "uploading");
    let counter = bar.clone();
    let body = ReaderStream::new(file).inspect_ok(move |chunk| {
        counter.inc(chunk.len() as u64);
        if counter.position() >= total {
            counter.set_message("decoding on the server");
        }
    });
    let request = api
        .request(Method::POST, "/v1/datasets")
        .query(&[("name", &name)])
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, total)
        .body(reqwest::Body::wrap_stream(body));
    let result = api.send_json(request).await;
    bar.finish_and_clear();
    print_dataset(result?, json)
}

/// Packs a folder into a temporary .tar.gz, off the async threads.
async fn pack(folder: &Path) -> Result<tempfile::NamedTempFile, CliError> {
    let folder = folder.to_path_buf();
    let bar = output::spinner("packing");
    let packer = bar.clone();
    let packed = tokio::task::spawn_blocking(move || {
        let files = pack::files_under(&folder)?;
        anyhow::ensure!(
            !files.is_empty(),
            "{} holds no files; put images in it, one subfolder per class",
            folder.display()
        );
        packer.set_length(files.len() as u64);
        packer.set_message(format!("packing {} files", files.len()));
        pack::pack_folder(&folder, &files, || packer.inc(1))
    })
    .await
    .context("The packing task failed")?;
    bar.finish_and_clear();
    Ok(packed?)
}

/// The name of a folder, or of an archive without its extension.
fn default_name(path: &Path) -> Result<String, CliError> {
    let absolute = std::fs::canonicalize(path)
        .with_context(|| format!("Failed to resolve {}", path.display()))?;
    let file_name = absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".to_string());
    if absolute.is_dir() {
        return Ok(file_name);
    }
    let lower = file_name.to_ascii_lowercase();
    let stem_len = [".tar.gz", ".tgz", ".tar", ".zip"]
        .iter()
        .find(|ext| lower.ends_with(*ext) && lower.len() > ext.len())
        .map(|ext| file_name.len() - ext.len())
        .unwrap_or(file_name.len());
    Ok(file_name[..stem_len].to_string())
}

/// Skipped entries listed by name; the rest are counted.
const SKIPPED_SHOWN: usize = 10;

fn print_dataset(value: Value, json: bool) -> Result<(), CliError> {
    if json {
        print_json(&value);
        return Ok(());
    }
    let d: Dataset = serde_json::from_value(value)?;
    let classes = if d.labeled {
        let counts = d
            .classes
            .iter()
            .map(|c| format!("{c} ({})", d.class_counts.get(c).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ");
        format!("{}: {counts}", d.classes.len())
    } else {
        "none (unlabelled)".to_string()
    };
    print_fields(&[
        ("id", d.id.to_string()),
        ("name", d.name),
        (
            "images",
            format!(
                "{} ({} channel{}, median side {} px, {})",
                d.num_images,
                d.channels,
                if d.channels == 1 { "" } else { "s" },
                d.median_side,
                output::bytes(d.bytes)
            ),
        ),
        ("classes", classes),
        ("skipped", d.skipped_count.to_string()),
        ("created", output::time(&d.created_at)),
    ]);
    for entry in d.skipped.iter().take(SKIPPED_SHOWN) {
        println!("  skipped {}: {}", entry.path, entry.reason);
    }
    let shown = d.skipped.len().min(SKIPPED_SHOWN) as u64;
    if d.skipped_count > shown {
        println!(
            "  … and {} more (the first 100 are in `pretext datasets show {} --json`)",
            d.skipped_count - shown,
            d.id
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_dataset_after_its_archive_or_folder() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("shapes");
        std::fs::create_dir(&folder).unwrap();
        assert_eq!(default_name(&folder).unwrap(), "shapes");
        for (file, name) in [
            ("pets.tar.gz", "pets"),
            ("pets.TGZ", "pets"),
            ("cells.zip", "cells"),
            ("raw.tar", "raw"),
            ("odd.bin", "odd.bin"),
        ] {
            let path = dir.path().join(file);
            std::fs::write(&path, b"").unwrap();
            assert_eq!(default_name(&path).unwrap(), name);
        }
    }
}
