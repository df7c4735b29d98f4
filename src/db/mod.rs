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
