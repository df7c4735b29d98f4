//! Archive ingestion: a `.zip`, `.tar` or `.tar.gz` upload becomes a stored
//! dataset of decodable images with ImageFolder labels.
//!
//! Limits are enforced on what is actually read, not on what headers claim,
//! so a zip bomb stops at the configured uncompressed size. Entry names are
//! only ever used to derive labels; stored files get generated names, so `..`,
//! absolute paths and symlinks can never write outside the dataset's folder.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use serde::Serialize;

use super::decode::{decode_image_file, is_grayscale};
use super::manifest::{Manifest, ManifestEntry};

/// The archive formats accepted, recognised by their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Zip,
    Tar,
    TarGz,
}

/// Limits on one archive.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveLimits {
    pub max_entries: u64,
    pub max_uncompressed_bytes: u64,
    pub max_image_pixels: u64,
}

/// An entry left out of the dataset, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SkippedEntry {
    pub path: String,
    pub reason: String,
}

/// What ingestion stored.
#[derive(Debug, Clone)]
pub struct IngestReport {
    pub num_images: usize,
    pub labeled: bool,
    pub channels: u8,
    pub classes: Vec<String>,
    pub class_counts: BTreeMap<String, u64>,
    /// The first 100 skipped entries.
    pub skipped: Vec<SkippedEntry>,
    pub skipped_count: usize,
    pub bytes: u64,
    pub median_side: u32,
}

/// Why an archive was refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    NotAnArchive(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    NoImages(String),
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// Most skipped entries listed in a dataset's description.
pub const SKIPPED_LISTED: usize = 100;
/// Largest single entry stored (entries are streamed to disk, never held
/// in memory whole).
const MAX_ENTRY_BYTES: u64 = 512 << 20;

/// Recognises an archive by its first bytes.
pub fn detect_kind(path: &Path) -> std::io::Result<Option<ArchiveKind>> {
    let mut head = [0u8; 512];
    let mut file = File::open(path)?;
    let mut filled = 0;
    while filled < head.len() {
        let n = file.read(&mut head[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    let head = &head[..filled];
    Ok(
        if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
            Some(ArchiveKind::Zip)
        } else if head.starts_with(&[0x1f, 0x8b]) {
            Some(ArchiveKind::TarGz)
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            Some(ArchiveKind::Tar)
        } else {
            None
        },
    )
}

/// One image kept during the scan, before labels are assigned.
struct KeptImage {
    components: Vec<String>,
    file: String,
    grayscale: bool,
    side: u32,
    bytes: u64,
}

struct Scan<'a> {
    limits: ArchiveLimits,
    dataset_dir: &'a Path,
    entries_seen: u64,
    bytes_read: u64,
    kept: Vec<KeptImage>,
    skipped: Vec<SkippedEntry>,
}

impl Scan<'_> {
    fn skip(&mut self, path: &str, reason: impl Into<String>) {
        self.skipped.push(SkippedEntry {
            path: path.to_string(),
            reason: reason.into(),
        });
    }

    fn count_entry(&mut self) -> Result<(), IngestError> {
        self.entries_seen += 1;
        if self.entries_seen > self.limits.max_entries {
            return Err(IngestError::TooLarge(format!(
                "the archive has more than {} entries; split it or raise PRETEXT_MAX_ARCHIVE_ENTRIES",
                self.limits.max_entries
            )));
        }
        Ok(())
    }

    /// Reads one regular file entry, enforcing the uncompressed budget.
    fn visit_file(&mut self, raw_path: &str, reader: &mut dyn Read) -> Result<(), IngestError> {
        let Some(components) = safe_components(raw_path) else {
            self.skip(raw_path, "unsafe path (absolute or containing `..`)");
            return Ok(());
        };
        if components
            .iter()
            .any(|c| c.starts_with('.') || c == "__MACOSX")
        {
            self.skip(raw_path, "hidden or metadata file");
            return Ok(());
        }
        let budget = self.limits.max_uncompressed_bytes - self.bytes_read;
        let cap = budget.min(MAX_ENTRY_BYTES);
        let stem = format!("images/{:07}", self.kept.len());
        let staging = self.dataset_dir.join(format!("{stem}.part"));
        let len = match stream_entry(reader, &staging, cap) {
            Ok(len) => len,
            Err(e) => {
                let _ = std::fs::remove_file(&staging);
                return Err(match e {
                    EntryError::Read(e) => {
                        IngestError::Corrupt(format!("the archive is corrupt at `{raw_path}`: {e}"))
                    }
                    EntryError::Write(e) => IngestError::Io(e),
                });
            }
        };
        if len > cap {
            let _ = std::fs::remove_file(&staging);
            if cap == budget {
                return Err(IngestError::TooLarge(format!(
                    "the archive expands to more than {} bytes; upload a smaller archive or raise PRETEXT_MAX_UNCOMPRESSED_BYTES",
                    self.limits.max_uncompressed_bytes
                )));
            }
            self.skip(
                raw_path,
                format!("entry larger than {MAX_ENTRY_BYTES} bytes"),
            );
            return Ok(());
        }
        self.bytes_read += len;
        let image = match decode_image_file(&staging, self.limits.max_image_pixels) {
            Ok(image) => image,
            Err(reason) => {
                let _ = std::fs::remove_file(&staging);
                self.skip(raw_path, reason);
                return Ok(());
            }
        };
        let extension = image
            .format
            .extensions_str()
            .first()
            .copied()
            .unwrap_or("img");
        let file = format!("{stem}.{extension}");
        std::fs::rename(&staging, self.dataset_dir.join(&file)).map_err(|e| {
            IngestError::Io(anyhow::Error::new(e).context("Failed to store an image"))
        })?;
        self.kept.push(KeptImage {
            components,
            file,
            grayscale: is_grayscale(&image),
            side: image.width().max(image.height()),
            bytes: len,
        });
        Ok(())
    }
}

