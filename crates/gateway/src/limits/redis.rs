//! The Redis limit store: exact limits shared by every gateway instance. Each check,
//! settlement and abuse signal is a job of one Lua script (`limits_v1.lua`) that reads
//! Redis's clock, so the read-modify-write is atomic across instances and immune to
//! their clock skew. Checks and settlements that arrive while one call is on its way go
//! together in the next ([`Combiner`], one for checks and one for settlements): one
//! script run, each key read and written once. The connection is a [`RedisConn`], which
//! reconnects by itself; every call is bounded by the configured timeout and fails as
//! [`BackendError::Unavailable`], so the limiter can fall back or refuse.
//!
//! Keys: `{prefix}rl:v1:{kind}:{logical key}`, where `v1` is the script's version and
//! `kind` keeps the kinds of state apart as the memory store's maps do (`b` buckets, `l`
//! leases, `c` signal counters, `p` penalties, and `s` the per-instance lease counts of
//! [`SyncedBackend`](super::synced::SyncedBackend)): a logical name used for a
//! bucket and a lease never meets itself as the wrong Redis type, and [`Backend::penalties`]
//! scans exactly the penalty keys. Every key carries a TTL. Logical keys (they hold end
//! user ids) reach Redis only as script KEYS, never inside the script's source.
//!
//! Script layouts (ARGV[1] names the operation):
//!
//! | op | KEYS | ARGV after the op |
//! | --- | --- | --- |
//! | `check` | each check's keys in turn: its penalty key (when given), bucket keys, lease keys | the number of checks, then per check: `has_penalty` (`1`/`0`), `n` charges, `m` leases, then `increment_us period_us` per charge, then `max ttl_us id` per lease |
//! | `settle` | each settlement's keys in turn: bucket keys, then lease keys | the number of settlements, then per settlement: `+` or `-`, `n`, `m`, then `increment_us` per bucket, then the lease id per lease |
//! | `signal` | counter key, penalty key | `window_ms threshold penalty period_ms` |
//! | `sync` | n bucket keys, m synced-lease hashes, p penalty keys | `n m p instance lease_ttl_ms`, then the signed TAT move (µs) per bucket, then the leases held per hash |
//!
//! `check` and `settle` take one request or several (as separate calls back to back
//! would run) and answer one reply each: a settlement's `1`, a check's `{0, penalty,
//! pttl_ms}` when penalized, else the string `1 now_us refused tat...` (one reply
//! value, not 3 + n; see [`decimals`](crate::redis_conn::decimals)) with `refused` the
//! 0-based index of the first refusing charge or lease (-1 for none) and, per charge,
//! the TAT it was charged against (0 for one at or before now: an idle bucket, which
//! charges from now either way); [`gcra::charge`] on those gives the exact bucket
//! states here, so the script does no multiplication that a double could round.
//!
//! Not for Redis Cluster: one check's keys belong to different users and tiers, so they
//! would hash to different slots.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{RedisResult, Script, Value};

use super::backend::{
    ActivePenalty, Backend, BackendError, Bucket, BucketState, Check, Lease, Signal, Verdict,
};
use super::combine::{CheckJob, LimitCalls, SettleJob};
use super::config::RedisConfig;
use super::gcra;
use crate::batch::Combiner;
use crate::redis_conn::{RedisConn, decimals, int};

/// The script's name and version; the version is also in every key it writes.
pub const SCRIPT_NAME: &str = "limits_v1";
const SCRIPT_VERSION: &str = "v1";
/// The script as Redis runs it: the prelude every Sluice script shares, then its own.
const SCRIPT_SOURCE: &str = concat!(
    include_str!("../redis_prelude.lua"),
    include_str!("limits_v1.lua")
);

/// Periods, lease ttls and increments are clamped to 2^50 µs (~35.7 years) so every sum
/// the script makes stays an exact integer in a Lua double (see `limits_v1.lua`).
const MAX_SPAN_US: u64 = 1 << 50;

/// What a refused lease asks the client to wait, as the memory store does.
const LEASE_RETRY: Duration = Duration::from_secs(1);

