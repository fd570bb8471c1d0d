//! Authentication: who is calling. The master key (also the admin key), and virtual keys
//! (stored hashed, looked up from an in-memory cache on the hot path).
//!
//! The cache maps a key's SHA-256 to its [`Principal`] and sits behind an `ArcSwap`, so a
//! lookup hashes the presented key once and reads the map without a lock (measured on a
//! dev machine: ~90 ns to hash a 50-byte key, ~250 ns with the lookup and the clone of
//! the principal). A task on the gateway's tracker reloads what changed every
//! `[limits] key_refresh` (2 s by default): the rows whose `updated_at_ms` is at or after
//! the newest it has seen, less [`OVERLAP_MS`], and a full reload every
//! [`FULL_RELOAD_EVERY`] as a backstop. Revoked keys leave the map, so a revocation made on
//! any instance (or with `sluice keys revoke`) is refused everywhere within one refresh.
//!
//! Auth is on when a master key is configured or when any virtual key exists, revoked ones
//! included: revoking the last key must not reopen the gateway to everyone. With neither,
//! the gateway is keyless, which [`crate::server::check_exposure`] allows on loopback only.
//! A public address needs the master key even when virtual keys exist: the keys table
//! can be empty (or emptied by hand) between starts, and keyless would follow.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::http::HeaderMap;
use hmac::Mac;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::ApiError;
use crate::store::{KeyRow, Store, key_digest};

/// Each reload also re-reads this much before the newest change it saw: a change stamped
/// just before a concurrent reload's query may commit just after it.
pub const OVERLAP_MS: i64 = 5_000;
/// A full reload, whatever the change stamps say (rows edited by hand, clocks stepped).
pub const FULL_RELOAD_EVERY: Duration = Duration::from_secs(300);

/// The caller, as the rest of the pipeline sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Principal {
    /// `master`, a virtual key's id (`key_...`), or `None` when the gateway runs keyless
    /// (loopback only). Never the key itself.
    pub key_id: Option<String>,
    /// Who the key belongs to (an app or a team); limits on end users are scoped by it.
    pub owner: Option<String>,
    /// The key's tier; `None` means the configured default tier.
    pub tier: Option<String>,
    /// Models this key may use (names or `prefix*`); empty = whatever its tier allows.
    pub models: Vec<String>,
    /// Whether the key may set its end user's tier with `x-sluice-tier`.
    pub can_assert_tier: bool,
    /// The master key: may use `/admin`.
    pub admin: bool,
}

impl Principal {
    fn master() -> Self {
        Principal {
            key_id: Some("master".into()),
            owner: Some("master".into()),
            can_assert_tier: true,
            admin: true,
            ..Principal::default()
        }
    }

    /// The caller a virtual key stands for. Never an admin: only the master key is.
    pub fn from_key(row: &KeyRow) -> Self {
        Principal {
            key_id: Some(row.id.clone()),
            owner: Some(row.owner.clone()),
            tier: row.tier.clone(),
            models: row.models.clone().unwrap_or_default(),
            can_assert_tier: row.can_assert_tier,
            admin: false,
        }
    }
}

/// The virtual keys one instance knows, as of its last reload.
#[derive(Debug, Default)]
struct KeySet {
    /// Active keys by the SHA-256 of the key.
    by_hash: HashMap<[u8; 32], Principal>,
    /// Some key exists in the store, revoked or not: auth is on.
    any: bool,
}

/// How the first load went; [`Auth::ready`] waits for it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Loaded {
    Pending,
    Yes,
    Failed(String),
}

/// Who may call: the master key and the virtual keys.
pub struct Auth {
    master: Option<SecretString>,
    keys: Arc<ArcSwap<KeySet>>,
    loaded: watch::Receiver<Loaded>,
    /// Stops the reload task: a child of the gateway's shutdown token, also cancelled when
    /// the `Auth` is dropped.
    stop: CancellationToken,
}

