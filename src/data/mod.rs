//! Images in, tensors out: archive ingestion (with limits and path safety),
//! decoding and resizing, the on-disk manifest of a dataset, loading a dataset
//! into a uint8 tensor, stratified splits for few-label training, the order
//! of the images in training batches, augmentation, label files sent after
//! the upload, the `.npy` embeddings of a dataset searched by similarity (exactly, or
//! through an approximate graph when large)
//! and projected to a 2-D map, and the choice of which images to label next.

pub mod approximate;
pub mod archive;
pub mod augment;
pub mod batches;
pub mod content_hash;
pub mod decode;
pub mod embeddings;
pub mod labels;
pub mod loader;
pub mod manifest;
pub mod npy;
pub mod projection;
pub mod selection;
pub mod split;
pub mod vectors;