/// Keys read back per pipelined round trip in admin listings.
const SCAN_BATCH: usize = 500;

/// The four kinds of state, each under its own key segment.
#[derive(Clone, Copy)]
enum Kind {
    Bucket,
    Lease,
    Counter,
    Penalty,
    SyncedLease,
}

impl Kind {
    fn segment(self) -> &'static str {
        match self {
            Kind::Bucket => "b:",
            Kind::Lease => "l:",
            Kind::Counter => "c:",
            Kind::Penalty => "p:",
            Kind::SyncedLease => "s:",
        }
    }
}

pub struct RedisBackend {
    conn: RedisConn,
    script: Script,
    /// Checks, and apart from them settlements: an admission never waits behind the
    /// settlements of requests that have finished.
    checks: Arc<Combiner<LimitCalls<CheckJob>>>,
    settlements: Arc<Combiner<LimitCalls<SettleJob>>>,
    /// `{prefix}rl:v1:`
    base: String,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("keys", &self.base)
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn span_us(d: Duration) -> u64 {
    us(d).min(MAX_SPAN_US)
}

/// Whole milliseconds, at least one (Redis refuses a zero expiry).
fn ms(d: Duration) -> u64 {
    span_us(d).div_ceil(1000).max(1)
}

impl RedisBackend {
    /// A store for `config`. Never waits for Redis: the connection is made in the
    /// background and remade whenever it drops; until then every call fails as
    /// [`BackendError::Unavailable`] within `config.timeout`. Fails only for a URL that
    /// does not parse, or outside a Tokio runtime.
    pub fn new(config: &RedisConfig) -> Result<RedisBackend, BackendError> {
        let conn = RedisConn::connect(config, "limit store").map_err(BackendError::Unavailable)?;
        Ok(RedisBackend::with_conn(conn, config))
    }

    /// A store for `config` on a connection made already (shared with other stores).
    pub fn with_conn(conn: RedisConn, config: &RedisConfig) -> RedisBackend {
        let script = Script::new(SCRIPT_SOURCE);
        RedisBackend {
            checks: conn.combiner("limit_check", LimitCalls::new(conn.clone(), script.clone())),
            settlements: conn.combiner(
                "limit_settle",
                LimitCalls::new(conn.clone(), script.clone()),
            ),
            conn,
            script,
            base: format!("{}rl:{SCRIPT_VERSION}:", config.prefix),
        }
    }

    /// What sends the checks (its counts show how they were combined).
    pub fn checks(&self) -> &Arc<Combiner<LimitCalls<CheckJob>>> {
        &self.checks
    }

    /// What sends the settlements.
    pub fn settlements(&self) -> &Arc<Combiner<LimitCalls<SettleJob>>> {
        &self.settlements
    }

    /// The full Redis key for a logical key.
    fn key(&self, kind: Kind, logical: &str) -> String {
        let segment = kind.segment();
        let mut key = String::with_capacity(self.base.len() + segment.len() + logical.len());
        key.push_str(&self.base);
        key.push_str(segment);
        key.push_str(logical);
        key
    }

