//! Running a stored model over every image of a dataset, for the jobs that
//! leave files rather than a model: `embed` (every image's embedding, as
//! `embeddings.npy`, with `images.csv` naming its rows, and for a classifier
//! its class probabilities, `probabilities.npy`) and `predict` (every
//! image's most probable classes, as `predictions.csv` and
//! `predictions.jsonl`). Rows follow the dataset's archive order, so row `i`
//! is image `i` of `/v1/datasets/{id}/images`. The files are written whole,
//! at the end, into the job's output folder: a job stopped before its end
//! leaves none.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use super::inference::{LoadedModel, ModelHandle};
use super::training::{
    JobOutputs, OutputFile, StopReason, TrainingContext, TrainingEvent, TrainingOutcome,
};
use crate::data::labels::LabelSet;
use crate::data::loader::load_image_set;
use crate::data::manifest::Manifest;
use crate::data::npy::write_f32_matrix;
use crate::jobs::config::{EmbedConfig, PredictConfig};
use crate::storage::write_atomic_with;

/// An embed job's matrix of embeddings, one float32 row per image.
pub const EMBEDDINGS_FILE: &str = "embeddings.npy";
/// An embed job's names of its rows: `image_id,path,label`.
pub const IMAGES_FILE: &str = "images.csv";
/// An embed job's class probabilities (classifiers only), one row per image.
pub const PROBABILITIES_FILE: &str = "probabilities.npy";
/// A predict job's table: `image_id,path,label`, then class and score pairs.
pub const PREDICTIONS_CSV: &str = "predictions.csv";
/// A predict job's lines: `{"image_id", "path", "label", "predictions"}`.
pub const PREDICTIONS_JSONL: &str = "predictions.jsonl";

/// Every file name a job may leave, with its media type.
pub const OUTPUT_FILES: [(&str, &str); 5] = [
    (EMBEDDINGS_FILE, "application/octet-stream"),
    (IMAGES_FILE, "text/csv"),
    (PROBABILITIES_FILE, "application/octet-stream"),
    (PREDICTIONS_CSV, "text/csv"),
    (PREDICTIONS_JSONL, "application/jsonl"),
];

/// What a dataset pass runs: the model, the dataset, where the files go.
pub struct DatasetPass<'a> {
    pub model: &'a ModelHandle,
    pub dataset_dir: &'a Path,
    pub outputs_dir: &'a Path,
    /// The dataset's labels sent after its upload, for the `label` column;
    /// without them, the archive's.
    pub labels: Option<&'a LabelSet>,
}

/// One image's row: its id (archive index), archive path and known label.
struct ImageRow<'a> {
    id: usize,
    path: &'a str,
    label: Option<&'a str>,
}