impl Drop for Auth {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Auth {
    /// The master key only, no virtual keys: for callers without a store.
    pub fn new(config: &Config) -> Self {
        let (_, loaded) = watch::channel(Loaded::Yes);
        Self {
            master: config.server.master_key.clone(),
            keys: Arc::default(),
            loaded,
            stop: CancellationToken::new(),
        }
    }

    /// The master key and the store's virtual keys, kept fresh by a task on `tasks` that
    /// reloads every `[limits] key_refresh` until `shutdown` is cancelled, this `Auth` is
    /// dropped (with its gateway, as the recorder ends) or [`Auth::stop`] is called. The
    /// first load runs at once; await [`Auth::ready`] before serving.
    pub fn start(
        config: &Config,
        store: Arc<Store>,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Self {
        let (loaded_tx, loaded) = watch::channel(Loaded::Pending);
        let keys: Arc<ArcSwap<KeySet>> = Arc::default();
        let stop = shutdown.child_token();
        let loader = Loader {
            store,
            keys: keys.clone(),
            cursor: 0,
            seen: HashMap::new(),
            last_full: None,
        };
        tasks.spawn(loader.run(config.limits.key_refresh, loaded_tx, stop.clone()));
        Self {
            master: config.server.master_key.clone(),
            keys,
            loaded,
            stop,
        }
    }

    /// Wait for the first load of the virtual keys; an error when it failed.
    pub async fn ready(&self) -> anyhow::Result<()> {
        let mut loaded = self.loaded.clone();
        let state = loaded
            .wait_for(|s| *s != Loaded::Pending)
            .await
            .map_err(|_| anyhow::anyhow!("the virtual key loader stopped before loading"))?
            .clone();
        match state {
            Loaded::Failed(e) => anyhow::bail!("cannot load the virtual keys: {e}"),
            Loaded::Pending | Loaded::Yes => Ok(()),
        }
    }

    /// Stop reloading virtual keys (the ones loaded stay); the gateway's shutdown token is
    /// left alone.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// No master key and no virtual key: every request is let in (loopback only).
    pub fn is_keyless(&self) -> bool {
        self.master.is_none() && !self.keys.load().any
    }

    /// Apply a key created or revoked on this instance at once, rather than at the next
    /// reload (which applies it again, harmlessly).
    pub fn note_change(&self, row: &KeyRow) {
        update(&self.keys, &[row]);
    }

    /// Whether a master (admin) key is configured.
    pub fn has_master_key(&self) -> bool {
        self.master.is_some()
    }

    /// Active virtual keys in this instance's cache.
    pub fn active_keys(&self) -> usize {
        self.keys.load().by_hash.len()
    }

    /// The caller behind the request's key; 401 for a missing, unknown or revoked key.
    /// The error never repeats the key, not even part of it.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let keys = self.keys.load();
        if self.master.is_none() && !keys.any {
            return Ok(Principal::default());
        }
        let Some(key) = presented_key(headers) else {
            return Err(ApiError::Unauthorized {
                message: "No API key provided. Send it as `Authorization: Bearer <key>`.".into(),
            });
        };
        if self.is_master(key) {
            return Ok(Principal::master());
        }
        if !keys.by_hash.is_empty()
            && let Some(principal) = keys.by_hash.get(&key_digest(key))
        {
            return Ok(principal.clone());
        }
        Err(ApiError::Unauthorized {
            message: "Incorrect API key provided: it is unknown or has been revoked.".into(),
        })
    }

    /// The master key's principal, for `/admin`: any other key, virtual keys included, is
    /// refused (401), and so is everything when no master key is configured.
    pub fn authenticate_admin(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        if self.master.is_none() {
            return Err(ApiError::Unauthorized {
                message: "The admin API is off: no admin key is configured. Set SLUICE_MASTER_KEY \
                          (or `[server] master_key`) and send it as `Authorization: Bearer <key>`."
                    .into(),
            });
        }
        match presented_key(headers) {
            Some(key) if self.is_master(key) => Ok(Principal::master()),
            Some(_) => Err(ApiError::Unauthorized {
                message: "Incorrect admin key provided: /admin needs the master key.".into(),
            }),
            None => Err(ApiError::Unauthorized {
                message: "No admin key provided. Send the master key as \
                          `Authorization: Bearer <key>`."
                    .into(),
            }),
        }
    }