    /// Run one round trip within the timeout; every failure is `Unavailable`.
    async fn within<T>(
        &self,
        what: &str,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, BackendError> {
        self.conn
            .within(what, call)
            .await
            .map_err(BackendError::Unavailable)
    }
}

pub(super) fn bad_reply(what: &str) -> BackendError {
    BackendError::Unavailable(format!("redis {what}: unexpected reply from {SCRIPT_NAME}"))
}

/// How far `delta` units move `bucket`'s TAT, in µs, for `settle`.
fn adjust_increment(bucket: &Bucket, delta: i64) -> u64 {
    let period = span_us(bucket.period);
    gcra::increment(delta.unsigned_abs(), bucket.limit, period).min(MAX_SPAN_US)
}

/// What one bucket's step looks like to the script: the exact increment, clamped so a
/// charge larger than the bucket (which never fits) stays a small number.
fn increment(cost: u64, bucket: &Bucket) -> (u64, u64) {
    let period = span_us(bucket.period);
    let inc = gcra::increment(cost, bucket.limit, period).min(period + 1);
    (inc, period)
}

/// Read the `check` reply into a verdict, deriving the bucket states exactly: the
/// string `1 now_us refused tat...` when the check ran, `{0, penalty, pttl_ms}` when a
/// penalty stands.
fn verdict(reply: &Value, check: &Check) -> Result<Verdict, BackendError> {
    match reply {
        Value::BulkString(text) => checked(text, check).ok_or_else(|| bad_reply("check")),
        Value::Array(items) if items.first().and_then(int) == Some(0) => {
            let penalty = items
                .get(1)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .ok_or_else(|| bad_reply("check"))?;
            let pttl = items
                .get(2)
                .and_then(int)
                .ok_or_else(|| bad_reply("check"))?;
            Ok(Verdict::Penalized {
                penalty,
                remaining: Duration::from_millis(u64::try_from(pttl).unwrap_or(0)),
            })
        }
        _ => Err(bad_reply("check")),
    }
}

/// A check that ran: `1 now_us refused tat...` (decimal, one space apart), with one
/// TAT per charge; `None` for anything else.
fn checked(text: &[u8], check: &Check) -> Option<Verdict> {
    let fields = decimals(text)?;
    let n = check.charges.len();
    let [1, now, refused, ref tats @ ..] = fields[..] else {
        return None;
    };
    if tats.len() != n {
        return None;
    }
    let now = u64::try_from(now).ok()?;
    let mut states = Vec::with_capacity(n);
    let mut steps = Vec::with_capacity(n);
    for (c, tat) in check.charges.iter().zip(tats) {
        let tat = u64::try_from(*tat).ok()?;
        let period = span_us(c.bucket.period);
        let step = gcra::charge(tat, now, c.cost, c.bucket.limit, period);
        states.push(BucketState {
            limit: c.bucket.limit,
            remaining: step.remaining,
            reset: Duration::from_micros(step.reset_us),
        });
        steps.push(step);
    }
    if refused == -1 {
        return Some(Verdict::Allowed { states });
    }
    let index = usize::try_from(refused).ok()?;
    let retry_after = match steps.get(index) {
        Some(step) => Duration::from_micros(step.retry_after_us),
        None if index < n + check.leases.len() => LEASE_RETRY,
        None => return None,
    };
    Some(Verdict::Refused {
        index,
        retry_after,
        states,
    })
}

/// One instance's reconciliation with Redis: the `sync` operation (see
/// [`SyncedBackend`](super::synced::SyncedBackend)). Keys are logical.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncCall {
    /// A bucket and the net TAT move (µs, signed) this instance made since its last
    /// sync; 0 only reads it.
    pub buckets: Vec<(String, i64)>,
    /// A lease key and how many leases this instance holds on it now.
    pub leases: Vec<(String, u64)>,
    /// Penalty keys to read.
    pub penalties: Vec<String>,
}

impl SyncCall {
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty() && self.leases.is_empty() && self.penalties.is_empty()
    }
}

/// What Redis holds after a [`SyncCall`], in the call's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReply {
    /// Redis's clock, µs since the Unix epoch.
    pub now_us: u64,
    /// Each bucket's TAT on Redis's clock (0: idle).
    pub tats: Vec<u64>,
    /// Leases the other instances hold, per lease key.
    pub others: Vec<u64>,
    /// Each penalty in force and how long it still holds.
    pub penalties: Vec<Option<(String, Duration)>>,
}

fn sync_reply(reply: &Value, call: &SyncCall) -> Result<SyncReply, BackendError> {
    let bad = || bad_reply("sync");
    let Value::Array(items) = reply else {
        return Err(bad());
    };
    let (n, m, p) = (call.buckets.len(), call.leases.len(), call.penalties.len());
    if items.len() != 1 + n + m + 2 * p {
        return Err(bad());
    }
    let uint = |v: &Value| int(v).and_then(|i| u64::try_from(i).ok()).ok_or_else(bad);
    let now_us = uint(&items[0])?;
    let tats = items[1..=n].iter().map(uint).collect::<Result<_, _>>()?;
    let others = items[1 + n..1 + n + m]
        .iter()
        .map(uint)
        .collect::<Result<_, _>>()?;
    let penalties = items[1 + n + m..]
        .chunks_exact(2)
        .map(|pair| match (&pair[0], int(&pair[1])) {
            // Gone, or expiring as it was read.
            (Value::Nil, _) | (_, None | Some(..=0)) => Ok(None),
            (v, Some(pttl)) => redis::from_redis_value_ref::<String>(v)
                .map(|penalty| Some((penalty, Duration::from_millis(pttl.unsigned_abs()))))
                .map_err(|_| bad()),
        })
        .collect::<Result<_, _>>()?;
    Ok(SyncReply {
        now_us,
        tats,
        others,
        penalties,
    })
}

