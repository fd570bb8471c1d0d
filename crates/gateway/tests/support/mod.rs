//! Shared by the integration tests: the real PostgreSQL they run against.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use secrecy::SecretString;
use sluice_gateway::store::StorageTarget;

/// `SLUICE_TEST_DATABASE_URL`, or the local server every dev and CI machine runs.
pub fn database_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A PostgreSQL target in a fresh schema of its own, so tests never see each other's rows.
pub fn postgres_target() -> StorageTarget {
    let schema = format!("sluice_test_{}", uuid_like());
    StorageTarget::Postgres {
        url: SecretString::from(database_url()),
        schema: Some(schema),
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}_{}_{}",
        t,
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Both backends the request log supports, each fresh.
pub fn backends() -> Vec<(&'static str, StorageTarget)> {
    vec![
        ("sqlite", StorageTarget::Memory),
        ("postgres", postgres_target()),
    ]
}

/// Open a store, failing with a clear message when PostgreSQL is not running.
pub async fn open(
    name: &str,
    target: &StorageTarget,
) -> std::sync::Arc<sluice_gateway::store::Store> {
    match sluice_gateway::store::Store::open(target).await {
        Ok(s) => s,
        Err(e) => panic!(
            "cannot open the {name} store: {e:#}\n(PostgreSQL tests need a server at SLUICE_TEST_DATABASE_URL, default {}; start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`)",
            database_url()
        ),
    }
}
