//! Fuzzing of every function that reads user bytes: archive ingestion,
//! image decoding and resizing, multipart bodies, job configs and label
//! files. Each target mutates its seed corpus (`tests/fuzz/corpus/`) for a
//! time budget and checks what must hold for any input: no panic, a clear
//! error for what is refused, and for what is accepted, the invariants the
//! rest of the service relies on. See [`harness`] for the settings.

mod harness;

use std::path::Path;

use axum::body::Body;
use axum::http::{header, Request};
use pretext::data::archive::{detect_kind, ingest_archive, ArchiveLimits, IngestError};
use pretext::data::decode::{decode_image, to_chw_u8};
use pretext::data::labels::{parse_label_file, ImageLookup, LabelFileFormat};
use pretext::data::manifest::{Manifest, ManifestEntry};
use pretext::http::error::ApiError;
use pretext::http::extract::read_images;
use pretext::jobs::config::{
    DefaultsFrom, EvaluateConfigRequest, FinetuneConfigRequest, PretrainConfigRequest,
};
use pretext::ml::backbone::Backbone;
use pretext::validation::FieldError;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use harness::{corpus, fuzz, mutated, Verdict};

/// Small limits, so that a mutated size field hits them quickly.
const LIMITS: ArchiveLimits = ArchiveLimits {
    max_entries: 64,
    max_uncompressed_bytes: 1 << 20,
    max_image_pixels: 1 << 16,
};

/// Every file under `dir`, failing on anything that is neither a file nor
/// a folder (a link an archive smuggled in).
fn files_under(dir: &Path) -> Result<Vec<std::path::PathBuf>, TestCaseError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| TestCaseError::fail(e.to_string()))? {
        let entry = entry.map_err(|e| TestCaseError::fail(e.to_string()))?;
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files.extend(files_under(&entry.path())?);
        } else if kind.is_file() {
            files.push(entry.path());
        } else {
            return Err(TestCaseError::fail(format!(
                "{} is neither a file nor a folder",
                entry.path().display()
            )));
        }
    }
    Ok(files)
}

#[test]
fn archives_are_stored_within_their_limits_or_refused_as_the_users_fault() {
    fuzz("archive", 32, mutated(corpus("archive")), |bytes| {
        let work = tempfile::tempdir().unwrap();
        let upload = work.path().join("upload");
        std::fs::write(&upload, &bytes).unwrap();
        let Some(kind) = detect_kind(&upload).unwrap() else {
            return Ok(Verdict::Refused);
        };
        let dataset = work.path().join("dataset");
        std::fs::create_dir(&dataset).unwrap();
        match ingest_archive(&upload, kind, &dataset, LIMITS) {
            Ok(report) => {
                prop_assert!(report.num_images >= 1);
                prop_assert!(report.num_images as u64 <= LIMITS.max_entries);
                prop_assert!(report.bytes <= LIMITS.max_uncompressed_bytes);
                let manifest =
                    Manifest::read(&dataset).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
                prop_assert_eq!(manifest.entries.len(), report.num_images);
                prop_assert_eq!(&manifest.classes, &report.classes);
                for entry in &manifest.entries {
                    prop_assert!(dataset.join(&entry.file).is_file(), "{}", entry.file);
                    prop_assert!(!entry.file.contains(".."), "{}", entry.file);
                    if let Some(label) = entry.label {
                        prop_assert!(label < manifest.classes.len());
                    }
                }
                let stored = files_under(&dataset)?;
                prop_assert!(stored.len() > report.num_images, "images and the manifest");
                Ok(Verdict::Accepted)
            }
            // A fault of the server's own (its disk), not of the bytes sent.
            Err(IngestError::Io(error)) => Err(TestCaseError::fail(format!(
                "an archive's bytes made an I/O error (a 500): {error:#}"
            ))),
            Err(refused) => {
                prop_assert!(!refused.to_string().is_empty());
                Ok(Verdict::Refused)
            }
        }
    });
}

