//! Packs a folder of images into a temporary `.tar.gz` for upload, keeping
//! the folder's structure below it, so class folders become labels
//! (`disc/0.png` is labelled `disc`) and root-level images stay unlabelled.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use flate2::write::GzEncoder;
use flate2::Compression;
use tempfile::NamedTempFile;

/// The files under `folder`, as paths relative to it, sorted. Symlinked
/// files are followed; symlinked folders are not, so a link loop cannot
/// make the walk endless.
pub fn files_under(folder: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = folder.join(&relative);
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("Failed to read {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("Failed to read {}", dir.display()))?;
            let path = relative.join(entry.file_name());
            let kind = entry
                .file_type()
                .with_context(|| format!("Failed to inspect {}", entry.path().display()))?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() || (kind.is_symlink() && entry.path().is_file()) {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Writes `files` (relative to `folder`) into a gzipped tar in the system's
/// temporary folder, calling `on_file` after each; the file is deleted when
/// the returned handle drops.
pub fn pack_folder(
    folder: &Path,
    files: &[PathBuf],
    mut on_file: impl FnMut(),
) -> anyhow::Result<NamedTempFile> {
    let archive = tempfile::Builder::new()
        .prefix("pretext-upload-")
        .suffix(".tar.gz")
        .tempfile()
        .context("Failed to create a temporary file for the archive")?;
    // Images are compressed already; a fast level saves time, not bytes.
    let encoder = GzEncoder::new(BufWriter::new(archive.as_file()), Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    for relative in files {
        let path = folder.join(relative);
        builder
            .append_path_with_name(&path, relative)
            .with_context(|| format!("Failed to add {} to the archive", path.display()))?;
        on_file();
    }
    builder
        .into_inner()
        .and_then(GzEncoder::finish)
        .and_then(|mut writer| writer.flush())
        .context("Failed to write the archive")?;
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;

    #[test]
    fn packs_class_folders_with_paths_relative_to_the_folder() {
        let folder = tempfile::tempdir().unwrap();
        for (path, bytes) in [
            ("disc/0.png", b"a"),
            ("vertical/1.png", b"b"),
            ("root.png", b"c"),
        ] {
            let path = folder.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }

        let files = files_under(folder.path()).unwrap();
        assert_eq!(
            files,
            [
                PathBuf::from("disc/0.png"),
                PathBuf::from("root.png"),
                PathBuf::from("vertical/1.png")
            ]
        );
        let mut packed = 0;
        let archive = pack_folder(folder.path(), &files, || packed += 1).unwrap();
        assert_eq!(packed, 3);

        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(
            File::open(archive.path()).unwrap(),
        ));
        let mut entries = Vec::new();
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut content = String::new();
            entry.read_to_string(&mut content).unwrap();
            entries.push((entry.path().unwrap().display().to_string(), content));
        }
        assert_eq!(
            entries,
            [
                ("disc/0.png".to_string(), "a".to_string()),
                ("root.png".to_string(), "c".to_string()),
                ("vertical/1.png".to_string(), "b".to_string())
            ]
        );
    }
}
