//! What a limit store does, whichever it is: charge several buckets and take leases
//! all-or-nothing, reconcile after the fact, count abuse signals and hold penalties.
//! [`MemoryBackend`](super::memory::MemoryBackend) serves one instance;
//! [`RedisBackend`](super::redis::RedisBackend) serves several, each check one atomic
//! server-side script.

use std::time::Duration;

use async_trait::async_trait;

/// A rate bucket: `limit` units per `period`. `key` is logical (`u:owner:user:rpm`);
/// a backend adds its own prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bucket {
    pub key: String,
    pub limit: u64,
    pub period: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Requests,
    Tokens,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
        }
    }
}

/// Take `cost` units from a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub bucket: Bucket,
    pub cost: u64,
    pub unit: Unit,
}

/// A concurrency slot: at most `max` leases on `key` at once. A lease not released
/// within `ttl` (an instance died) expires by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub max: u64,
    /// Unique per request (the request id).
    pub id: String,
    pub ttl: Duration,
}

/// One admission check: the penalty first, then every charge and lease together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Check {
    /// When this key holds a penalty, nothing is charged and the penalty comes back.
    pub penalty_key: Option<String>,
    pub charges: Vec<Charge>,
    pub leases: Vec<Lease>,
}

/// A bucket's state after a check, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything charged and leased; one state per charge, in order.
    Allowed { states: Vec<BucketState> },
    /// Nothing charged or leased. `index` points into `charges`, or past them into
    /// `leases` (`charges.len() + i`). `states` has one entry per charge.
    Refused {
        index: usize,
        retry_after: Duration,
        states: Vec<BucketState>,
    },
    /// The penalty key is set: its value and how long it still holds.
    Penalized {
        penalty: String,
        remaining: Duration,
    },
}

/// Count one abuse signal in a fixed window of `window`; when the count reaches
/// `threshold`, set `penalty_key` to `penalty` for `period` (unless already set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub counter_key: String,
    pub window: Duration,
    pub threshold: u64,
    pub penalty_key: String,
    pub penalty: String,
    pub period: Duration,
}

/// A penalty in force, for `/admin` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ActivePenalty {
    /// The logical penalty key (`p:owner:user`).
    pub key: String,
    pub penalty: String,
    #[serde(with = "humantime_serde")]
    pub remaining: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("limit store unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// `memory` or `redis`, for logs and metrics.
    fn name(&self) -> &'static str;
    async fn check(&self, check: &Check) -> Result<Verdict, BackendError>;
    /// Add (`delta > 0`) or refund (`delta < 0`) units on a bucket after the fact.
    async fn adjust(&self, bucket: &Bucket, delta: i64) -> Result<(), BackendError>;
    async fn release(&self, lease: &Lease) -> Result<(), BackendError>;
    /// A finished request's whole settlement: `delta` on every bucket (0: none) and
    /// every lease released. One after the other by default; a networked store sends
    /// them in one round trip. Every part is tried; the first error is returned.
    async fn settle(
        &self,
        buckets: &[Bucket],
        delta: i64,
        leases: &[Lease],
    ) -> Result<(), BackendError> {
        let mut first = Ok(());
        if delta != 0 {
            for bucket in buckets {
                let done = self.adjust(bucket, delta).await;
                first = first.and(done);
            }
        }
        for lease in leases {
            let done = self.release(lease).await;
            first = first.and(done);
        }
        first
    }
    /// Count a signal; `true` when this signal started the penalty.
    async fn signal(&self, signal: &Signal) -> Result<bool, BackendError>;
    async fn penalties(&self) -> Result<Vec<ActivePenalty>, BackendError>;
    /// Lift a penalty early (admin).
    async fn clear_penalty(&self, key: &str) -> Result<bool, BackendError>;
    async fn ping(&self) -> Result<(), BackendError>;
    /// Send whatever this store still holds back for the shared store (at shutdown,
    /// once every request has settled). Nothing to do for a store that holds nothing.
    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}