    /// Whether `key` is the master (admin) key: the dashboard's login form.
    pub fn is_admin_key(&self, key: &str) -> bool {
        self.is_master(key.trim())
    }

    /// A dashboard session token valid until `expires_ms`: `EXPIRY.MAC`, the MAC an
    /// HMAC-SHA256 of the expiry keyed by the master key. It is not the key, cannot be
    /// turned back into it, works on every instance sharing the master key, and a new
    /// master key ends every session. `None` without a master key (no admin at all).
    pub fn issue_session(&self, expires_ms: i64) -> Option<String> {
        let mac = self.session_mac(expires_ms)?;
        Some(format!(
            "{expires_ms}.{}",
            hex::encode(mac.finalize().into_bytes())
        ))
    }

    /// Whether a session token from [`Auth::issue_session`] is genuine and unexpired.
    pub fn session_valid(&self, token: &str, now_ms: i64) -> bool {
        let Some((expiry, mac)) = token.split_once('.') else {
            return false;
        };
        let (Ok(expires_ms), Ok(mac)) = (expiry.parse::<i64>(), hex::decode(mac)) else {
            return false;
        };
        expires_ms > now_ms
            && self
                .session_mac(expires_ms)
                .is_some_and(|m| m.verify_slice(&mac).is_ok())
    }

    fn session_mac(&self, expires_ms: i64) -> Option<hmac::Hmac<sha2::Sha256>> {
        let master = self.master.as_ref()?;
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(master.expose_secret().as_bytes()).ok()?;
        mac.update(b"sluice dashboard session v1:");
        mac.update(expires_ms.to_string().as_bytes());
        Some(mac)
    }