#[test]
fn images_decode_within_the_pixel_limit_and_resize_to_the_asked_shape() {
    fuzz("image", 256, mutated(corpus("image")), |bytes| {
        let max_pixels = 1 << 16;
        match decode_image(&bytes, max_pixels) {
            Ok(image) => {
                let (width, height) = (image.width() as u64, image.height() as u64);
                prop_assert!(width >= 1 && height >= 1);
                prop_assert!(width * height <= max_pixels);
                for channels in [1u8, 3] {
                    let tensor = to_chw_u8(&image, 12, channels);
                    prop_assert_eq!(tensor.len(), 12 * 12 * channels as usize);
                }
                Ok(Verdict::Accepted)
            }
            Err(reason) => {
                prop_assert!(!reason.is_empty());
                Ok(Verdict::Refused)
            }
        }
    });
}

#[test]
fn multipart_bodies_give_their_parts_or_a_client_error() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let boundary = prop::sample::select(vec!["fuzzboundary", "other", ""]);
    fuzz(
        "multipart",
        256,
        (mutated(corpus("multipart")), boundary),
        |(body, boundary)| {
            let length = body.len();
            let request = Request::builder()
                .header(
                    header::CONTENT_TYPE,
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(Body::from(body))
                .unwrap();
            match runtime.block_on(read_images(request, 4, 1 << 20)) {
                Ok(parts) => {
                    prop_assert!((1..=4).contains(&parts.len()));
                    let total: usize = parts.iter().map(|p| p.bytes.len()).sum();
                    prop_assert!(total <= length);
                    Ok(Verdict::Accepted)
                }
                Err(ApiError::BadRequest(_) | ApiError::PayloadTooLarge(_)) => Ok(Verdict::Refused),
                Err(other) => Err(TestCaseError::fail(format!(
                    "a multipart body was refused with neither 400 nor 413: {other:?}"
                ))),
            }
        },
    );
}

/// JSON values for configs: mostly objects whose keys are real field
/// names, with values of every JSON kind around their edges.
fn config_json() -> impl Strategy<Value = serde_json::Value> {
    let key = prop::sample::select(vec![
        "pretext",
        "backbone",
        "image_size",
        "epochs",
        "batch_size",
        "learning_rate",
        "weight_decay",
        "seed",
        "checkpoint_interval_secs",
        "max_steps",
        "eval_dataset_id",
        "knn_monitor_epochs",
        "grid",
        "tile_size",
        "num_permutations",
        "temperature",
        "transfer",
        "k",
        "knn_temperature",
        "mode",
        "min_steps",
        "trunk_lr_scale",
        "label_fraction",
        "labels_per_class",
        "val_fraction",
        "augment",
        "label_version",
        "unlabelled_dataset_id",
        "pseudo_labels_per_class",
        "pseudo_label_threshold",
        "max_unlabelled",
        "protocol",
        "test_dataset_id",
        "test_fraction",
        "linear_epochs",
        "linear_learning_rate",
        "label_fractions",
        "transfers",
        "projection_dim",
        "unknown",
    ]);
    let word = prop::sample::select(vec![
        "jigsaw",
        "rotation",
        "simclr",
        "byol",
        "vicreg",
        "relative_position",
        "jigsaw_image",
        "convnet",
        "resnet18",
        "resnet18_small",
        "resnet10_narrow",
        "knn",
        "linear",
        "fine_tune",
        "auto",
        "full",
        "label_efficiency",
        "",
        "NaN",
    ]);
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            i64::MIN,
            -1,
            0,
            1,
            2,
            3,
            4,
            9,
            10,
            16,
            28,
            32,
            64,
            224,
            1000,
            100_000,
            i64::MAX,
        ])
        .prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        prop::sample::select(vec![-1.0, 0.0, 1e-9, 0.1, 0.5, 1.0, 1.5, 1e300, -1e300])
            .prop_map(serde_json::Value::from),
        word.prop_map(serde_json::Value::from),
        Just(serde_json::Value::from(
            "01890a5d-ac96-774b-bcce-b302099a8057"
        )),
    ];
    let value = leaf.prop_recursive(2, 8, 4, |inner| {
        prop::collection::vec(inner, 0..4).prop_map(serde_json::Value::from)
    });
    prop_oneof![
        8 => prop::collection::btree_map(key, value, 0..8).prop_map(|fields| {
            serde_json::Value::Object(
                fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            )
        }),
        1 => mutated(corpus("config")).prop_map(|bytes| {
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
        }),
    ]
}

