//! Per-tenant quotas, checked before a tenant's upload or job is accepted:
//! stored bytes (413), datasets, models and jobs queued or running (429).
//! Each refusal names the quota, its value, what the tenant holds, and how
//! to get under it or raise it. Quotas are the server's settings
//! (`PRETEXT_QUOTA_*`), the same for every tenant; 0 turns one off.

use super::error::ApiError;
use super::AppState;
use crate::auth::Tenant;
use crate::db::quotas::{tenant_usage, Usage};

/// Seconds a client refused for running too many jobs should wait.
const ACTIVE_JOBS_RETRY_SECS: u64 = 30;

/// Seconds a client refused for holding too much should wait: until it has
/// deleted something, which a retry alone will not do.
const HOLDINGS_RETRY_SECS: u64 = 3600;

fn over(limit: u64, held: i64, adding: u64) -> bool {
    limit > 0 && (held.max(0) as u64).saturating_add(adding) > limit
}

fn too_many(
    what: &str,
    setting: &str,
    limit: u64,
    held: i64,
    remedy: &str,
    retry: u64,
) -> ApiError {
    ApiError::TooManyRequests {
        detail: format!(
            "quota {setting} reached: this tenant has {held} {what}, and the server allows \
             {limit}; {remedy}, or raise {setting} on the server"
        ),
        retry_after: retry,
    }
}

async fn usage(state: &AppState, tenant: &Tenant) -> Result<Usage, ApiError> {
    Ok(tenant_usage(&state.pool, tenant.id).await?)
}

/// Before an upload: room for one more dataset, and for `incoming_bytes`
/// (the body's length, when the request says it).
pub async fn check_upload(
    state: &AppState,
    tenant: &Tenant,
    incoming_bytes: Option<u64>,
) -> Result<(), ApiError> {
    let config = &state.config;
    let held = usage(state, tenant).await?;
    if over(config.quota_datasets, held.datasets, 1) {
        return Err(too_many(
            "datasets",
            "PRETEXT_QUOTA_DATASETS",
            config.quota_datasets,
            held.datasets,
            "delete one (DELETE /v1/datasets/{id})",
            HOLDINGS_RETRY_SECS,
        ));
    }
    if let Some(bytes) = incoming_bytes {
        check_stored(state, held, bytes)?;
    }
    Ok(())
}

/// After an upload is read: room for a dataset of `bytes` stored bytes.
pub async fn check_stored_dataset(
    state: &AppState,
    tenant: &Tenant,
    bytes: u64,
) -> Result<(), ApiError> {
    check_stored(state, usage(state, tenant).await?, bytes)
}

fn check_stored(state: &AppState, held: Usage, bytes: u64) -> Result<(), ApiError> {
    let limit = state.config.quota_stored_bytes;
    if over(limit, held.stored_bytes, bytes) {
        return Err(ApiError::PayloadTooLarge(format!(
            "quota PRETEXT_QUOTA_STORED_BYTES reached: this tenant stores {} bytes of datasets, \
             this upload would add {bytes}, and the server allows {limit}; delete datasets \
             (DELETE /v1/datasets/{{id}}), or raise PRETEXT_QUOTA_STORED_BYTES on the server",
            held.stored_bytes
        )));
    }
    Ok(())
}

/// Before a job is queued: room for one more active job and, for a job
/// that leaves a model, for one more model.
pub async fn check_job(
    state: &AppState,
    tenant: &Tenant,
    makes_model: bool,
) -> Result<(), ApiError> {
    let config = &state.config;
    let held = usage(state, tenant).await?;
    if over(config.quota_active_jobs, held.active_jobs, 1) {
        return Err(too_many(
            "jobs queued or running",
            "PRETEXT_QUOTA_ACTIVE_JOBS",
            config.quota_active_jobs,
            held.active_jobs,
            "wait for some to end or cancel them (POST /v1/jobs/{id}/cancel)",
            ACTIVE_JOBS_RETRY_SECS,
        ));
    }
    if makes_model && over(config.quota_models, held.models, 1) {
        return Err(too_many(
            "models",
            "PRETEXT_QUOTA_MODELS",
            config.quota_models,
            held.models,
            "delete one (DELETE /v1/models/{id})",
            HOLDINGS_RETRY_SECS,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::over;

    #[test]
    fn a_quota_of_zero_is_off_and_others_allow_up_to_their_value() {
        assert!(!over(0, 1_000_000, 1));
        assert!(!over(3, 2, 1));
        assert!(over(3, 3, 1));
        assert!(over(100, 60, 41));
        assert!(!over(100, 60, 40));
        assert!(!over(5, -1, 5));
        assert!(over(10, i64::MAX, u64::MAX), "no overflow");
    }
}