    fn is_master(&self, key: &str) -> bool {
        self.master
            .as_ref()
            .is_some_and(|m| constant_time_eq(key.as_bytes(), m.expose_secret().as_bytes()))
    }
}

/// Reloads the virtual keys into the shared [`KeySet`].
struct Loader {
    store: Arc<Store>,
    keys: Arc<ArcSwap<KeySet>>,
    /// The newest `updated_at_ms` seen.
    cursor: i64,
    /// Each known key's `updated_at_ms`: a row seen before is not applied again.
    seen: HashMap<String, i64>,
    last_full: Option<tokio::time::Instant>,
}

impl Loader {
    async fn run(
        mut self,
        every: Duration,
        loaded: watch::Sender<Loaded>,
        stop: CancellationToken,
    ) {
        loop {
            let result = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                r = self.reload() => r,
            };
            match result {
                Ok(()) => {
                    loaded.send_if_modified(|s| std::mem::replace(s, Loaded::Yes) != Loaded::Yes);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "virtual keys could not be reloaded; keeping the last loaded set");
                    loaded.send_if_modified(|s| {
                        let first = *s == Loaded::Pending;
                        if first {
                            *s = Loaded::Failed(e.to_string());
                        }
                        first
                    });
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    async fn reload(&mut self) -> Result<(), sqlx::Error> {
        let full_due = self
            .last_full
            .is_none_or(|at| at.elapsed() >= FULL_RELOAD_EVERY);
        if full_due {
            self.full().await
        } else {
            self.changes().await
        }
    }

    async fn full(&mut self) -> Result<(), sqlx::Error> {
        let rows = self.store.list_keys().await?;
        let mut set = KeySet {
            by_hash: HashMap::with_capacity(rows.len()),
            any: !rows.is_empty(),
        };
        self.seen.clear();
        for row in &rows {
            apply(&mut set.by_hash, row);
            self.note(row);
        }
        self.keys.store(Arc::new(set));
        self.last_full = Some(tokio::time::Instant::now());
        Ok(())
    }

    async fn changes(&mut self) -> Result<(), sqlx::Error> {
        let rows = self
            .store
            .keys_changed_since(self.cursor.saturating_sub(OVERLAP_MS))
            .await?;
        let fresh: Vec<&KeyRow> = rows
            .iter()
            .filter(|r| self.seen.get(&r.id) != Some(&r.updated_at_ms))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        update(&self.keys, &fresh);
        for row in fresh {
            self.note(row);
        }
        Ok(())
    }

    fn note(&mut self, row: &KeyRow) {
        self.cursor = self.cursor.max(row.updated_at_ms);
        self.seen.insert(row.id.clone(), row.updated_at_ms);
    }
}

/// Copy on write: readers keep the old map until the new one is swapped in; `rcu` redoes
/// the copy if another writer swapped in between, so no change is lost.
fn update(keys: &ArcSwap<KeySet>, rows: &[&KeyRow]) {
    keys.rcu(|current| {
        let mut by_hash = current.by_hash.clone();
        for row in rows {
            apply(&mut by_hash, row);
        }
        KeySet { by_hash, any: true }
    });
}

/// Put an active key in the map, take a revoked one out.
fn apply(by_hash: &mut HashMap<[u8; 32], Principal>, row: &KeyRow) {
    let mut hash = [0u8; 32];
    if hex::decode_to_slice(&row.key_hash, &mut hash).is_err() {
        tracing::warn!(key_id = %row.id, "virtual key has a malformed hash; ignoring it");
        return;
    }
    if row.is_revoked() {
        by_hash.remove(&hash);
    } else {
        by_hash.insert(hash, Principal::from_key(row));
    }
}

/// The bearer key from `Authorization: Bearer ...` or Anthropic-style `x-api-key`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// Compare without returning early, so response time does not leak how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn master_key_is_required_when_set() {
        let config = Config::embedded_default(&[("SLUICE_MASTER_KEY", "s3cret")]).unwrap();
        let auth = Auth::new(&config);
        let mut h = HeaderMap::new();
        assert!(matches!(
            auth.authenticate(&h),
            Err(ApiError::Unauthorized { .. })
        ));
        h.insert("authorization", "Bearer wrong".parse().unwrap());
        assert!(auth.authenticate(&h).is_err());
        h.insert("authorization", "Bearer s3cret".parse().unwrap());
        let p = auth.authenticate(&h).unwrap();
        assert_eq!(p.key_id.as_deref(), Some("master"));
        assert!(p.admin);
        let open = Config::embedded_default(&[("X", "y")]).unwrap();
        let p = Auth::new(&open).authenticate(&HeaderMap::new()).unwrap();
        assert_eq!(p.key_id, None);
        assert!(!p.admin);
    }

    fn row(key: &str, id: &str, revoked: bool) -> KeyRow {
        KeyRow {
            id: id.into(),
            key_hash: crate::store::hash_key(key),
            hint: crate::store::key_hint(key),
            owner: "team-a".into(),
            tier: Some("pro".into()),
            models: Some(vec!["gpt-4o*".into()]),
            can_assert_tier: true,
            created_at_ms: 1,
            updated_at_ms: 2,
            revoked_at_ms: revoked.then_some(2),
        }
    }

    /// An `Auth` whose cache holds `rows`, as a reload would leave it.
    fn with_rows(config: &Config, rows: &[KeyRow]) -> Auth {
        let auth = Auth::new(config);
        let mut set = KeySet {
            any: !rows.is_empty(),
            ..KeySet::default()
        };
        for r in rows {
            apply(&mut set.by_hash, r);
        }
        auth.keys.store(Arc::new(set));
        auth
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {key}").parse().unwrap());
        h
    }

