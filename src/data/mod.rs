//! Images in, tensors out: archive ingestion (with limits and path safety),
//! decoding and resizing, the on-disk manifest of a dataset, loading a dataset
//! into a uint8 tensor, and stratified splits for few-label training.

pub mod archive;
pub mod content_hash;
pub mod decode;
pub mod loader;
pub mod manifest;
pub mod split;
