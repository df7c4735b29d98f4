//! Jobs: their configurations and the typed spec stored with each, the Postgres queue (claims with `for update
//! skip locked`, leases renewed by heartbeat, writes fenced on the claim), and
//! the worker pool that hands claimed jobs to training threads.

pub mod config;
pub mod queue;
pub mod spec;
pub mod worker;
