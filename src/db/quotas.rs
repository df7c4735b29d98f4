//! What a tenant holds and runs, as its quotas count it: stored datasets
//! (how many, and their bytes), models, and jobs queued or running.

use sqlx::PgPool;
use uuid::Uuid;

/// A tenant's usage, read in one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub datasets: i64,
    pub stored_bytes: i64,
    pub models: i64,
    pub active_jobs: i64,
}

pub async fn tenant_usage(pool: &PgPool, tenant_id: Uuid) -> sqlx::Result<Usage> {
    let row = sqlx::query!(
        r#"
        select
            (select count(*) from datasets where tenant_id = $1) as "datasets!",
            (select coalesce(sum(bytes), 0)::bigint from datasets where tenant_id = $1) as "stored_bytes!",
            (select count(*) from models where tenant_id = $1) as "models!",
            (select count(*) from jobs
               where tenant_id = $1 and state in ('queued', 'running')) as "active_jobs!"
        "#,
        tenant_id
    )
    .fetch_one(pool)
    .await?;
    Ok(Usage {
        datasets: row.datasets,
        stored_bytes: row.stored_bytes,
        models: row.models,
        active_jobs: row.active_jobs,
    })
}
