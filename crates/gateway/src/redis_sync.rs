//! What the synced stores share (`[redis] sync`: [`SyncedBackend`] for limits,
//! [`SyncedLedger`] for budgets): the task that reconciles each with Redis every
//! interval, and how long a value read from Redis is trusted.
//!
//! [`SyncedBackend`]: crate::limits::synced::SyncedBackend
//! [`SyncedLedger`]: crate::usage::ledger::SyncedLedger

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// A key read from Redis longer ago than this many intervals is read again before a
/// check uses it.
pub const STALE_INTERVALS: u32 = 3;

/// How often local state nobody used for this long is dropped.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Values read from Redis before this are stale for a store syncing every `interval`.
pub fn fresh_since(interval: Duration) -> Instant {
    let now = Instant::now();
    now.checked_sub(interval * STALE_INTERVALS).unwrap_or(now)
}

/// A store that keeps counts locally and reconciles them with Redis.
pub trait Reconcile: Send + Sync + 'static {
    /// What it counts, for logs ("limit", "budget").
    const WHAT: &'static str;
    /// One reconciliation with Redis.
    fn reconcile(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Forget local state not used since `since`.
    fn sweep(&self, since: Instant);
}

/// Reconcile `store` every `interval` (the first one interval from now: a check reads
/// what it needs before that) while it lives, and sweep it every [`SWEEP_EVERY`]. A run
/// of failures is logged once, and its end once.
pub fn spawn<T: Reconcile>(store: &Arc<T>, interval: Duration) {
    tokio::spawn(run(Arc::downgrade(store), interval));
}

async fn run<T: Reconcile>(store: Weak<T>, interval: Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept = Instant::now();
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else {
            return;
        };
        match store.reconcile().await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(what = T::WHAT, "sync with Redis works again");
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(what = T::WHAT, %error, "sync with Redis failed; counting locally and retrying every interval");
            }
            Err(_) => {}
        }
        if swept.elapsed() >= SWEEP_EVERY {
            store.sweep(Instant::now() - SWEEP_EVERY);
            swept = Instant::now();
        }
    }
}