impl RedisBackend {
    /// Reconcile one instance's own counting with Redis in one script call: add its
    /// bucket moves, publish its lease counts (each standing for `lease_ttl` unless
    /// renewed), and read back every bucket, the other instances' leases and the
    /// penalties.
    pub async fn sync(
        &self,
        instance: &str,
        lease_ttl: Duration,
        call: &SyncCall,
    ) -> Result<SyncReply, BackendError> {
        let mut invoke = self.script.prepare_invoke();
        invoke
            .arg("sync")
            .arg(call.buckets.len())
            .arg(call.leases.len())
            .arg(call.penalties.len())
            .arg(instance)
            .arg(ms(lease_ttl));
        for (key, net) in &call.buckets {
            let clamped = i64::try_from(net.unsigned_abs().min(MAX_SPAN_US)).unwrap_or(0);
            invoke
                .key(self.key(Kind::Bucket, key))
                .arg(clamped * net.signum());
        }
        for (key, held) in &call.leases {
            invoke.key(self.key(Kind::SyncedLease, key)).arg(*held);
        }
        for key in &call.penalties {
            invoke.key(self.key(Kind::Penalty, key));
        }
        let mut con = self.conn.handle();
        let reply: Value = self.within("sync", invoke.invoke_async(&mut con)).await?;
        sync_reply(&reply, call)
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn check(&self, check: &Check) -> Result<Verdict, BackendError> {
        if check.penalty_key.is_none() && check.charges.is_empty() && check.leases.is_empty() {
            return Ok(Verdict::Allowed { states: Vec::new() });
        }
        let job = CheckJob {
            penalty: check
                .penalty_key
                .as_ref()
                .map(|p| self.key(Kind::Penalty, p)),
            charges: check
                .charges
                .iter()
                .map(|c| {
                    let (inc, period) = increment(c.cost, &c.bucket);
                    (self.key(Kind::Bucket, &c.bucket.key), inc, period)
                })
                .collect(),
            leases: check
                .leases
                .iter()
                .map(|l| {
                    let key = self.key(Kind::Lease, &l.key);
                    (key, l.max, span_us(l.ttl), l.id.clone())
                })
                .collect(),
        };
        let reply = self.checks.run(job).await?;
        verdict(&reply, check)
    }

    /// A settlement of one bucket.
    async fn adjust(&self, bucket: &Bucket, delta: i64) -> Result<(), BackendError> {
        self.settle(std::slice::from_ref(bucket), delta, &[]).await
    }

    /// A settlement of one lease.
    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        self.settle(&[], 0, std::slice::from_ref(lease)).await
    }

    /// Every adjustment and release in one job: at most one round trip (and one script
    /// run) per finished request, shared with whatever else goes at that moment. The
    /// call names the script by its hash and loads it again when Redis has lost it (a
    /// restart, `SCRIPT FLUSH`).
    async fn settle(
        &self,
        buckets: &[Bucket],
        delta: i64,
        leases: &[Lease],
    ) -> Result<(), BackendError> {
        let buckets = if delta == 0 { &[][..] } else { buckets };
        if buckets.is_empty() && leases.is_empty() {
            return Ok(());
        }
        let job = SettleJob {
            forward: delta > 0,
            buckets: buckets
                .iter()
                .map(|b| (self.key(Kind::Bucket, &b.key), adjust_increment(b, delta)))
                .collect(),
            leases: leases
                .iter()
                .map(|l| (self.key(Kind::Lease, &l.key), l.id.clone()))
                .collect(),
        };
        match self.settlements.run(job).await? {
            Value::Int(1) => Ok(()),
            _ => Err(bad_reply("settle")),
        }
    }

