//! Postgres: connecting (creating the database if it is missing), migrations,
//! and the queries of each table family. Every query is a `sqlx::query!`
//! checked at build time against the descriptions in `.sqlx/`
//! (`make sqlx-prepare` rewrites them).

pub mod datasets;
pub mod job_events;
pub mod jobs;
pub mod keys;
pub mod label_sets;
pub mod models;
pub mod quotas;
pub mod selections;

use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Postgres;

/// Connects to `url`, creating the database if needed, and applies migrations.
pub async fn connect_and_migrate(url: &str) -> anyhow::Result<PgPool> {
    let exists = Postgres::database_exists(url).await.map_err(|e| {
        anyhow::anyhow!(
            "could not reach Postgres at {}: {e}\n\
             Start one with `docker compose -f docker/compose.yaml up -d postgres`, \
             or install and start the system's PostgreSQL (`apt-get install postgresql`), \
             then set DATABASE_URL.",
            redact(url)
        )
    })?;
    if !exists {
        Postgres::create_database(url)
            .await
            .with_context(|| format!("Failed to create the database at {}", redact(url)))?;
    }
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| format!("Failed to connect to {}", redact(url)))?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .context("Failed to apply database migrations")?;
    Ok(pool)
}

/// Whether `error` says that Postgres could not be reached (refused, timed
/// out, shutting down, the connection lost) rather than that the query was
/// wrong: a fault that passes once the database is back.
pub fn is_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Class 08 is a connection exception; 57P01 to 57P03 an
        // administrator's shutdown, a crash shutdown, or a server starting.
        sqlx::Error::Database(error) => error
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0")),
        _ => false,
    }
}

/// Whether any cause in `error`'s chain is an [`is_unreachable`] database.
pub fn caused_by_unreachable_database(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .is_some_and(is_unreachable)
    })
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
