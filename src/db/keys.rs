//! The `tenants` and `api_keys` tables: creating tenants and keys, finding
//! the live key behind a hash, listing and revoking keys. Keys are stored
//! only as their SHA-256; the key itself is shown once, when it is made.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// The tenant that owns what existed before tenants, and what an
/// unauthenticated development server does.
pub const DEFAULT_TENANT: &str = "default";

/// A key as listed: never the key, never its hash.
#[derive(Debug, Clone, Serialize)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub tenant: String,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A live key found by its hash, with its tenant.
#[derive(Debug, Clone)]
pub struct KeyOwner {
    pub key_id: Uuid,
    pub tenant_id: Uuid,
    pub tenant: String,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// The id of the tenant called `name`, created if it is missing.
pub async fn ensure_tenant(pool: &PgPool, name: &str) -> sqlx::Result<Uuid> {
    sqlx::query_scalar!(
        "insert into tenants (id, name) values ($1, $2)
         on conflict (name) do update set name = excluded.name
         returning id",
        Uuid::now_v7(),
        name
    )
    .fetch_one(pool)
    .await
}

/// Stores a key (by hash) for a tenant; a hash stored already is left as it
/// is, so storing the same key twice is harmless. Returns the key's id.
pub async fn insert_key(
    pool: &PgPool,
    tenant_id: Uuid,
    name: &str,
    prefix: &str,
    hash: &[u8],
) -> sqlx::Result<Uuid> {
    sqlx::query_scalar!(
        r#"with inserted as (
             insert into api_keys (id, tenant_id, name, prefix, hash)
             values ($1, $2, $3, $4, $5)
             on conflict (hash) do nothing
             returning id
         )
         select id as "id!" from inserted
         union all
         select id from api_keys where hash = $5
         limit 1"#,
        Uuid::now_v7(),
        tenant_id,
        name,
        prefix,
        hash
    )
    .fetch_one(pool)
    .await
}

/// How many keys exist, revoked ones included.
pub async fn count_keys(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"select count(*) as "count!" from api_keys"#)
        .fetch_one(pool)
        .await
}

/// The unrevoked key with this hash, and its tenant.
pub async fn find_live_key(pool: &PgPool, hash: &[u8]) -> sqlx::Result<Option<KeyOwner>> {
    sqlx::query_as!(
        KeyOwner,
        "select k.id as key_id, k.tenant_id, t.name as tenant, k.last_used_at
         from api_keys k join tenants t on t.id = k.tenant_id
         where k.hash = $1 and k.revoked_at is null",
        hash
    )
    .fetch_optional(pool)
    .await
}

/// Records that a key was used now.
pub async fn touch_key(pool: &PgPool, key_id: Uuid) -> sqlx::Result<()> {
    sqlx::query!(
        "update api_keys set last_used_at = now() where id = $1",
        key_id
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Every key, oldest first.
pub async fn list_keys(pool: &PgPool) -> sqlx::Result<Vec<ApiKeyRow>> {
    sqlx::query_as!(
        ApiKeyRow,
        "select k.id, k.tenant_id, t.name as tenant, k.name, k.prefix, k.created_at,
                k.last_used_at, k.revoked_at
         from api_keys k join tenants t on t.id = k.tenant_id
         order by k.created_at, k.id"
    )
    .fetch_all(pool)
    .await
}

/// Revokes a key; `None` when there is no key with this id. Revoking twice
/// keeps the first time.
pub async fn revoke_key(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar!(
        r#"update api_keys set revoked_at = coalesce(revoked_at, now())
         where id = $1
         returning revoked_at as "revoked_at!""#,
        id
    )
    .fetch_optional(pool)
    .await
}