    async fn signal(&self, signal: &Signal) -> Result<bool, BackendError> {
        let mut call = self.script.prepare_invoke();
        call.arg("signal")
            .arg(ms(signal.window))
            .arg(signal.threshold)
            .arg(&signal.penalty)
            .arg(ms(signal.period))
            .key(self.key(Kind::Counter, &signal.counter_key))
            .key(self.key(Kind::Penalty, &signal.penalty_key));
        let mut con = self.conn.handle();
        let started: i64 = self.within("signal", call.invoke_async(&mut con)).await?;
        Ok(started == 1)
    }

    async fn penalties(&self) -> Result<Vec<ActivePenalty>, BackendError> {
        let base = self.key(Kind::Penalty, "");
        let keys = self
            .conn
            .scan_prefix("penalties", &base)
            .await
            .map_err(BackendError::Unavailable)?;
        let mut con = self.conn.handle();
        let mut out = Vec::new();
        for batch in keys.chunks(SCAN_BATCH) {
            let mut pipe = redis::pipe();
            for k in batch {
                pipe.cmd("GET").arg(k).cmd("PTTL").arg(k);
            }
            let answers: Vec<Value> = self.within("penalties", pipe.query_async(&mut con)).await?;
            for (k, pair) in batch.iter().zip(answers.chunks_exact(2)) {
                // Gone between the SCAN and the GET: it just expired.
                let (Ok(penalty), Some(left)) = (
                    redis::from_redis_value_ref::<String>(&pair[0]),
                    int(&pair[1]).and_then(|v| u64::try_from(v).ok()),
                ) else {
                    continue;
                };
                out.push(ActivePenalty {
                    key: k[base.len()..].to_string(),
                    penalty,
                    remaining: Duration::from_millis(left),
                });
            }
        }
        Ok(out)
    }

