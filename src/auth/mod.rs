//! Who is asking: API keys (generation, hashing, the key stored at first
//! start), the middleware that turns `Authorization: Bearer <key>` into the
//! key's [`Tenant`] on every `/v1` route, the per-key rate limiter, and the
//! throttle on addresses that keep presenting bad keys.
//!
//! # Layout
//! - `keys`: making a key, its hash and its listed prefix; the first-start key.
//! - `middleware`: the `/v1` gate (401, 429) and the [`Tenant`] extractor; the
//!   gate reads only an [`AuthState`], which `http` hands out of its state.
//! - `rate_limit`: an in-memory token bucket per key.
//! - `throttle`: failed authentications counted per client address.

pub mod keys;
pub mod middleware;
pub mod rate_limit;
pub mod throttle;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sqlx::PgPool;
use uuid::Uuid;

use crate::http::error::ApiError;
use rate_limit::RateLimiter;
use throttle::FailedAuthThrottle;

/// The tenant a request acts for; every dataset, job and model it reads or
/// writes belongs to this tenant.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Tenant>().cloned().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!(
                "a handler asked for the tenant on a route without the authentication layer"
            ))
        })
    }
}

/// How the server authenticates, shared by every request.
pub struct Auth {
    /// `Some` when authentication is off (`--insecure-no-auth`): every
    /// request acts as this tenant.
    pub insecure_tenant: Option<Tenant>,
    /// `None` when rate limiting is off.
    pub limiter: Option<RateLimiter>,
    /// `None` when failed authentications are not throttled (or
    /// authentication is off).
    pub failed_auth: Option<FailedAuthThrottle>,
}

/// What the `/v1` gate reads from the server's state: the key store and how
/// to authenticate. The HTTP layer hands it out of its own state through
/// `FromRef`, so this module needs nothing else of it.
#[derive(Clone)]
pub struct AuthState {
    /// Where API keys are looked up by their hash.
    pub pool: PgPool,
    /// The insecure tenant, the rate limiter and the failed-auth throttle.
    pub auth: Arc<Auth>,
}