    #[test]
    fn a_virtual_key_becomes_its_principal() {
        let key = crate::store::generate_key();
        let key = key.expose_secret();
        let config = Config::embedded_default(&[("SLUICE_MASTER_KEY", "s3cret")]).unwrap();
        let auth = with_rows(&config, &[row(key, "key_1", false)]);
        let p = auth.authenticate(&bearer(key)).unwrap();
        assert_eq!(
            p,
            Principal {
                key_id: Some("key_1".into()),
                owner: Some("team-a".into()),
                tier: Some("pro".into()),
                models: vec!["gpt-4o*".into()],
                can_assert_tier: true,
                admin: false,
            }
        );
        // Anthropic-style header too.
        let mut h = HeaderMap::new();
        h.insert("x-api-key", key.parse().unwrap());
        assert_eq!(
            auth.authenticate(&h).unwrap().key_id.as_deref(),
            Some("key_1")
        );
        // A virtual key is never the admin key.
        assert!(auth.authenticate_admin(&bearer(key)).is_err());
        assert!(auth.authenticate_admin(&bearer("s3cret")).unwrap().admin);
    }

    #[test]
    fn refusals_never_repeat_the_key() {
        let key = crate::store::generate_key();
        let key = key.expose_secret();
        let config = Config::embedded_default(&[("SLUICE_MASTER_KEY", "s3cret")]).unwrap();
        let auth = with_rows(&config, &[row(key, "key_1", true)]);
        let wrong = format!("{key}x");
        for presented in [key, wrong.as_str()] {
            let e = auth.authenticate(&bearer(presented)).unwrap_err();
            assert_eq!(e.code(), "invalid_api_key");
            let body = e.body().to_string();
            assert!(!body.contains(&presented[..12]), "{body}");
            assert!(!body.contains(&presented[presented.len() - 4..]), "{body}");
        }
    }

    #[test]
    fn keys_turn_auth_on_without_a_master_key() {
        let open = Config::embedded_default(&[("X", "y")]).unwrap();
        let key = crate::store::generate_key();
        let key = key.expose_secret();
        // No keys at all: keyless, whatever is presented.
        let auth = with_rows(&open, &[]);
        assert!(auth.is_keyless());
        assert_eq!(auth.authenticate(&bearer("anything")).unwrap().key_id, None);
        // A key exists: a request needs it.
        let auth = with_rows(&open, &[row(key, "key_1", false)]);
        assert!(!auth.is_keyless());
        assert!(auth.authenticate(&HeaderMap::new()).is_err());
        assert!(auth.authenticate(&bearer("anything")).is_err());
        assert_eq!(
            auth.authenticate(&bearer(key)).unwrap().key_id.as_deref(),
            Some("key_1")
        );
        // Every key revoked: still on, the revoked key refused.
        let auth = with_rows(&open, &[row(key, "key_1", true)]);
        assert!(!auth.is_keyless());
        assert!(auth.authenticate(&bearer(key)).is_err());
        assert!(auth.authenticate(&HeaderMap::new()).is_err());
        // No master key: /admin is off, with a message saying how to turn it on.
        let e = auth.authenticate_admin(&bearer(key)).unwrap_err();
        assert!(e.to_string().contains("SLUICE_MASTER_KEY"), "{e}");
    }

    #[tokio::test]
    async fn the_reload_task_ends_with_the_auth_or_the_shutdown() {
        use std::time::Duration;
        let store = Store::open(&crate::store::StorageTarget::Memory)
            .await
            .unwrap();
        let config = Config::embedded_default(&[("X", "y")]).unwrap();
        let shutdown = CancellationToken::new();

        let tasks = TaskTracker::new();
        let auth = Auth::start(&config, store.clone(), &tasks, &shutdown);
        auth.ready().await.unwrap();
        tasks.close();
        let waiting = tokio::time::timeout(Duration::from_millis(50), tasks.wait()).await;
        assert!(
            waiting.is_err(),
            "the reload task runs while the Auth lives"
        );
        drop(auth);
        tokio::time::timeout(Duration::from_secs(1), tasks.wait())
            .await
            .unwrap();
        assert!(
            !shutdown.is_cancelled(),
            "dropping leaves the gateway's token alone"
        );

        let tasks = TaskTracker::new();
        let auth = Auth::start(&config, store, &tasks, &shutdown);
        auth.ready().await.unwrap();
        tasks.close();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), tasks.wait())
            .await
            .unwrap();
    }
}
