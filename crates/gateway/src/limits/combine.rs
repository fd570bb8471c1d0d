//! Checks and settlements for the Redis limit store, combined ([`Combiner`]): while one
//! script call is on its way, the calls that arrive wait and then go together as one
//! `check` (or `settle`) call of `limits_v1.lua`. Redis runs the jobs one after the
//! other exactly as it would run separate calls back to back, so limits stay exact; but
//! it reads and writes each key once per batch, and concurrent requests mostly name the
//! same buckets (their key's, their tier's, the total). At low load nothing waits.
//!
//! [`Combiner`]: crate::batch::Combiner

use std::marker::PhantomData;
use std::time::Duration;

use redis::{Script, ScriptInvocation, Value};

use super::backend::BackendError;
use super::redis::bad_reply;
use crate::batch::Batch;
use crate::redis_conn::RedisConn;

/// A check, its keys already in their Redis form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckJob {
    pub penalty: Option<String>,
    /// Bucket key, increment (µs), period (µs).
    pub charges: Vec<(String, u64, u64)>,
    /// Lease key, max, ttl (µs), lease id.
    pub leases: Vec<(String, u64, u64, String)>,
}

/// A settlement, its keys already in their Redis form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleJob {
    /// Forward (`+`, a charge after the fact) or back (`-`, a refund).
    pub forward: bool,
    /// Bucket key, increment (µs).
    pub buckets: Vec<(String, u64)>,
    /// Lease key, lease id.
    pub leases: Vec<(String, String)>,
}

/// A job of `limits_v1.lua`'s `check` or `settle` operation, which take one or more.
pub trait ScriptJob: Send + Sync + 'static {
    /// The operation (ARGV[1]).
    const OP: &'static str;
    /// Sent even when its caller stopped waiting (see [`Batch::SEND_ABANDONED`]).
    const MUST_LAND: bool;
    /// This job's keys and arguments, after the ones before it.
    fn write(&self, call: &mut ScriptInvocation<'_>);
}

impl ScriptJob for CheckJob {
    const OP: &'static str = "check";
    /// A check nobody waits for would charge for a request that is not admitted by it.
    const MUST_LAND: bool = false;

    fn write(&self, call: &mut ScriptInvocation<'_>) {
        call.arg(if self.penalty.is_some() { "1" } else { "0" })
            .arg(self.charges.len())
            .arg(self.leases.len());
        if let Some(p) = &self.penalty {
            call.key(p);
        }
        for (key, inc, period) in &self.charges {
            call.key(key).arg(inc).arg(period);
        }
        for (key, max, ttl, id) in &self.leases {
            call.key(key).arg(max).arg(ttl).arg(id);
        }
    }
}

impl ScriptJob for SettleJob {
    const OP: &'static str = "settle";
    /// Refunds and releases what its check took.
    const MUST_LAND: bool = true;

    fn write(&self, call: &mut ScriptInvocation<'_>) {
        call.arg(if self.forward { "+" } else { "-" })
            .arg(self.buckets.len())
            .arg(self.leases.len());
        for (key, inc) in &self.buckets {
            call.key(key).arg(inc);
        }
        for (key, id) in &self.leases {
            call.key(key).arg(id);
        }
    }
}

/// Sends jobs of one kind as calls of `limits_v1.lua`, one reply per job.
pub struct LimitCalls<J> {
    conn: RedisConn,
    script: Script,
    jobs: PhantomData<fn(J)>,
}

impl<J> LimitCalls<J> {
    pub fn new(conn: RedisConn, script: Script) -> Self {
        LimitCalls {
            conn,
            script,
            jobs: PhantomData,
        }
    }
}

impl<J: ScriptJob> Batch for LimitCalls<J> {
    type Job = J;
    type Reply = Value;
    type Error = BackendError;

    const MAX_JOBS: usize = 128;
    const SEND_ABANDONED: bool = J::MUST_LAND;

    async fn send(&self, jobs: &[&J]) -> Result<Vec<Value>, BackendError> {
        // Each job's keys and arguments in turn, as separate calls would have them.
        let mut call = self.script.prepare_invoke();
        call.arg(J::OP).arg(jobs.len());
        for job in jobs {
            job.write(&mut call);
        }
        let mut con = self.conn.handle();
        let reply: Value = self
            .conn
            .within(J::OP, call.invoke_async(&mut con))
            .await
            .map_err(BackendError::Unavailable)?;
        match reply {
            Value::Array(items) => Ok(items),
            _ => Err(bad_reply(J::OP)),
        }
    }

    fn patience(&self) -> Duration {
        self.conn.timeout()
    }

    fn gave_up(&self, why: &str) -> BackendError {
        BackendError::Unavailable(format!("redis {}: {why}", J::OP))
    }
}