fn defaults_from() -> impl Strategy<Value = DefaultsFrom> {
    let base = prop::option::of((
        prop::sample::select(vec![
            Backbone::Convnet,
            Backbone::Resnet18,
            Backbone::Resnet18Small,
            Backbone::Resnet10Narrow,
        ]),
        prop::sample::select(vec![16u32, 28, 32, 64, 224]),
    ));
    (
        prop::sample::select(vec![1u32, 8, 28, 32, 33, 64, 65, 500, 5000]),
        base,
    )
        .prop_map(|(median_side, base)| DefaultsFrom { median_side, base })
}

/// A refusal names each offending field with a message.
fn named(errors: &[FieldError]) -> Result<(), TestCaseError> {
    prop_assert!(!errors.is_empty());
    for error in errors {
        prop_assert!(
            !error.field.is_empty() && !error.message.is_empty(),
            "{error:?}"
        );
    }
    Ok(())
}

/// What a job stores is read back unchanged by the worker.
fn round_trips<T>(config: &T) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let stored = serde_json::to_value(config).unwrap();
    let read: T = serde_json::from_value(stored.clone())
        .map_err(|e| TestCaseError::fail(format!("{e}: {stored}")))?;
    prop_assert_eq!(&read, config);
    Ok(())
}

#[test]
fn job_configs_resolve_to_ones_that_round_trip_or_name_the_wrong_fields() {
    fuzz(
        "config",
        256,
        (config_json(), defaults_from()),
        |(json, from)| {
            let mut verdict = Verdict::Refused;
            if let Ok(request) = serde_json::from_value::<PretrainConfigRequest>(json.clone()) {
                let pretrain_from = DefaultsFrom { base: None, ..from };
                match request.resolve(pretrain_from) {
                    Ok(config) => {
                        prop_assert!(config.epochs >= 1 && config.batch_size >= 1);
                        prop_assert!(config.image_size >= 1);
                        prop_assert!(config.learning_rate > 0.0);
                        round_trips(&config)?;
                        verdict = Verdict::Accepted;
                    }
                    Err(errors) => named(&errors)?,
                }
            }
            if let Ok(request) = serde_json::from_value::<FinetuneConfigRequest>(json.clone()) {
                match request.resolve(from) {
                    Ok(config) => {
                        prop_assert!(config.epochs >= 1 && config.batch_size >= 1);
                        prop_assert!(config.image_size >= 1);
                        round_trips(&config)?;
                        verdict = Verdict::Accepted;
                    }
                    Err(errors) => named(&errors)?,
                }
            }
            if let Ok(request) = serde_json::from_value::<EvaluateConfigRequest>(json) {
                match request.resolve() {
                    Ok(config) => {
                        round_trips(&config)?;
                        verdict = Verdict::Accepted;
                    }
                    Err(errors) => named(&errors)?,
                }
            }
            Ok(verdict)
        },
    );
}

#[test]
fn label_files_set_labels_of_known_images_once_or_name_their_bad_lines() {
    let manifest = Manifest {
        classes: vec!["cat".into(), "dog".into()],
        entries: ["cat/a.png", "dog/b.jpg", "dog/c.png", "flat.png"]
            .iter()
            .enumerate()
            .map(|(i, source)| ManifestEntry {
                file: format!("{i}.png"),
                label: None,
                source: source.to_string(),
            })
            .collect(),
    };
    let images = ImageLookup::of(&manifest);
    let format = prop::sample::select(vec![LabelFileFormat::Csv, LabelFileFormat::JsonLines]);
    fuzz(
        "labels",
        256,
        (mutated(corpus("labels")), format),
        |(bytes, format)| {
            let lines = bytes.split(|b| *b == b'\n').count();
            match parse_label_file(&bytes, format, &images) {
                Ok(changes) => {
                    prop_assert!(!changes.is_empty());
                    let mut seen = std::collections::HashSet::new();
                    for change in &changes {
                        prop_assert!(change.image < manifest.entries.len());
                        prop_assert!(seen.insert(change.image), "image {} twice", change.image);
                    }
                    Ok(Verdict::Accepted)
                }
                Err(errors) => {
                    prop_assert!(!errors.is_empty());
                    for error in &errors {
                        prop_assert!(!error.message.is_empty());
                        prop_assert!(error.line <= lines.max(1), "line {} of {lines}", error.line);
                    }
                    Ok(Verdict::Refused)
                }
            }
        },
    );
}
