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
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
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
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyOwner {
    pub key_id: Uuid,
    pub tenant_id: Uuid,
    pub tenant: String,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// The id of the tenant called `name`, created if it is missing.
pub async fn ensure_tenant(pool: &PgPool, name: &str) -> sqlx::Result<Uuid> {
    let (id,): (Uuid,) = sqlx::query_as(
        "insert into tenants (id, name) values ($1, $2)
         on conflict (name) do update set name = excluded.name
         returning id",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .fetch_one(pool)
    .await?;
    Ok(id)
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
    let (id,): (Uuid,) = sqlx::query_as(
        "with inserted as (
             insert into api_keys (id, tenant_id, name, prefix, hash)
             values ($1, $2, $3, $4, $5)
             on conflict (hash) do nothing
             returning id
         )
         select id from inserted
         union all
         select id from api_keys where hash = $5
         limit 1",
    )
    .bind(Uuid::now_v7())
    .bind(tenant_id)
    .bind(name)
    .bind(prefix)
    .bind(hash)
    .fetch_one(pool)
    .await?;
    Ok(id)
}

/// How many keys exist, revoked ones included.
pub async fn count_keys(pool: &PgPool) -> sqlx::Result<i64> {
    let (n,): (i64,) = sqlx::query_as("select count(*) from api_keys")
        .fetch_one(pool)
        .await?;
    Ok(n)
}

/// The unrevoked key with this hash, and its tenant.
pub async fn find_live_key(pool: &PgPool, hash: &[u8]) -> sqlx::Result<Option<KeyOwner>> {
    sqlx::query_as::<_, KeyOwner>(
        "select k.id as key_id, k.tenant_id, t.name as tenant, k.last_used_at
         from api_keys k join tenants t on t.id = k.tenant_id
         where k.hash = $1 and k.revoked_at is null",
    )
    .bind(hash)
    .fetch_optional(pool)
    .await
}

/// Records that a key was used now.
pub async fn touch_key(pool: &PgPool, key_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("update api_keys set last_used_at = now() where id = $1")
        .bind(key_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Every key, oldest first.
pub async fn list_keys(pool: &PgPool) -> sqlx::Result<Vec<ApiKeyRow>> {
    sqlx::query_as::<_, ApiKeyRow>(
        "select k.id, k.tenant_id, t.name as tenant, k.name, k.prefix, k.created_at,
                k.last_used_at, k.revoked_at
         from api_keys k join tenants t on t.id = k.tenant_id
         order by k.created_at, k.id",
    )
    .fetch_all(pool)
    .await
}

/// Revokes a key; `None` when there is no key with this id. Revoking twice
/// keeps the first time.
pub async fn revoke_key(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<DateTime<Utc>>> {
    let row: Option<(DateTime<Utc>,)> = sqlx::query_as(
        "update api_keys set revoked_at = coalesce(revoked_at, now())
         where id = $1
         returning revoked_at",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(at,)| at))
}
