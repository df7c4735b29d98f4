//! A dataset's content hash: SHA-256 over its class names and every stored
//! image's bytes and label, in manifest order. Two datasets with the same
//! hash hold the same labelled pixels, whatever their ids or archive names;
//! a model's description carries the hash of the dataset it was trained on.

use std::io::Read;
use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

use super::manifest::Manifest;

/// `sha256:<hex>` of the dataset stored in `dataset_dir`.
pub fn dataset_content_hash(dataset_dir: &Path) -> anyhow::Result<String> {
    let manifest = Manifest::read(dataset_dir)?;
    let mut hasher = Sha256::new();
    for class in &manifest.classes {
        hasher.update((class.len() as u64).to_le_bytes());
        hasher.update(class.as_bytes());
    }
    let mut buffer = vec![0u8; 1 << 16];
    for entry in &manifest.entries {
        let label = entry.label.map_or(-1, |label| label as i64);
        hasher.update(label.to_le_bytes());
        let path = dataset_dir.join(&entry.file);
        let mut file = std::fs::File::open(&path)
            .with_context(|| format!("Failed to open {}", path.display()))?;
        let length = file.metadata()?.len();
        hasher.update(length.to_le_bytes());
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::manifest::ManifestEntry;

    fn dataset(dir: &Path, images: &[(&str, &[u8], Option<usize>)]) {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        let mut entries = Vec::new();
        for (name, bytes, label) in images {
            let file = format!("images/{name}");
            std::fs::write(dir.join(&file), bytes).unwrap();
            entries.push(ManifestEntry {
                file,
                label: *label,
                source: format!("archive/{name}"),
            });
        }
        Manifest {
            classes: vec!["cat".into(), "dog".into()],
            entries,
        }
        .write(dir)
        .unwrap();
    }

    #[test]
    fn the_hash_follows_pixels_and_labels_not_folders() {
        let root = tempfile::tempdir().unwrap();
        dataset(
            &root.path().join("a"),
            &[("0.png", b"one", Some(0)), ("1.png", b"two", Some(1))],
        );
        dataset(
            &root.path().join("b"),
            &[("0.png", b"one", Some(0)), ("1.png", b"two", Some(1))],
        );
        dataset(
            &root.path().join("c"),
            &[("0.png", b"one", Some(1)), ("1.png", b"two", Some(1))],
        );
        dataset(
            &root.path().join("d"),
            &[("0.png", b"onf", Some(0)), ("1.png", b"two", Some(1))],
        );
        let hash = |name| dataset_content_hash(&root.path().join(name)).unwrap();
        assert!(hash("a").starts_with("sha256:") && hash("a").len() == 7 + 64);
        assert_eq!(hash("a"), hash("b"));
        assert_ne!(hash("a"), hash("c"), "a label changed");
        assert_ne!(hash("a"), hash("d"), "a pixel changed");
    }
}
