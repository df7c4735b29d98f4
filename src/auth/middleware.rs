//! The gate in front of every `/v1` route: a client address that failed
//! authentication too often is refused first (429, no lookup), then the
//! bearer key is looked up by its hash (401 when missing, malformed, unknown
//! or revoked; the last two count against the address), the key's bucket is
//! charged (429 when empty), and the key's [`Tenant`] is handed to the
//! handlers as a request extension.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use uuid::Uuid;

use super::keys::hash_key;
use super::rate_limit::retry_after_secs;
use super::{AuthState, Tenant};
use crate::db::keys::{find_live_key, touch_key};
use crate::http::error::ApiError;

/// `last_used_at` is written at most this often per key, not on every request.
const LAST_USED_RESOLUTION: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

const HOW_TO_AUTHENTICATE: &str = "send an API key as `Authorization: Bearer <key>`; \
     the server prints one at first start, `PRETEXT_API_KEY` sets one, \
     and `pretext keys create --tenant NAME` makes more";

/// The key in an `Authorization: Bearer <key>` header.
fn bearer_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized(format!("no API key: {HOW_TO_AUTHENTICATE}")))?;
    let malformed = || {
        ApiError::Unauthorized(format!(
            "the Authorization header is not `Bearer <key>`: {HOW_TO_AUTHENTICATE}"
        ))
    };
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, key) = value.trim().split_once(' ').ok_or_else(malformed)?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
        return Err(malformed());
    }
    Ok(key)
}

/// The address failed authentications are counted under: the peer's, or
/// for a router served without connection info, one shared by all.
fn client_address(request: &Request) -> IpAddr {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |info| info.0.ip())
}

/// The tenant of the request's key, and the id its rate is counted under;
/// an unknown or revoked key counts as a failure of `client`.
async fn authenticate(
    state: &AuthState,
    headers: &HeaderMap,
    client: IpAddr,
) -> Result<(Tenant, Uuid), ApiError> {
    if let Some(tenant) = &state.auth.insecure_tenant {
        return Ok((tenant.clone(), tenant.id));
    }
    let key = bearer_key(headers)?;
    let Some(owner) = find_live_key(&state.pool, &hash_key(key)).await? else {
        if let Some(throttle) = &state.auth.failed_auth {
            throttle.record_failure(client);
        }
        return Err(ApiError::Unauthorized(format!(
            "the API key is unknown or revoked: {HOW_TO_AUTHENTICATE}"
        )));
    };
    let stale = owner
        .last_used_at
        .is_none_or(|at| Utc::now() - at >= LAST_USED_RESOLUTION);
    if stale {
        let pool = state.pool.clone();
        let key_id = owner.key_id;
        tokio::spawn(async move {
            if let Err(error) = touch_key(&pool, key_id).await {
                tracing::warn!(%key_id, %error, "last use of a key not recorded");
            }
        });
    }
    let tenant = Tenant {
        id: owner.tenant_id,
        name: owner.tenant,
    };
    Ok((tenant, owner.key_id))
}

/// Middleware on every `/v1` route: throttles addresses that keep failing,
/// authenticates, rate-limits, and inserts the [`Tenant`] for the handlers.
pub async fn require_key(
    State(state): State<AuthState>,
    mut request: Request,
    next: Next,
) -> Response {
    let client = client_address(&request);
    if let Some(throttle) = &state.auth.failed_auth {
        if let Err(wait) = throttle.check(client) {
            let retry_after = retry_after_secs(wait);
            return ApiError::TooManyRequests {
                detail: format!(
                    "too many failed authentications from this address; retry after \
                     {retry_after} s with a valid API key ({HOW_TO_AUTHENTICATE}); the server's \
                     --auth-failure-limit and --auth-failure-window-secs set how many and how long"
                ),
                retry_after,
            }
            .into_response();
        }
    }
    let (tenant, bucket) = match authenticate(&state, request.headers(), client).await {
        Ok(found) => found,
        Err(error) => return error.into_response(),
    };
    if let Some(limiter) = &state.auth.limiter {
        if let Err(wait) = limiter.check(bucket) {
            let retry_after = retry_after_secs(wait);
            return ApiError::TooManyRequests {
                detail: format!(
                    "too many requests for this API key; retry after {retry_after} s, \
                     or slow down (the server's --rate-limit-per-second and --rate-limit-burst)"
                ),
                retry_after,
            }
            .into_response();
        }
    }
    request.extensions_mut().insert(tenant);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = value {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn reads_bearer_keys_and_refuses_the_rest() {
        assert_eq!(
            bearer_key(&headers(Some("Bearer ptx_abc"))).unwrap(),
            "ptx_abc"
        );
        assert_eq!(
            bearer_key(&headers(Some("bearer  ptx_abc "))).unwrap(),
            "ptx_abc"
        );
        for bad in [
            None,
            Some("ptx_abc"),
            Some("Basic dXNlcjpw"),
            Some("Bearer "),
        ] {
            assert!(
                matches!(bearer_key(&headers(bad)), Err(ApiError::Unauthorized(_))),
                "{bad:?}"
            );
        }
    }
}