    async fn clear_penalty(&self, key: &str) -> Result<bool, BackendError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key(Kind::Penalty, key));
        let mut con = self.conn.handle();
        let removed: i64 = self
            .within("clear_penalty", cmd.query_async(&mut con))
            .await?;
        Ok(removed > 0)
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let mut con = self.conn.handle();
        self.within("ping", redis::cmd("PING").query_async::<()>(&mut con))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::backend::{Charge, Unit};
    use secrecy::SecretString;

    fn charge(limit: u64, period: Duration, cost: u64) -> Charge {
        Charge {
            bucket: Bucket {
                key: "b".into(),
                limit,
                period,
            },
            cost,
            unit: Unit::Tokens,
        }
    }

    #[test]
    fn a_huge_charge_stays_a_small_exact_number_for_the_script() {
        let day = Duration::from_secs(86_400);
        // 10^9 tokens a day, 10^9 asked: cost * period is 8.64e19, past a double's
        // exact integers; the increment passed is computed in 128 bits.
        let (inc, period) = increment(1_000_000_000, &charge(1_000_000_000, day, 0).bucket);
        assert_eq!((inc, period), (86_400_000_000, 86_400_000_000));
        // More than the bucket holds: clamped just past the period (always refused).
        let (inc, _) = increment(u64::MAX, &charge(7, day, 0).bucket);
        assert_eq!(inc, 86_400_000_001);
        assert!(inc < 1 << 53);
    }

    #[test]
    fn the_check_reply_becomes_exact_states() {
        let now = 1_800_000_000_000_000u64;
        let check = Check {
            penalty_key: None,
            charges: vec![
                charge(100, Duration::from_secs(60), 60),
                charge(10, Duration::from_secs(60), 5),
            ],
            leases: vec![],
        };
        // The second bucket already spent 8 of 10: refused, index 1.
        let text = format!("1 {now} 1 0 {}", now + 48_000_000);
        let reply = Value::BulkString(text.clone().into_bytes());
        let Ok(Verdict::Refused {
            index,
            retry_after,
            states,
        }) = verdict(&reply, &check)
        else {
            panic!("expected a refusal")
        };
        assert_eq!(index, 1);
        assert_eq!(retry_after, Duration::from_secs(18));
        assert_eq!(states[0].remaining, 40);
        assert_eq!(states[1].remaining, 2);
        let penalized = Value::Array(vec![
            Value::Int(0),
            Value::BulkString(b"block".to_vec()),
            Value::Int(1500),
        ]);
        assert_eq!(
            verdict(&penalized, &check).ok(),
            Some(Verdict::Penalized {
                penalty: "block".into(),
                remaining: Duration::from_millis(1500)
            })
        );
        assert!(verdict(&Value::Int(3), &check).is_err());
        // Allowed: both charges fit (the second bucket had spent 2 of 10).
        let fits = format!("1 {now} -1 0 {}", now + 12_000_000);
        let Ok(Verdict::Allowed { states }) = verdict(&Value::BulkString(fits.into()), &check)
        else {
            panic!("expected admission")
        };
        assert_eq!(
            states.iter().map(|s| s.remaining).collect::<Vec<_>>(),
            [40, 3]
        );
        // A TAT too few or too many, a field that is not a number, a negative TAT or
        // clock, a refusal index past every charge and lease or below -1, a status other
        // than 1, two spaces: each a bad reply, never a verdict.
        for bad in [
            format!("1 {now} -1 0"),
            format!("{text} 5"),
            format!("1 {now} -1 0 x"),
            format!("1 {now} -1 -4 0"),
            "1 -5 -1 0 0".to_string(),
            format!("1 {now} 2 0 0"),
            format!("1 {now} -2 0 0"),
            format!("2 {now} -1 0 0"),
            format!("1  {now} -1 0 0"),
            String::new(),
        ] {
            assert!(
                verdict(&Value::BulkString(bad.clone().into()), &check).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_sync_reply_is_read_in_the_call_order() {
        let call = SyncCall {
            buckets: vec![("a".into(), 5), ("b".into(), 0)],
            leases: vec![("l".into(), 2)],
            penalties: vec!["p1".into(), "p2".into()],
        };
        let reply = Value::Array(vec![
            Value::Int(1_000),
            Value::Int(1_500),
            Value::Int(0),
            Value::Int(3),
            Value::BulkString(b"block".to_vec()),
            Value::Int(2_000),
            Value::Nil,
            Value::Int(-2),
        ]);
        let r = sync_reply(&reply, &call).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.now_us, 1_000);
        assert_eq!(r.tats, [1_500, 0]);
        assert_eq!(r.others, [3]);
        assert_eq!(
            r.penalties,
            [Some(("block".into(), Duration::from_secs(2))), None]
        );
        // One item short, or a negative count: refused, never guessed.
        let Value::Array(items) = reply else {
            unreachable!()
        };
        let short = Value::Array(items[..7].to_vec());
        assert!(sync_reply(&short, &call).is_err());
        let mut negative = items.clone();
        negative[3] = Value::Int(-1);
        assert!(sync_reply(&Value::Array(negative), &call).is_err());
    }

    #[test]
    fn scan_patterns_take_the_prefix_literally() {
        use crate::redis_conn::glob_escape;
        assert_eq!(glob_escape("a*b?[c]\\:"), "a\\*b\\?\\[c\\]\\\\:");
    }

    #[test]
    fn urls_that_cannot_be_served_fail_without_showing_the_password() {
        for url in [
            "redis://:hunter2@127.0.0.1:notaport",
            "http://:hunter2@127.0.0.1:6379",
            "rediss://:hunter2@127.0.0.1:6379",
        ] {
            let config = RedisConfig {
                url: SecretString::from(url),
                prefix: "t:".into(),
                on_failure: super::super::config::FailMode::Open,
                timeout: Duration::from_millis(100),
                sync: None,
            };
            match RedisBackend::new(&config) {
                Err(BackendError::Unavailable(m)) => assert!(!m.contains("hunter2"), "{m}"),
                Ok(b) => panic!("{url} accepted: {b:?}"),
            }
        }
    }
}
