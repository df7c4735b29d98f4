//! Labels sent after the upload, without re-uploading the images: a label
//! file (CSV with a header naming `image_id` or `path`, and `label`; or JSON
//! Lines of objects with the same keys) is checked as a whole against the
//! dataset's images, then merged onto its current labels as a new version.
//! A file with any bad row changes nothing: every offending row is reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::manifest::Manifest;

/// Longest class name accepted, in characters.
pub const MAX_CLASS_NAME_CHARS: usize = 128;

/// One version of a dataset's labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSet {
    /// Class names, sorted; `labels` holds indices into it.
    pub classes: Vec<String>,
    /// One class index, or none, per image in archive order.
    pub labels: Vec<Option<u32>>,
}

/// How a label file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelFileFormat {
    Csv,
    JsonLines,
}

/// A row of a label file that cannot be applied, by its line number (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRowError {
    pub line: usize,
    pub message: String,
}

/// One label a file sets: the image (index in archive order) and its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelChange {
    pub image: usize,
    pub class: String,
}

/// Where each image of a dataset is, by index and by archive path.
pub struct ImageLookup<'a> {
    count: usize,
    by_path: HashMap<&'a str, usize>,
}

impl<'a> ImageLookup<'a> {
    /// The images of `manifest`.
    pub fn of(manifest: &'a Manifest) -> Self {
        Self {
            count: manifest.entries.len(),
            by_path: manifest
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.source.as_str(), i))
                .collect(),
        }
    }

    fn by_id(&self, id: &str) -> Result<usize, String> {
        match id.trim().parse::<usize>() {
            Ok(n) if n < self.count => Ok(n),
            Ok(n) => Err(format!(
                "image_id {n} is not an image of the dataset (its images are numbered 0 to {})",
                self.count.saturating_sub(1)
            )),
            Err(_) => Err(format!("image_id `{id}` is not a whole number")),
        }
    }

    fn by_path(&self, path: &str) -> Result<usize, String> {
        self.by_path
            .get(path)
            .copied()
            .ok_or_else(|| format!("no image of the dataset has the path `{path}`"))
    }
}

impl LabelSet {
    /// The labels an archive's class folders gave (version 0).
    pub fn from_manifest(manifest: &Manifest) -> Self {
        Self::from_names(
            manifest
                .entries
                .iter()
                .map(|e| e.label.and_then(|l| manifest.classes.get(l)).cloned())
                .collect(),
        )
    }

    /// The set giving image `i` the class `names[i]`.
    fn from_names(names: Vec<Option<String>>) -> Self {
        let classes: Vec<String> = names
            .iter()
            .flatten()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let index: HashMap<&str, u32> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i as u32))
            .collect();
        let labels = names
            .iter()
            .map(|name| name.as_deref().map(|n| index[n]))
            .collect();
        Self { classes, labels }
    }

    /// The class of image `image`, if it has one.
    pub fn class_of(&self, image: usize) -> Option<&str> {
        let label = (*self.labels.get(image)?)?;
        self.classes.get(label as usize).map(String::as_str)
    }

    /// Images with a label.
    pub fn labelled(&self) -> usize {
        self.labels.iter().flatten().count()
    }

    /// Labelled images per class, every class listed.
    pub fn class_counts(&self) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> =
            self.classes.iter().map(|c| (c.clone(), 0)).collect();
        for label in self.labels.iter().flatten() {
            *counts
                .get_mut(&self.classes[*label as usize])
                .expect("a label indexes a class") += 1;
        }
        counts
    }

    /// This set with `changes` applied, and how many images they changed.
    pub fn with_changes(&self, changes: &[LabelChange]) -> (LabelSet, usize) {
        let mut names: Vec<Option<String>> = (0..self.labels.len())
            .map(|i| self.class_of(i).map(str::to_string))
            .collect();
        let mut changed = 0;
        for change in changes {
            let slot = &mut names[change.image];
            if slot.as_deref() != Some(change.class.as_str()) {
                *slot = Some(change.class.clone());
                changed += 1;
            }
        }
        (Self::from_names(names), changed)
    }
}

