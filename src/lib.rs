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
//! - [`jobs`]: the Postgres job queue (claims, leases, fencing), job configs,
//!   and the worker pool that feeds training threads.
//! - [`ml`]: LibTorch models, the jigsaw pretext task, training loops and
//!   inference. Everything in here runs on dedicated OS threads.
//! - [`data`]: archive ingestion, image decoding, stratified splits.
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
