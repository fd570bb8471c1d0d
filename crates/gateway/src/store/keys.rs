//! Virtual keys in the store: created, listed, revoked, and read back by what changed.
//! Only a key's SHA-256 is stored; the key itself exists once, in the answer to create.
//!
//! Why a fast hash and not a slow KDF (argon2, bcrypt): a slow hash protects *guessable*
//! secrets such as passwords, where an attacker with the table tries a dictionary. A key
//! here is 40 characters drawn uniformly from 62 by a CSPRNG, about 238 bits: no
//! dictionary exists and no amount of hashing speed makes brute force feasible. A slow
//! KDF would only cost every request tens of milliseconds. The hot path hashes the
//! presented key once and looks the hash up in the in-memory cache (see [`crate::auth`]),
//! so nothing is ever compared or hashed twice.
//!
//! Times are taken from the database's clock (`now_ms` below), not the writer's: keys are
//! written by `sluice keys` on one machine and by `/admin` on any instance, and every
//! instance reloads by `updated_at_ms`, so all stamps must come from one clock.

use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Backend, Store};

/// Every virtual key starts with this, so secret scanners (and people) recognise one.
pub const KEY_PREFIX: &str = "sk-sluice-";
/// Random base62 characters after the prefix: 40 * log2(62) = 238 bits.
const KEY_RANDOM_CHARS: usize = 40;
/// Characters of the key kept in clear as `hint`.
const HINT_CHARS: usize = 4;

/// What a new key is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewKey {
    pub owner: String,
    /// `None`: the configured default tier.
    pub tier: Option<String>,
    /// `None`: whatever the tier allows.
    pub models: Option<Vec<String>>,
    /// May set its end user's tier with `x-sluice-tier`.
    pub can_assert_tier: bool,
}

/// One stored key. What clients see of it is [`crate::admin::key_view`]: never the hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: String,
    /// SHA-256 of the key, lowercase hex.
    pub key_hash: String,
    /// The key's last four characters.
    pub hint: String,
    pub owner: String,
    pub tier: Option<String>,
    pub models: Option<Vec<String>>,
    pub can_assert_tier: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

impl KeyRow {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms.is_some()
    }
}

/// A fresh key: the prefix and 40 base62 characters from the thread's CSPRNG (ChaCha,
/// seeded and periodically reseeded from the OS).
pub fn generate_key() -> SecretString {
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_CHARS);
    key.push_str(KEY_PREFIX);
    key.extend(
        rand::rng()
            .sample_iter(Alphanumeric)
            .take(KEY_RANDOM_CHARS)
            .map(char::from),
    );
    SecretString::from(key)
}

/// The SHA-256 of a key, as raw bytes: the in-memory cache's map key.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The SHA-256 of a key in lowercase hex: what the table stores.
pub fn hash_key(key: &str) -> String {
    hex::encode(key_digest(key))
}

/// The last four characters, for humans to tell keys apart.
pub fn key_hint(key: &str) -> String {
    let start = key
        .char_indices()
        .rev()
        .nth(HINT_CHARS - 1)
        .map_or(0, |(i, _)| i);
    key[start..].to_string()
}

/// `key_` + 16 hex characters (64 random bits): names a key in lists, logs and records.
fn new_key_id() -> String {
    let bytes: [u8; 8] = rand::rng().random();
    format!("key_{}", hex::encode(bytes))
}

const SELECT: &str = "SELECT id, key_hash, hint, owner, tier, models, can_assert_tier, \
                      created_at_ms, updated_at_ms, revoked_at_ms FROM api_keys";

/// Unix milliseconds on the database's clock, as SQL. Both stay constant within one
/// statement, so `created_at_ms` and `updated_at_ms` of a new row are equal.
fn now_ms(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS BIGINT)",
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000 AS BIGINT)",
    }
}

impl Store {
    /// Store a new key; the key itself is returned once and kept nowhere.
    pub async fn create_key(&self, new: NewKey) -> Result<(KeyRow, SecretString), sqlx::Error> {
        use secrecy::ExposeSecret;
        let key = generate_key();
        let models = new
            .models
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let now = now_ms(self.backend);
        let sql = format!(
            "INSERT INTO api_keys (id, key_hash, hint, owner, tier, models, can_assert_tier, \
             created_at_ms, updated_at_ms, revoked_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, {now}, {now}, NULL) RETURNING created_at_ms"
        );
        let id = new_key_id();
        let hint = key_hint(key.expose_secret());
        let key_hash = hash_key(key.expose_secret());
        let created: i64 = sqlx::query(&sql)
            .bind(id.clone())
            .bind(key_hash.clone())
            .bind(hint.clone())
            .bind(new.owner.clone())
            .bind(new.tier.clone())
            .bind(models)
            .bind(i64::from(new.can_assert_tier))
            .fetch_one(&self.pool)
            .await?
            .try_get("created_at_ms")?;
        let row = KeyRow {
            id,
            key_hash,
            hint,
            owner: new.owner,
            tier: new.tier,
            models: new.models,
            can_assert_tier: new.can_assert_tier,
            created_at_ms: created,
            updated_at_ms: created,
            revoked_at_ms: None,
        };
        Ok((row, key))
    }

