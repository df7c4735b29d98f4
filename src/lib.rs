//! pretext: self-supervised pretraining and transfer as an HTTP service.
//!
//! A user uploads an archive of images, pretrains an encoder on a pretext task
//! whose answers come free from the pixels (the jigsaw puzzle of Noroozi &
//! Favaro), fine-tunes its trunk on a few labels, and asks the resulting models
//! for embeddings and classifications over REST.
//!
//! # Layout
//! - [`auth`]: API keys, the tenant of each request, per-key rate limits.
//! - [`http`]: routes, extractors and the problem+json error type; the only
//!   layer that knows about HTTP.
//! - [`db`]: Postgres queries, one module per table family.
//! - [`jobs`]: job configs and the typed [`jobs::spec::JobSpec`] each job
//!   stores, the Postgres job queue (claims, leases, fencing), and the worker
//!   pool that feeds training threads.
//! - [`validation`]: reading config fields with defaults and bounds, and
//!   errors that name the offending field.
//! - [`ml`]: LibTorch models, the pretext tasks (jigsaw, rotation, SimCLR,
//!   relative position; each owns its config), training loops, evaluation,
//!   the `model.json` every model carries, and inference. Everything in here
//!   runs on dedicated OS threads.
//! - [`data`]: archive ingestion, image decoding, the dataset manifest and
//!   content hash, loading into tensors, stratified splits.
//! - [`storage`]: the files on disk (datasets, checkpoints, model weights),
//!   written atomically.
//! - [`telemetry`]: Prometheus metrics, recorded by the layers above and
//!   served by `http`.
//! - [`app`]: wiring: configuration → database → workers → server.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod data;
pub mod db;
pub mod http;
pub mod jobs;
pub mod ml;
pub mod storage;
pub mod telemetry;
pub mod validation;