/// A class name as given, or why it cannot be one.
fn class_name(raw: &str) -> Result<String, String> {
    let name = raw.trim();
    if name.is_empty() {
        return Err("the label is empty".to_string());
    }
    if name.chars().count() > MAX_CLASS_NAME_CHARS {
        return Err(format!(
            "the label is longer than {MAX_CLASS_NAME_CHARS} characters"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("the label holds a control character".to_string());
    }
    Ok(name.to_string())
}

/// How a CSV file names its images.
enum ImageColumn {
    Id(usize),
    Path(usize),
}

/// Parses `bytes` and resolves every row against `images`: the labels to
/// set, or every row that cannot be applied (an unknown image, an empty or
/// malformed label, an image labelled twice, an unreadable line).
pub fn parse_label_file(
    bytes: &[u8],
    format: LabelFileFormat,
    images: &ImageLookup,
) -> Result<Vec<LabelChange>, Vec<LabelRowError>> {
    let rows = match format {
        LabelFileFormat::Csv => csv_rows(bytes, images),
        LabelFileFormat::JsonLines => json_lines_rows(bytes, images),
    }?;
    let mut errors = Vec::new();
    let mut changes = Vec::new();
    let mut first_line: HashMap<usize, usize> = HashMap::new();
    for (line, row) in rows {
        match row {
            Err(message) => errors.push(LabelRowError { line, message }),
            Ok(change) => match first_line.get(&change.image) {
                Some(&earlier) => errors.push(LabelRowError {
                    line,
                    message: format!(
                        "image {} is labelled twice in this file (also on line {earlier})",
                        change.image
                    ),
                }),
                None => {
                    first_line.insert(change.image, line);
                    changes.push(change);
                }
            },
        }
    }
    if errors.is_empty() && changes.is_empty() {
        errors.push(LabelRowError {
            line: 1,
            message: "the file has no label rows".to_string(),
        });
    }
    if errors.is_empty() {
        Ok(changes)
    } else {
        Err(errors)
    }
}

type ParsedRows = Vec<(usize, Result<LabelChange, String>)>;

fn csv_rows(bytes: &[u8], images: &ImageLookup) -> Result<ParsedRows, Vec<LabelRowError>> {
    let header_error = |message: String| vec![LabelRowError { line: 1, message }];
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let header = reader
        .headers()
        .map_err(|e| header_error(format!("the header cannot be read: {e}")))?
        .clone();
    let column = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
    let image_column = match (column("image_id"), column("path")) {
        (Some(i), _) => ImageColumn::Id(i),
        (None, Some(p)) => ImageColumn::Path(p),
        (None, None) => {
            return Err(header_error(
                "the header must name an `image_id` or a `path` column, and a `label` column \
                 (e.g. `image_id,label`)"
                    .to_string(),
            ))
        }
    };
    let label_column = column("label").ok_or_else(|| {
        header_error("the header has no `label` column (e.g. `image_id,label`)".to_string())
    })?;
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                rows.push((line, Err(format!("the row cannot be read: {e}"))));
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.iter().all(str::is_empty) {
            continue;
        }
        let cell = |i: usize| record.get(i).unwrap_or("");
        let image = match image_column {
            ImageColumn::Id(i) => images.by_id(cell(i)),
            ImageColumn::Path(i) => images.by_path(cell(i)),
        };
        let row = image.and_then(|image| {
            class_name(cell(label_column)).map(|class| LabelChange { image, class })
        });
        rows.push((line, row));
    }
    Ok(rows)
}

/// One line of a JSON Lines label file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelLine {
    image_id: Option<u64>,
    path: Option<String>,
    label: String,
}

