//! The integration tests: one binary, one module per story. Each test runs
//! the real server (in this process, or as the real binary in its own) on a
//! random port against a fresh database in the real Postgres.
//!
//! Tests that read what is process-wide (LibTorch's random generators, the
//! metrics registry, this process's memory) rerun themselves alone in a child
//! process of this binary; see [`common::in_own_process`].

mod common;

mod batching;
mod cli;
mod contract;
mod dashboard;
mod dataset_inference;
mod datasets;
mod end_to_end;
mod evaluation;
mod events;
mod faults;
mod hostile;
mod images;
mod interop;
mod jobs;
mod labels;
mod load;
mod metrics;
mod pretext;
mod quotas;
mod resume;
mod scale_out;
mod selections;
mod tenants;
mod transfer;
