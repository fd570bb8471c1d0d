//! Rate limiting: tiers, per key / end user / tier limits, abuse penalties, and provider
//! capacity. One [`Backend`] trait with a memory store (one instance), a Redis store
//! (several instances; every check one atomic script) and a synced store (several
//! instances, each counting locally and reconciling with Redis every few ms).

pub mod backend;
pub mod capacity;
pub mod combine;
pub mod config;
pub mod gcra;
pub mod limiter;
pub mod memory;
pub mod redis;
pub mod synced;

pub use backend::{
    Backend, BackendError, Bucket, BucketState, Charge, Check, Lease, Unit, Verdict,
};
pub use config::{LimitsConfig, Rates, Tier};
pub use limiter::{Admission, Limiter, LimiterStatus, RateHeaders, Subject};

use std::sync::Arc;

use async_trait::async_trait;

use crate::redis_conn::RedisPool;
use crate::telemetry::{RecordBatch, RecordSink};

/// The shared limit store when `[redis]` is configured, on `pool`'s connection.
pub fn shared_backend(
    config: &LimitsConfig,
    pool: &mut RedisPool,
) -> anyhow::Result<Option<Arc<dyn Backend>>> {
    let Some(redis_config) = &config.redis else {
        return Ok(None);
    };
    let conn = pool
        .conn(redis_config)
        .map_err(backend::BackendError::Unavailable)?;
    let backend = redis::RedisBackend::with_conn(conn, redis_config);
    Ok(Some(match redis_config.sync {
        Some(interval) => synced::SyncedBackend::start(backend, interval),
        None => Arc::new(backend),
    }))
}

/// Feeds finished records to the limiter's abuse counters, off the request path.
pub struct AbuseSink(pub Arc<Limiter>);

#[async_trait]
impl RecordSink for AbuseSink {
    async fn write(&mut self, batch: &RecordBatch) {
        for record in batch.iter() {
            self.0.observe(record).await;
        }
    }
}