/// Why an entry could not be copied out of its archive.
enum EntryError {
    /// The archive could not be read there: it is corrupt.
    Read(std::io::Error),
    /// The copy could not be written: a problem of this server's disk.
    Write(anyhow::Error),
}

/// Copies an entry into `path` as it is read, never holding more than a
/// small buffer of it, and stops after `cap + 1` bytes; returns the bytes
/// copied (over `cap` means the entry is too large).
fn stream_entry(reader: &mut dyn Read, path: &Path, cap: u64) -> Result<u64, EntryError> {
    let write_error = |e: std::io::Error| {
        EntryError::Write(
            anyhow::Error::new(e).context(format!("Failed to write {}", path.display())),
        )
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(write_error)?;
    }
    let mut file = File::create(path).map_err(write_error)?;
    let mut limited = reader.take(cap + 1);
    let mut buffer = vec![0u8; 64 << 10];
    let mut copied = 0u64;
    loop {
        let n = match limited.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EntryError::Read(e)),
        };
        file.write_all(&buffer[..n]).map_err(write_error)?;
        copied += n as u64;
    }
    file.sync_all().map_err(write_error)?;
    Ok(copied)
}

/// The normal components of an archive path, or `None` when it is absolute or
/// climbs out with `..`.
fn safe_components(raw: &str) -> Option<Vec<String>> {
    let raw = raw.replace('\\', "/");
    if raw.starts_with('/') || raw.get(1..2) == Some(":") {
        return None;
    }
    let mut components = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => continue,
            ".." => return None,
            other => components.push(other.to_string()),
        }
    }
    (!components.is_empty()).then_some(components)
}

/// Extracts the images of `archive` into `dataset_dir` and writes its manifest.
pub fn ingest_archive(
    archive: &Path,
    kind: ArchiveKind,
    dataset_dir: &Path,
    limits: ArchiveLimits,
) -> Result<IngestReport, IngestError> {
    let mut scan = Scan {
        limits,
        dataset_dir,
        entries_seen: 0,
        bytes_read: 0,
        kept: Vec::new(),
        skipped: Vec::new(),
    };
    let file = File::open(archive).map_err(|e| IngestError::Io(e.into()))?;
    match kind {
        ArchiveKind::Zip => scan_zip(file, &mut scan)?,
        ArchiveKind::Tar => scan_tar(BufReader::new(file), &mut scan)?,
        ArchiveKind::TarGz => scan_tar(
            flate2::read::MultiGzDecoder::new(BufReader::new(file)),
            &mut scan,
        )?,
    }
    finish(scan)
}

fn scan_zip(file: File, scan: &mut Scan) -> Result<(), IngestError> {
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        IngestError::Corrupt(format!(
            "the zip archive is corrupt or truncated ({e}); upload it again whole"
        ))
    })?;
    if zip.len() as u64 > scan.limits.max_entries {
        return Err(IngestError::TooLarge(format!(
            "the archive has {} entries, more than the limit of {}",
            zip.len(),
            scan.limits.max_entries
        )));
    }
    for index in 0..zip.len() {
        scan.count_entry()?;
        let mut entry = zip
            .by_index(index)
            .map_err(|e| IngestError::Corrupt(format!("the zip archive is corrupt: {e}")))?;
        let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        if entry.is_dir() {
            continue;
        }
        if entry.is_symlink() {
            scan.skip(&name, "symbolic link");
            continue;
        }
        scan.visit_file(&name, &mut entry)?;
    }
    Ok(())
}