fn image_rows<'a>(manifest: &'a Manifest, labels: Option<&'a LabelSet>) -> Vec<ImageRow<'a>> {
    manifest
        .entries
        .iter()
        .enumerate()
        .map(|(id, entry)| ImageRow {
            id,
            path: &entry.source,
            label: match labels {
                Some(labels) => labels.class_of(id),
                None => entry
                    .label
                    .and_then(|l| manifest.classes.get(l))
                    .map(String::as_str),
            },
        })
        .collect()
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// Runs the model over every image, `batch_size` at a time, handing each
/// batch's features, and class probabilities when `classify`, to `take`;
/// `Some` when the job was asked to stop first.
fn run_over_dataset(
    ctx: &TrainingContext,
    pass: &DatasetPass,
    batch_size: i64,
    classify: bool,
    mut take: impl FnMut(&Tensor, Option<&Tensor>) -> anyhow::Result<()>,
) -> anyhow::Result<Option<StopReason>> {
    let input = &pass.model.input;
    let set = load_image_set(
        pass.dataset_dir,
        input.image_size,
        input.channels,
        ctx.max_image_pixels,
    )?;
    let model = LoadedModel::load(pass.model, ctx.device)?;
    let count = set.len() as i64;
    let steps = (count + batch_size - 1) / batch_size;
    ctx.emit(TrainingEvent::Plan {
        epochs: 1,
        steps,
        start_step: 0,
    });
    let started = Instant::now();
    for (step, start) in (0..count).step_by(batch_size as usize).enumerate() {
        if let Some(reason) = ctx.stop.requested() {
            return Ok(Some(reason));
        }
        let batch = set.images.narrow(0, start, batch_size.min(count - start));
        let (features, probabilities) = model.forward(&batch, input, classify, ctx.device);
        if classify && probabilities.is_none() {
            anyhow::bail!("model {} has no classes", pass.model.id);
        }
        let on_cpu = |t: &Tensor| t.to_kind(Kind::Float).to_device(Device::Cpu);
        take(
            &on_cpu(&features),
            probabilities.as_ref().map(on_cpu).as_ref(),
        )?;
        let done = (start + batch.size()[0]) as f64;
        ctx.emit(TrainingEvent::Report {
            epoch: 0,
            step: step as i64 + 1,
            metrics: vec![(
                "images_per_sec".to_string(),
                done / started.elapsed().as_secs_f64().max(1e-9),
            )],
        });
    }
    Ok(None)
}

/// Writes `name` in the output folder with `write`, whole or not at all,
/// and describes it.
fn write_output(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut BufWriter<std::fs::File>) -> anyhow::Result<()>,
) -> anyhow::Result<OutputFile> {
    let path = dir.join(name);
    write_atomic_with(&path, |tmp| {
        let mut out = BufWriter::new(std::fs::File::create(tmp)?);
        write(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })
    .with_context(|| format!("Failed to write {}", path.display()))?;
    let media_type = OUTPUT_FILES
        .iter()
        .find(|(file, _)| *file == name)
        .map_or("application/octet-stream", |(_, media_type)| media_type);
    Ok(OutputFile {
        name: name.to_string(),
        media_type: media_type.to_string(),
        bytes: std::fs::metadata(&path)?.len(),
    })
}

/// An embed job: every image's embedding, the names of the rows, and for a
/// classifier (whose `classes` are given) its probabilities.
pub fn run_embed(
    ctx: &TrainingContext,
    pass: &DatasetPass,
    classes: &[String],
    config: &EmbedConfig,
) -> anyhow::Result<TrainingOutcome> {
    let manifest = Manifest::read(pass.dataset_dir)?;
    let classify = pass.model.num_classes.is_some();
    let (mut values, mut probabilities): (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
    let (mut dim, mut width) = (0, 0);
    let stopped = run_over_dataset(ctx, pass, config.batch_size, classify, |rows, probs| {
        dim = rows.size()[1] as usize;
        values.extend(Vec::<f32>::try_from(rows.flatten(0, -1))?);
        if let Some(probs) = probs {
            width = probs.size()[1] as usize;
            probabilities.extend(Vec::<f32>::try_from(probs.flatten(0, -1))?);
        }
        Ok(())
    })?;
    if let Some(reason) = stopped {
        return Ok(TrainingOutcome::Stopped(reason));
    }
    let rows = image_rows(&manifest, pass.labels);
    let embeddings = write_output(pass.outputs_dir, EMBEDDINGS_FILE, |out| {
        Ok(write_f32_matrix(out, &values, dim)?)
    })?;
    let names = write_output(pass.outputs_dir, IMAGES_FILE, |out| {
        writeln!(out, "image_id,path,label")?;
        for row in &rows {
            writeln!(
                out,
                "{},{},{}",
                row.id,
                csv_field(row.path),
                csv_field(row.label.unwrap_or(""))
            )?;
        }
        Ok(())
    })?;
    let mut files = vec![embeddings, names];
    if classify {
        files.push(write_output(pass.outputs_dir, PROBABILITIES_FILE, |out| {
            Ok(write_f32_matrix(out, &probabilities, width)?)
        })?);
    }
    Ok(TrainingOutcome::Wrote(JobOutputs {
        images: rows.len(),
        files,
        embedding_dim: Some(dim as i64),
        classes: classify.then(|| classes.to_vec()),
    }))
}

/// The `k` most probable classes of each row, most probable first.
fn top_classes(probabilities: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut ranked: Vec<(usize, f32)> = probabilities.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(k);
    ranked
}

/// A predict job: every image's `top_k` classes with their probabilities.
pub fn run_predict(
    ctx: &TrainingContext,
    pass: &DatasetPass,
    classes: &[String],
    config: &PredictConfig,
) -> anyhow::Result<TrainingOutcome> {
    let manifest = Manifest::read(pass.dataset_dir)?;
    let k = (config.top_k as usize).min(classes.len());
    let mut ranked: Vec<Vec<(usize, f32)>> = Vec::with_capacity(manifest.entries.len());
    let stopped = run_over_dataset(ctx, pass, config.batch_size, true, |_, probabilities| {
        let probabilities = probabilities.expect("a classifier's pass has probabilities");
        for row in Vec::<Vec<f32>>::try_from(probabilities)? {
            ranked.push(top_classes(&row, k));
        }
        Ok(())
    })?;
    if let Some(reason) = stopped {
        return Ok(TrainingOutcome::Stopped(reason));
    }
    let rows = image_rows(&manifest, pass.labels);
    let class = |i: usize| classes.get(i).map_or("?", String::as_str);
    let table = write_output(pass.outputs_dir, PREDICTIONS_CSV, |out| {
        write!(out, "image_id,path,label")?;
        for rank in 1..=k {
            write!(out, ",class_{rank},score_{rank}")?;
        }
        writeln!(out)?;
        for (row, top) in rows.iter().zip(&ranked) {
            write!(
                out,
                "{},{},{}",
                row.id,
                csv_field(row.path),
                csv_field(row.label.unwrap_or(""))
            )?;
            for &(i, score) in top {
                write!(out, ",{},{score}", csv_field(class(i)))?;
            }
            writeln!(out)?;
        }
        Ok(())
    })?;
    let lines = write_output(pass.outputs_dir, PREDICTIONS_JSONL, |out| {
        for (row, top) in rows.iter().zip(&ranked) {
            let predictions: Vec<serde_json::Value> = top
                .iter()
                .map(|&(i, score)| serde_json::json!({ "label": class(i), "score": score }))
                .collect();
            let line = serde_json::json!({
                "image_id": row.id,
                "path": row.path,
                "label": row.label,
                "predictions": predictions,
            });
            writeln!(out, "{line}")?;
        }
        Ok(())
    })?;
    Ok(TrainingOutcome::Wrote(JobOutputs {
        images: rows.len(),
        files: vec![table, lines],
        embedding_dim: None,
        classes: Some(classes.to_vec()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("shirt/001.png"), "shirt/001.png");
        assert_eq!(csv_field("a,b.png"), "\"a,b.png\"");
        assert_eq!(csv_field("say \"hi\".png"), "\"say \"\"hi\"\".png\"");
    }

    #[test]
    fn top_classes_are_the_most_probable_first() {
        let ranked = top_classes(&[0.1, 0.6, 0.05, 0.25], 2);
        assert_eq!(ranked, vec![(1, 0.6), (3, 0.25)]);
        assert_eq!(top_classes(&[0.5, 0.5], 5), vec![(0, 0.5), (1, 0.5)]);
    }
}
