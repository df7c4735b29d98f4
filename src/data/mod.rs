//! Images in, tensors out: archive ingestion (with limits and path safety),
//! decoding and resizing, the on-disk manifest of a dataset, loading a dataset
//! into a uint8 tensor, stratified splits for few-label training, and the
//! order of the images in training batches.

pub mod archive;
pub mod batches;
pub mod decode;
pub mod loader;
pub mod manifest;
pub mod split;