fn scan_tar<R: Read>(reader: R, scan: &mut Scan) -> Result<(), IngestError> {
    let mut tar = tar::Archive::new(reader);
    let entries = tar
        .entries()
        .map_err(|e| IngestError::NotAnArchive(format!("not a readable tar archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| IngestError::Corrupt(format!("the tar archive is corrupt: {e}")))?;
        scan.count_entry()?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        if kind.is_symlink() || kind.is_hard_link() {
            scan.skip(&name, "link");
            continue;
        }
        if !kind.is_file() {
            scan.skip(&name, "not a regular file");
            continue;
        }
        scan.visit_file(&name, &mut entry)?;
    }
    Ok(())
}

/// Assigns labels (ImageFolder convention), writes the manifest and summarises.
fn finish(mut scan: Scan) -> Result<IngestReport, IngestError> {
    if scan.kept.is_empty() {
        let why = match scan.skipped.first() {
            Some(first) => format!(
                "the archive holds no decodable image ({} entries skipped; first: `{}`: {})",
                scan.skipped.len(),
                first.path,
                first.reason
            ),
            None => "the archive is empty; put images in it (in one folder per class for a labelled dataset)".to_string(),
        };
        return Err(IngestError::NoImages(why));
    }
    // An archive made from one folder (`tar czf x.tgz mydata/`) wraps
    // everything in it: look inside that folder.
    while scan.kept.iter().all(|k| k.components.len() >= 2)
        && scan.kept.iter().any(|k| k.components.len() >= 3)
        && scan
            .kept
            .iter()
            .all(|k| k.components[0] == scan.kept[0].components[0])
    {
        for kept in &mut scan.kept {
            kept.components.remove(0);
        }
    }
    let labeled = scan.kept.iter().any(|k| k.components.len() >= 2);
    let mut classes: Vec<String> = if labeled {
        scan.kept
            .iter()
            .filter(|k| k.components.len() >= 2)
            .map(|k| k.components[0].clone())
            .collect()
    } else {
        Vec::new()
    };
    classes.sort();
    classes.dedup();

    let mut entries = Vec::with_capacity(scan.kept.len());
    let mut class_counts = BTreeMap::new();
    let mut sides = Vec::with_capacity(scan.kept.len());
    let mut bytes = 0;
    let mut all_gray = true;
    let mut root_images = Vec::new();
    for kept in &scan.kept {
        let source = kept.components.join("/");
        let label = if labeled {
            if kept.components.len() < 2 {
                root_images.push(kept.file.clone());
                scan.skipped.push(SkippedEntry {
                    path: source,
                    reason: "image outside any class folder in a labelled archive".to_string(),
                });
                continue;
            }
            let class = &kept.components[0];
            *class_counts.entry(class.clone()).or_insert(0u64) += 1;
            Some(classes.binary_search(class).expect("class collected above"))
        } else {
            None
        };
        sides.push(kept.side);
        bytes += kept.bytes;
        all_gray &= kept.grayscale;
        entries.push(ManifestEntry {
            file: kept.file.clone(),
            label,
            source,
        });
    }
    for file in root_images {
        let _ = std::fs::remove_file(scan.dataset_dir.join(file));
    }
    sides.sort_unstable();
    let median_side = sides[sides.len() / 2];
    let manifest = Manifest {
        classes: classes.clone(),
        entries,
    };
    manifest.write(scan.dataset_dir)?;
    let skipped_count = scan.skipped.len();
    scan.skipped.truncate(SKIPPED_LISTED);
    Ok(IngestReport {
        num_images: manifest.entries.len(),
        labeled,
        channels: if all_gray { 1 } else { 3 },
        classes,
        class_counts,
        skipped: scan.skipped,
        skipped_count,
        bytes,
        median_side,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused() {
        assert_eq!(safe_components("../x.png"), None);
        assert_eq!(safe_components("a/../../x.png"), None);
        assert_eq!(safe_components("/etc/passwd"), None);
        assert_eq!(safe_components("C:/x.png"), None);
        assert_eq!(
            safe_components("./cat/1.png"),
            Some(vec!["cat".to_string(), "1.png".to_string()])
        );
    }
}