fn json_lines_rows(bytes: &[u8], images: &ImageLookup) -> Result<ParsedRows, Vec<LabelRowError>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        vec![LabelRowError {
            line: 1,
            message: format!("the file is not UTF-8: {e}"),
        }]
    })?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str::<LabelLine>(line)
            .map_err(|e| format!("not a JSON object with `image_id` or `path`, and `label`: {e}"))
            .and_then(|parsed| {
                let image = match (parsed.image_id, parsed.path.as_deref()) {
                    (Some(id), None) => images.by_id(&id.to_string()),
                    (None, Some(path)) => images.by_path(path),
                    _ => Err("give exactly one of `image_id` and `path`".to_string()),
                }?;
                let class = class_name(&parsed.label)?;
                Ok(LabelChange { image, class })
            });
        rows.push((n + 1, row));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::manifest::ManifestEntry;

    fn manifest() -> Manifest {
        Manifest {
            classes: vec!["cat".into(), "dog".into()],
            entries: ["cat/1.png", "cat/2.png", "dog/1.png", "new/x, y.png"]
                .iter()
                .enumerate()
                .map(|(i, source)| ManifestEntry {
                    file: format!("images/{i:06}.png"),
                    label: [Some(0), Some(0), Some(1), None][i],
                    source: source.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_csv_file_by_id_or_path_merges_onto_the_archive_labels() {
        let manifest = manifest();
        let images = ImageLookup::of(&manifest);
        let base = LabelSet::from_manifest(&manifest);
        assert_eq!(base.labelled(), 3);
        let by_id = b"image_id,label\n3,bird\n0, dog \n";
        let changes = parse_label_file(by_id, LabelFileFormat::Csv, &images).unwrap();
        let (next, changed) = base.with_changes(&changes);
        assert_eq!(changed, 2);
        assert_eq!(next.classes, ["bird", "cat", "dog"]);
        assert_eq!(next.class_of(0), Some("dog"));
        assert_eq!(next.class_of(1), Some("cat"));
        assert_eq!(next.class_of(3), Some("bird"));
        assert_eq!(
            next.class_counts(),
            BTreeMap::from([("bird".into(), 1), ("cat".into(), 1), ("dog".into(), 2)])
        );
        let by_path = b"label,path\nbird,\"new/x, y.png\"\ncat,cat/1.png\n";
        let changes = parse_label_file(by_path, LabelFileFormat::Csv, &images).unwrap();
        let (_, changed) = base.with_changes(&changes);
        assert_eq!(changed, 1, "cat/1.png was a cat already");
    }

    #[test]
    fn every_bad_row_is_reported_and_nothing_is_returned() {
        let manifest = manifest();
        let images = ImageLookup::of(&manifest);
        let file = b"image_id,label\n0,dog\n9,cat\n1,\nx,cat\n0,cat\n2,dog\n";
        let errors = parse_label_file(file, LabelFileFormat::Csv, &images).unwrap_err();
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4, 5, 6]);
        assert!(errors[0].message.contains("numbered 0 to 3"), "{errors:?}");
        assert!(errors[1].message.contains("empty"), "{errors:?}");
        assert!(errors[3].message.contains("also on line 2"), "{errors:?}");
        let errors =
            parse_label_file(b"image,class\n0,dog\n", LabelFileFormat::Csv, &images).unwrap_err();
        assert_eq!(errors[0].line, 1);
        let errors =
            parse_label_file(b"image_id,label\n", LabelFileFormat::Csv, &images).unwrap_err();
        assert!(errors[0].message.contains("no label rows"));
    }

    #[test]
    fn json_lines_name_images_by_id_or_path_but_not_both() {
        let manifest = manifest();
        let images = ImageLookup::of(&manifest);
        let good = b"{\"image_id\": 2, \"label\": \"cat\"}\n\n{\"path\": \"cat/2.png\", \"label\": \"dog\"}\n";
        let changes = parse_label_file(good, LabelFileFormat::JsonLines, &images).unwrap();
        assert_eq!(
            changes,
            [
                LabelChange {
                    image: 2,
                    class: "cat".into()
                },
                LabelChange {
                    image: 1,
                    class: "dog".into()
                }
            ]
        );
        let bad = b"{\"image_id\": 2, \"path\": \"cat/2.png\", \"label\": \"cat\"}\n{\"image_id\": 1}\n{\"image_id\": 0, \"label\": \"a\", \"extra\": 1}\nnot json\n";
        let errors = parse_label_file(bad, LabelFileFormat::JsonLines, &images).unwrap_err();
        assert_eq!(
            errors.iter().map(|e| e.line).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn class_names_are_trimmed_and_bounded() {
        assert_eq!(class_name("  ankle boot "), Ok("ankle boot".into()));
        assert!(class_name(&"x".repeat(MAX_CLASS_NAME_CHARS + 1)).is_err());
        assert!(class_name("a\u{7}b").is_err());
    }
}