    /// Every key, revoked ones included, oldest first.
    pub async fn list_keys(&self) -> Result<Vec<KeyRow>, sqlx::Error> {
        let rows = sqlx::query(&format!("{SELECT} ORDER BY created_at_ms, id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(key_row).collect()
    }

    /// One key by id.
    pub async fn get_key(&self, id: &str) -> Result<Option<KeyRow>, sqlx::Error> {
        sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(key_row)
            .transpose()
    }

    /// Revoke a key: `false` when no key with this id is active (unknown, or revoked
    /// before). Every instance drops it at its next reload.
    pub async fn revoke_key(&self, id: &str) -> Result<bool, sqlx::Error> {
        let now = now_ms(self.backend);
        let done = sqlx::query(&format!(
            "UPDATE api_keys SET revoked_at_ms = {now}, updated_at_ms = {now} \
             WHERE id = $1 AND revoked_at_ms IS NULL"
        ))
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Keys created or changed (revoked included) at or after `since_ms`, by change time.
    pub async fn keys_changed_since(&self, since_ms: i64) -> Result<Vec<KeyRow>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE updated_at_ms >= $1 ORDER BY updated_at_ms, id"
        ))
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_row).collect()
    }
}

fn key_row(r: &AnyRow) -> Result<KeyRow, sqlx::Error> {
    let models: Option<String> = r.try_get("models")?;
    let models = models
        .map(|m| serde_json::from_str::<Vec<String>>(&m))
        .transpose()
        .map_err(|e| sqlx::Error::ColumnDecode {
            index: "models".into(),
            source: Box::new(e),
        })?;
    Ok(KeyRow {
        id: r.try_get("id")?,
        key_hash: r.try_get("key_hash")?,
        hint: r.try_get("hint")?,
        owner: r.try_get("owner")?,
        tier: r.try_get("tier")?,
        models,
        can_assert_tier: r.try_get::<i64, _>("can_assert_tier")? != 0,
        created_at_ms: r.try_get("created_at_ms")?,
        updated_at_ms: r.try_get("updated_at_ms")?,
        revoked_at_ms: r.try_get("revoked_at_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn keys_have_the_prefix_and_40_base62_characters() {
        let key = generate_key();
        let key = key.expose_secret();
        let random = key.strip_prefix(KEY_PREFIX).unwrap();
        assert_eq!(random.len(), 40);
        assert!(random.chars().all(|c| c.is_ascii_alphanumeric()), "{key}");
    }

    #[test]
    fn keys_do_not_repeat() {
        let keys: std::collections::HashSet<String> = (0..1000)
            .map(|_| generate_key().expose_secret().to_string())
            .collect();
        assert_eq!(keys.len(), 1000);
        // Each position draws from all 62 characters, not a narrower alphabet.
        let chars: std::collections::HashSet<char> = keys
            .iter()
            .flat_map(|k| k[KEY_PREFIX.len()..].chars().collect::<Vec<_>>())
            .collect();
        assert_eq!(chars.len(), 62);
    }

    #[test]
    fn the_hash_is_hex_sha256() {
        // SHA-256("abc"), the FIPS 180-2 test vector.
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let key = generate_key();
        let hash = hash_key(key.expose_secret());
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(&key.expose_secret()[KEY_PREFIX.len()..]));
        assert_eq!(hex::decode(&hash).unwrap(), key_digest(key.expose_secret()));
    }

    #[test]
    fn the_hint_is_the_last_four_characters() {
        assert_eq!(key_hint("sk-sluice-abcdefWXYZ"), "WXYZ");
        assert_eq!(key_hint("abc"), "abc");
        assert_eq!(key_hint("ééééé"), "éééé");
    }

    #[test]
    fn ids_are_key_and_16_hex() {
        let id = new_key_id();
        let hex = id.strip_prefix("key_").unwrap();
        assert_eq!(hex.len(), 16);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
