//! API keys: `ptx_` and 32 random bytes in hex. Keys are high-entropy, so a
//! plain SHA-256 identifies them safely and fast enough to check on every
//! request; the first characters are kept apart so lists can show which key
//! is which.

use anyhow::Context;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::keys::{count_keys, ensure_tenant, insert_key, DEFAULT_TENANT};

/// What every generated key starts with.
pub const KEY_PREFIX: &str = "ptx_";

/// How many characters of a key its listed prefix keeps.
const SHOWN_CHARS: usize = 12;

/// A fresh random key.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{KEY_PREFIX}{hex}")
}

/// The SHA-256 of a key, as stored.
pub fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// The first characters of a key, shown in lists.
pub fn shown_prefix(key: &str) -> String {
    key.chars().take(SHOWN_CHARS).collect()
}

/// Stores a key for the tenant called `tenant` (created if missing);
/// returns the key's id.
pub async fn store_key(pool: &PgPool, tenant: &str, name: &str, key: &str) -> sqlx::Result<Uuid> {
    let tenant_id = ensure_tenant(pool, tenant).await?;
    insert_key(pool, tenant_id, name, &shown_prefix(key), &hash_key(key)).await
}

/// Makes sure the server can be used at first start. A configured key is
/// stored for the `default` tenant (once: storing it again changes
/// nothing); with no configured key and no key at all, a key is generated,
/// stored and returned so that it can be shown once.
pub async fn ensure_initial_key(
    pool: &PgPool,
    configured: Option<&str>,
) -> anyhow::Result<Option<String>> {
    if let Some(key) = configured.filter(|k| !k.is_empty()) {
        store_key(pool, DEFAULT_TENANT, "PRETEXT_API_KEY", key)
            .await
            .context("Failed to store the configured API key")?;
        return Ok(None);
    }
    if count_keys(pool).await.context("Failed to count API keys")? > 0 {
        return Ok(None);
    }
    let key = generate_key();
    store_key(pool, DEFAULT_TENANT, "first start", &key)
        .await
        .context("Failed to store the first API key")?;
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_prefixed_hex_and_differ() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        let hex = &a[KEY_PREFIX.len()..];
        assert_eq!(hex.len(), 64);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn the_hash_is_sha256_and_the_prefix_is_short() {
        let hash = hash_key("abc");
        assert_eq!(hash.len(), 32);
        assert_eq!(hash[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_eq!(shown_prefix("ptx_0123456789abcdef"), "ptx_01234567");
    }
}
