//! The response cache: an in-process tier (quick_cache, bounded by bytes, a TTL per entry) in
//! front of an optional Redis tier shared by every instance. Chat answers and embedding
//! vectors share the memory bound.
//!
//! Redis keys: `{prefix}cache:v2:{hex}` for answers and `{prefix}cache:v2:e:{hex}` for
//! embedding vectors, each written with `SET ... PX ttl`. A value is the entry's expiry
//! (Unix milliseconds, decimal), a newline, and its JSON: a lookup is one `MGET`, and an
//! entry read from Redis stays in memory no longer than Redis keeps it (reckoned by the
//! instances' clocks, which budgets' windows need in step anyway). They live apart from the rate
//! limiter's `{prefix}rl:` and the budget counters, and every one carries a TTL. Eviction:
//! under `maxmemory` with a `volatile-*` or `allkeys-*` policy Redis may evict ANY key with
//! a TTL, rate-limit buckets included, which would silently reset limits. Run the shared
//! Redis with `maxmemory-policy noeviction` (cache writes then fail when it is full, and
//! are counted as errors, never fail a request), or give the cache its own Redis or
//! database with `[cache] redis_url = "redis://host:6379/1"`.
//!
//! Writes go to Redis off the request's path: queued, and sent by one task as one
//! pipeline for whatever is queued (with `[redis] sync`, what one interval gathered), so
//! under load many requests' stores share a message. Another instance sees an entry once
//! its batch is sent; this one has it in memory at once.
//!
//! Redis failures are misses: a lookup that errs or times out (the `[redis]` timeout)
//! serves from upstream, a write that fails (or finds the queue full) is dropped; both are
//! counted (`sluice_cache_redis_errors_total`) and logged at most once a minute.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::config::CacheConfig;
use super::key::CacheKey;
use crate::batch::Combiner;
use crate::limits::config::RedisConfig;
use crate::redis_conn::{Reads, RedisConn, RedisPool};
use crate::telemetry::Metrics;
use crate::wire::ChatResponse;

/// Bumped with the layout of a Redis value or of [`CachedAnswer`]; part of every Redis
/// key.
const REDIS_NAMESPACE: &str = "cache:v2:";
/// Writes waiting for Redis at most (each about one answer's JSON); a store that finds
/// the queue full stays in memory only, counted as a Redis error.
const WRITE_QUEUE: usize = 4096;
/// Writes sent in one pipeline at most.
const WRITE_BATCH: usize = 256;
/// Redis errors are logged at most this often (each is counted).
const WARN_EVERY_MS: i64 = 60_000;
/// What an entry costs beyond its payload (key, bookkeeping), for the byte bound.
const ENTRY_OVERHEAD: usize = 96;
/// Memory a payload takes per byte of its JSON: entries are kept parsed (strings,
/// vectors, maps, each allocation with its own header). Run 7 measured about four times
/// the JSON size; with quick_cache, the full config at 500 req/s for 60 s measured
/// 1.28 bytes of RSS per unit of weight at four (1, 16 and 32 MiB bounds: 29.1, 48.0
/// and 68.6 MiB; bench/RESULTS.md, Run 11), so five. Churned harder (32 connections
/// for 30 s, 300k distinct answers through a full cache), five measured 1.27 bytes of
/// RSS per unit of weight (1 and 16 MiB bounds: 43.3 and 63.3 MB; Run 23), so seven.
/// Weighing by this keeps `memory_bytes` a bound on real memory.
const PARSED_PER_JSON_BYTE: usize = 7;

/// A whole chat answer as cached: a streamed answer is stored reassembled (text, finish
/// reason, usage) and replayed as SSE frames.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedAnswer {
    /// The complete answer, usage included (what a hit would have cost upstream).
    pub response: ChatResponse,
    /// The configured model that answered (the `x-sluice-model` of a hit).
    pub model: String,
    /// Unix milliseconds when the answer was stored.
    pub stored_at: i64,
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub memory_hits: u64,
    pub redis_hits: u64,
    pub misses: u64,
    pub stores: u64,
    pub redis_errors: u64,
    /// Approximate size of the in-process tier.
    pub memory_bytes: u64,
    pub memory_entries: u64,
}

#[derive(Clone)]
enum Payload {
    Answer(Arc<CachedAnswer>),
    Vector(Arc<Value>),
}

#[derive(Clone)]
struct Entry {
    payload: Payload,
    /// Past this, the entry is a miss (and removed when looked up); until then it only
    /// leaves when evicted for room.
    expires: Instant,
    weight: u32,
}

/// An entry weighs what it is estimated to take in memory (see [`entry`]).
#[derive(Clone, Copy)]
struct ByWeight;

impl quick_cache::Weighter<u128, Entry> for ByWeight {
    fn weight(&self, _: &u128, entry: &Entry) -> u64 {
        u64::from(entry.weight)
    }
}

/// The in-process tier. quick_cache rather than moka: with every request distinct
/// (a cache that mostly misses still stores every answer), moka's insert, with its
/// write log, timer wheel and housekeeping, took 3% of the gateway's CPU, and its
/// bookkeeping per entry cost memory beyond the byte bound; here an insert is a hash
/// table write under a shard lock, and expiry is a check on lookup.
type Memory = quick_cache::sync::Cache<u128, Entry, ByWeight>;

#[derive(Default)]
struct Counters {
    memory_hits: AtomicU64,
    redis_hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
}

struct RedisTier {
    /// Lookups, those that queue behind one in flight sent as one `MGET`.
    reads: Arc<Combiner<Reads>>,
    /// `{prefix}cache:v2:`.
    namespace: String,
    failures: Arc<Failures>,
    /// To the task that sends writes ([`RedisTier::writer`]).
    writes: mpsc::Sender<Write>,
}

/// A write for the writer task.
enum Write {
    Set {
        key: String,
        value: Vec<u8>,
        ttl_ms: u64,
    },
    /// Send everything queued before this at once, and answer when Redis has it (or the
    /// call failed).
    Flush(oneshot::Sender<()>),
}

/// The Redis tier's failures: counted, and logged at most once a minute.
struct Failures {
    count: AtomicU64,
    last_warn_ms: AtomicI64,
    metrics: Option<Arc<Metrics>>,
}

/// A chat lookup fetched, not yet counted: see [`ResponseCache::lookup`].
#[derive(Debug)]
pub struct Lookup {
    answer: Option<Arc<CachedAnswer>>,
    from: Origin,
}

/// Embedding vectors fetched, not yet counted: see [`ResponseCache::lookup_vectors`].
#[derive(Debug)]
pub struct VectorLookup {
    found: Vec<Option<Arc<Value>>>,
    from: Vec<Origin>,
}

/// Where a lookup ended.
#[derive(Debug)]
enum Origin {
    Memory,
    /// Not in memory, and there is no Redis tier.
    NoRedis,
    /// Asked Redis: a hit when the lookup has an answer.
    Redis,
    RedisFailed,
}

/// The two cache tiers behind one type; cheap to share in an `Arc`.
pub struct ResponseCache {
    memory: Memory,
    redis: Option<RedisTier>,
    counters: Counters,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl ResponseCache {
    /// The cache `config` describes: memory only, or memory in front of `config.redis`
    /// (on `pool`'s connection to it).
    /// Never waits for Redis (see [`RedisConn::connect`]); fails only for a bad URL or
    /// outside a Tokio runtime.
    pub fn new(
        config: &CacheConfig,
        pool: &mut RedisPool,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, String> {
        let redis = match &config.redis {
            Some(r) => Some(RedisTier::new(pool.conn(r)?, r, metrics.clone())),
            None => None,
        };
        Ok(Self {
            memory: memory_tier(config.memory_bytes),
            redis,
            counters: Counters::default(),
            metrics,
        })
    }

    /// An in-process cache only (tests, and gateways without Redis).
    pub fn memory_only(memory_bytes: u64) -> Self {
        Self {
            memory: memory_tier(memory_bytes),
            redis: None,
            counters: Counters::default(),
            metrics: None,
        }
    }

    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// The cached answer for `key`: memory first, then Redis (a Redis hit fills the
    /// memory tier for the entry's remaining TTL). A Redis failure is a miss.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        let found = self.lookup(key).await;
        self.take(found)
    }

    /// [`get`](Self::get) in two halves, for a lookup sent before the request is known
    /// to go ahead (with its limit and budget checks, in the same round trip): `lookup`
    /// fetches, and counts only Redis failures; [`take`](Self::take) counts the hit or
    /// miss once the request uses the answer. A lookup dropped untaken counts nothing.
    pub async fn lookup(&self, key: &CacheKey) -> Lookup {
        if let Some(Payload::Answer(a)) = self.memory_get(key) {
            return Lookup {
                answer: Some(a),
                from: Origin::Memory,
            };
        }
        let Some(redis) = &self.redis else {
            return Lookup {
                answer: None,
                from: Origin::NoRedis,
            };
        };
        let found = match redis.get_many(vec![redis.answer_key(key)]).await {
            Ok(mut found) => found.pop().flatten(),
            Err(e) => {
                self.redis_failed("chat", e);
                return Lookup {
                    answer: None,
                    from: Origin::RedisFailed,
                };
            }
        };
        let answer = found.and_then(|(bytes, ttl)| {
            let answer = Arc::new(serde_json::from_slice::<CachedAnswer>(&bytes).ok()?);
            self.memory.insert(
                key.0,
                entry(Payload::Answer(answer.clone()), ttl, bytes.len()),
            );
            Some(answer)
        });
        Lookup {
            answer,
            from: Origin::Redis,
        }
    }

    /// Count a [`lookup`](Self::lookup) the request goes ahead with; its answer.
    pub fn take(&self, found: Lookup) -> Option<Arc<CachedAnswer>> {
        self.count("chat", &found.from, found.answer.is_some());
        found.answer
    }

    /// One lookup's hit or miss, by where it ended (a Redis failure was counted as it
    /// happened).
    fn count(&self, kind: &'static str, from: &Origin, hit: bool) {
        if matches!(from, Origin::Memory) {
            self.hit(kind, "memory");
            return;
        }
        self.lookup_metric(kind, "memory", "miss");
        match (from, hit) {
            (Origin::Redis, true) => self.hit(kind, "redis"),
            (Origin::Redis, false) => {
                self.lookup_metric(kind, "redis", "miss");
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Store `answer` under `key` for `ttl` (zero: not stored) in both tiers. Returns when
    /// Redis has it, or failed to take it within the `[redis]` timeout.
    pub async fn put(&self, key: CacheKey, answer: CachedAnswer, ttl: Duration) {
        self.store(key, answer, ttl, None);
        self.flush().await;
    }

    /// [`put`](Self::put) for the hot path: the memory tier has the answer when this
    /// returns, and the Redis write, when there is a Redis tier, is queued. The answer
    /// is not serialized only to be weighed: `json_len`, its length as JSON when the
    /// caller knows it, is its weight, else it is counted without a buffer. The cache
    /// keeps the parsed answer only: the upstream's bytes (`response.raw`), when the
    /// answer has them, become the Redis value's `response` as they are.
    pub fn store(
        &self,
        key: CacheKey,
        mut answer: CachedAnswer,
        ttl: Duration,
        json_len: Option<usize>,
    ) {
        let raw = answer.response.raw.take();
        if ttl.is_zero() {
            return;
        }
        let value = match &self.redis {
            Some(_) => match answer_value(&answer, raw.as_deref(), ttl) {
                Some(v) => Some(v),
                None => return,
            },
            None => None,
        };
        let len = match (&value, json_len) {
            (Some(v), _) => v.len(),
            (None, Some(n)) => n,
            (None, None) => match serialized_len(&answer) {
                Some(n) => n,
                None => return,
            },
        };
        self.memory
            .insert(key.0, entry(Payload::Answer(Arc::new(answer)), ttl, len));
        self.stored("chat", 1);
        if let (Some(redis), Some(value)) = (&self.redis, value) {
            redis.queue(redis.answer_key(&key), value, ttl);
        }
    }

    /// Send every Redis write queued so far, and return when Redis has them (or failed
    /// to take them within the `[redis]` timeout). For a stopping gateway, and for
    /// callers that need another instance to see what they stored.
    pub async fn flush(&self) {
        if let Some(redis) = &self.redis {
            redis.flush().await;
        }
    }

    /// Cached embedding vectors for `keys`, in order: memory first, then one Redis round
    /// trip for everything memory did not have.
    pub async fn get_vectors(&self, keys: &[CacheKey]) -> Vec<Option<Arc<Value>>> {
        let found = self.lookup_vectors(keys).await;
        self.take_vectors(found)
    }

    /// [`get_vectors`](Self::get_vectors) in two halves, as [`lookup`](Self::lookup)
    /// and [`take`](Self::take) are for answers.
    pub async fn lookup_vectors(&self, keys: &[CacheKey]) -> VectorLookup {
        let (mut found, mut from): (Vec<_>, Vec<_>) = keys
            .iter()
            .map(|k| match self.memory_get(k) {
                Some(Payload::Vector(v)) => (Some(v), Origin::Memory),
                _ => (None, Origin::NoRedis),
            })
            .unzip();
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        let Some(redis) = self.redis.as_ref().filter(|_| !missing.is_empty()) else {
            return VectorLookup { found, from };
        };
        let redis_keys: Vec<String> = missing
            .iter()
            .map(|&i| redis.vector_key(&keys[i]))
            .collect();
        match redis.get_many(redis_keys).await {
            Ok(hits) => {
                for (&i, hit) in missing.iter().zip(hits) {
                    from[i] = Origin::Redis;
                    found[i] = hit.and_then(|(bytes, ttl)| {
                        let v = Arc::new(serde_json::from_slice::<Value>(&bytes).ok()?);
                        self.memory.insert(
                            keys[i].0,
                            entry(Payload::Vector(v.clone()), ttl, bytes.len()),
                        );
                        Some(v)
                    });
                }
            }
            Err(e) => {
                self.redis_failed("embedding", e);
                for &i in &missing {
                    from[i] = Origin::RedisFailed;
                }
            }
        }
        VectorLookup { found, from }
    }

    /// Count a [`lookup_vectors`](Self::lookup_vectors) the request goes ahead with;
    /// the vectors, in the keys' order.
    pub fn take_vectors(&self, found: VectorLookup) -> Vec<Option<Arc<Value>>> {
        for (from, vector) in found.from.iter().zip(&found.found) {
            self.count("embedding", from, vector.is_some());
        }
        found.found
    }

    /// Store embedding vectors, and return when Redis has them (or failed to).
    pub async fn put_vectors(&self, items: Vec<(CacheKey, Value)>, ttl: Duration) {
        self.store_vectors(items, ttl);
        self.flush().await;
    }

    /// [`put_vectors`](Self::put_vectors) for the hot path: in memory at once, the
    /// Redis writes queued.
    pub fn store_vectors(&self, items: Vec<(CacheKey, Value)>, ttl: Duration) {
        if ttl.is_zero() || items.is_empty() {
            return;
        }
        let n = items.len() as u64;
        for (key, vector) in items {
            let Some(value) = redis_value(ttl, |out| serde_json::to_writer(out, &vector)) else {
                continue;
            };
            self.memory.insert(
                key.0,
                entry(Payload::Vector(Arc::new(vector)), ttl, value.len()),
            );
            if let Some(redis) = &self.redis {
                redis.queue(redis.vector_key(&key), value, ttl);
            }
        }
        self.stored("embedding", n);
    }

    /// Drop every in-process entry (Redis keeps its own; it expires them).
    pub fn clear_memory(&self) {
        self.memory.clear();
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            memory_hits: c.memory_hits.load(Ordering::Relaxed),
            redis_hits: c.redis_hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            stores: c.stores.load(Ordering::Relaxed),
            redis_errors: self
                .redis
                .as_ref()
                .map_or(0, |r| r.failures.count.load(Ordering::Relaxed)),
            memory_bytes: self.memory.weight(),
            memory_entries: self.memory.len() as u64,
        }
    }

    /// The unexpired in-process entry for `key`; an expired one is removed (unless a
    /// fresh one took its place meanwhile).
    fn memory_get(&self, key: &CacheKey) -> Option<Payload> {
        let entry = self.memory.get(&key.0)?;
        let now = Instant::now();
        if entry.expires > now {
            return Some(entry.payload);
        }
        self.memory.remove_if(&key.0, |e| e.expires <= now);
        None
    }

    fn hit(&self, kind: &'static str, tier: &'static str) {
        let counter = if tier == "memory" {
            &self.counters.memory_hits
        } else {
            &self.counters.redis_hits
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.lookup_metric(kind, tier, "hit");
    }

    fn lookup_metric(&self, kind: &'static str, tier: &'static str, result: &'static str) {
        if let Some(m) = &self.metrics {
            m.cache_lookup(kind, tier, result);
        }
    }

    fn stored(&self, kind: &'static str, n: u64) {
        self.counters.stores.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.cache_stored(kind, n, self.memory.weight());
        }
    }

    fn redis_failed(&self, kind: &'static str, error: String) {
        if let Some(redis) = &self.redis {
            redis.failures.record("get", Some(kind), &error, 1);
        }
    }
}

impl Failures {
    /// `n` failed writes (`op` "put") or one failed lookup of `lookup` kind ("get").
    fn record(&self, op: &'static str, lookup: Option<&'static str>, error: &str, n: u64) {
        self.count.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.cache_redis_error(op, n);
            if let Some(kind) = lookup {
                m.cache_lookup(kind, "redis", "error");
            }
        }
        let now = crate::usage::now_ms();
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY_MS
            && self
                .last_warn_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%error, "the Redis cache failed; serving from memory and upstream (logged once a minute, counted in sluice_cache_redis_errors_total)");
        }
    }
}

/// Shard locks keep lookups on different cores apart, but each shard holds an equal
/// share of the bytes and refuses an entry heavier than its share: at least 4 MiB a
/// shard, at most 8 shards.
const MIN_SHARD_BYTES: u64 = 4 << 20;
/// For sizing the table up front: a typical answer's weight (about 1 KiB of JSON).
const TYPICAL_WEIGHT: u64 = 1024 * PARSED_PER_JSON_BYTE as u64;

fn memory_tier(bytes: u64) -> Memory {
    let shards = (bytes / MIN_SHARD_BYTES).clamp(1, 8);
    let items = (bytes / TYPICAL_WEIGHT).clamp(32, 1 << 20);
    let options = quick_cache::OptionsBuilder::new()
        .shards(usize::try_from(shards).unwrap_or(1))
        .estimated_items_capacity(usize::try_from(items).unwrap_or(32))
        .weight_capacity(bytes.max(1))
        .build();
    match options {
        Ok(options) => {
            Memory::with_options(options, ByWeight, Default::default(), Default::default())
        }
        // Every field above is set and in range; should the crate still refuse them,
        // its defaults with the same bound do the job.
        Err(_) => {
            Memory::with_weighter(usize::try_from(items).unwrap_or(32), bytes.max(1), ByWeight)
        }
    }
}

/// The length of `value` as JSON, counted as it is written, without a buffer.
fn serialized_len<T: serde::Serialize>(value: &T) -> Option<usize> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).ok()?;
    Some(count.0)
}

fn entry(payload: Payload, ttl: Duration, payload_bytes: usize) -> Entry {
    Entry {
        payload,
        // A TTL too long for the clock is as good as forever (a century).
        expires: Instant::now()
            .checked_add(ttl)
            .or_else(|| Instant::now().checked_add(Duration::from_secs(100 * 365 * 86_400)))
            .unwrap_or_else(Instant::now),
        weight: u32::try_from(
            payload_bytes
                .saturating_mul(PARSED_PER_JSON_BYTE)
                .saturating_add(ENTRY_OVERHEAD),
        )
        .unwrap_or(u32::MAX),
    }
}

/// A Redis value: the expiry `ttl` from now (Unix ms), a newline, then what `json`
/// writes. `None` when `json` fails.
fn redis_value(
    ttl: Duration,
    json: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
) -> Option<Vec<u8>> {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let mut out = Vec::with_capacity(256);
    writeln!(out, "{}", crate::usage::now_ms().saturating_add(ttl_ms)).ok()?;
    json(&mut out).ok()?;
    Some(out)
}

/// A Redis value for `answer` kept `ttl` (see [`redis_value`]); with the upstream's
/// bytes `raw`, those are its `response`, not the parsed answer written out again.
fn answer_value(answer: &CachedAnswer, raw: Option<&[u8]>, ttl: Duration) -> Option<Vec<u8>> {
    redis_value(ttl, |out| {
        let Some(raw) = raw else {
            return serde_json::to_writer(out, answer);
        };
        // By hand: the object `CachedAnswer` serializes to, around bytes that parsed as
        // its `response` (a test holds the two to the same fields).
        out.extend_from_slice(b"{\"model\":");
        serde_json::to_writer(&mut *out, &answer.model)?;
        write!(out, ",\"stored_at\":{},\"response\":", answer.stored_at)
            .map_err(serde_json::Error::io)?;
        out.extend_from_slice(raw);
        out.push(b'}');
        Ok(())
    })
}

/// The JSON of a Redis value, and how long it has left; `None` for a value that is
/// malformed or past its expiry.
fn parse_value(value: &[u8], now_ms: i64) -> Option<(&[u8], Duration)> {
    let newline = value.iter().position(|&b| b == b'\n')?;
    let expires: i64 = std::str::from_utf8(&value[..newline]).ok()?.parse().ok()?;
    let left = u64::try_from(expires.checked_sub(now_ms)?).ok()?;
    (left > 0).then(|| (&value[newline + 1..], Duration::from_millis(left)))
}

impl RedisTier {
    fn new(conn: RedisConn, config: &RedisConfig, metrics: Option<Arc<Metrics>>) -> Self {
        let failures = Arc::new(Failures {
            count: AtomicU64::new(0),
            last_warn_ms: AtomicI64::new(i64::MIN / 2),
            metrics,
        });
        // With `[redis] sync`, stores wait up to one interval to share a message, as the
        // synced limit and budget counts do; else what is queued goes at once.
        let linger = config.sync.unwrap_or(Duration::ZERO);
        let writes = Self::writer(conn.clone(), failures.clone(), linger);
        Self {
            reads: Reads::new(conn.clone(), "cache get", "cache_read"),
            namespace: format!("{}{REDIS_NAMESPACE}", config.prefix),
            failures,
            writes,
        }
    }

    fn answer_key(&self, key: &CacheKey) -> String {
        format!("{}{}", self.namespace, key.hex())
    }

    fn vector_key(&self, key: &CacheKey) -> String {
        format!("{}e:{}", self.namespace, key.hex())
    }

    /// Each key's value and remaining TTL, in one `MGET`; `None` for a missing key, one
    /// past its expiry, or a malformed value.
    async fn get_many(
        &self,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(Vec<u8>, Duration)>>, String> {
        let values = self.reads.run(keys).await?;
        let now = crate::usage::now_ms();
        Ok(values
            .into_iter()
            .map(|v| {
                let mut v = v?;
                let (json, left) = parse_value(&v, now)?;
                let expiry_line = v.len() - json.len();
                v.drain(..expiry_line);
                Some((v, left))
            })
            .collect())
    }

    /// Queue a write for the writer task; a full queue (or a writer that ended, which
    /// only a panic does while the tier lives) drops it, counted.
    fn queue(&self, key: String, value: Vec<u8>, ttl: Duration) {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        if self
            .writes
            .try_send(Write::Set { key, value, ttl_ms })
            .is_err()
        {
            self.failures
                .record("put", None, "the queue of Redis writes is full", 1);
        }
    }

    async fn flush(&self) {
        let (done, sent) = oneshot::channel();
        if self.writes.send(Write::Flush(done)).await.is_ok() {
            let _ = sent.await;
        }
    }

    /// The task that sends queued writes: one pipeline for what is queued (what
    /// `linger` gathers, at most [`WRITE_BATCH`]), a flush sending at once. It ends when
    /// the tier is dropped, after sending what is left.
    fn writer(conn: RedisConn, failures: Arc<Failures>, linger: Duration) -> mpsc::Sender<Write> {
        let (tx, mut rx) = mpsc::channel::<Write>(WRITE_QUEUE);
        let flushing = |batch: &[Write]| batch.iter().any(|w| matches!(w, Write::Flush(_)));
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(WRITE_BATCH);
            while crate::batch::gather(&mut rx, &mut batch, WRITE_BATCH, linger, flushing).await > 0
            {
                let mut pipe = redis::pipe();
                let mut sets = 0;
                let mut done = Vec::new();
                for write in batch.drain(..) {
                    match write {
                        Write::Set { key, value, ttl_ms } => {
                            pipe.cmd("SET")
                                .arg(key)
                                .arg(value)
                                .arg("PX")
                                .arg(ttl_ms)
                                .ignore();
                            sets += 1;
                        }
                        Write::Flush(d) => done.push(d),
                    }
                }
                if sets > 0 {
                    let mut con = conn.handle();
                    if let Err(e) = conn
                        .within("cache put", pipe.query_async::<()>(&mut con))
                        .await
                    {
                        failures.record("put", None, &e, sets);
                    }
                }
                for d in done {
                    let _ = d.send(());
                }
            }
        });
        tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ChatMessage, Choice, Usage};

    pub(crate) fn answer(text: &str) -> CachedAnswer {
        CachedAnswer {
            response: ChatResponse {
                id: "chatcmpl-1".into(),
                object: "chat.completion".into(),
                created: 1,
                model: "gpt-4o-mini".into(),
                choices: vec![Choice {
                    index: 0,
                    message: ChatMessage::assistant(text),
                    finish_reason: Some("stop".into()),
                    extra: Default::default(),
                }],
                usage: Some(Usage::new(10, 5)),
                extra: Default::default(),
                raw: None,
            },
            model: "gpt-4o-mini".into(),
            stored_at: 0,
        }
    }

    #[tokio::test]
    async fn memory_tier_hits_misses_and_counts() {
        let c = ResponseCache::memory_only(1 << 20);
        let k = CacheKey(7);
        assert!(c.get(&k).await.is_none());
        c.put(k, answer("hello"), Duration::from_secs(60)).await;
        let hit = c.get(&k).await.unwrap();
        assert_eq!(hit.response.choices[0].message.text(), "hello");
        assert_eq!(hit.response.usage, Some(Usage::new(10, 5)));
        // A vector under another key never reads as an answer.
        c.put_vectors(
            vec![(CacheKey(8), serde_json::json!([0.5]))],
            Duration::from_secs(60),
        )
        .await;
        assert!(c.get(&CacheKey(8)).await.is_none());
        let s = c.stats();
        assert_eq!((s.memory_hits, s.misses, s.stores), (1, 2, 2));
        assert!(c.stats().memory_bytes > 0);
    }

    #[test]
    fn an_answer_written_around_the_upstream_bytes_is_the_answer_serialized() {
        let mut a = answer("from \"upstream\"");
        a.model = "m\u{e9}\n".into();
        a.stored_at = 1_700_000_000_123;
        let raw = serde_json::to_vec(&a.response).unwrap();
        let ttl = Duration::from_secs(60);
        let by_hand = answer_value(&a, Some(&raw), ttl).unwrap();
        let by_serde = answer_value(&a, None, ttl).unwrap();
        let now = crate::usage::now_ms();
        let (hand, left) = parse_value(&by_hand, now).unwrap();
        let (serde, _) = parse_value(&by_serde, now).unwrap();
        assert!(
            left <= ttl && left > ttl - Duration::from_secs(5),
            "{left:?}"
        );
        // The same object, field for field (a field added to `CachedAnswer` and not
        // written by hand fails here).
        let hand: Value = serde_json::from_slice(hand).unwrap();
        let serde: Value = serde_json::from_slice(serde).unwrap();
        assert_eq!(hand, serde);
        let back: CachedAnswer = serde_json::from_value(hand).unwrap();
        assert_eq!(back.model, a.model);
    }

    #[test]
    fn a_value_is_its_expiry_then_its_json() {
        let now = 1_000_000;
        assert_eq!(
            parse_value(b"1000250\n{\"a\":1}", now),
            Some((&b"{\"a\":1}"[..], Duration::from_millis(250)))
        );
        for bad in [
            &b"1000000\n{}"[..],
            b"999999\n{}",
            b"{}",
            b"\n{}",
            b"soon\n{}",
            b"-5\n{}",
            b"",
        ] {
            assert_eq!(
                parse_value(bad, now),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn zero_ttl_is_not_stored_and_entries_expire() {
        let c = ResponseCache::memory_only(1 << 20);
        c.put(CacheKey(1), answer("x"), Duration::ZERO).await;
        assert!(c.get(&CacheKey(1)).await.is_none());
        c.put(CacheKey(2), answer("x"), Duration::from_millis(30))
            .await;
        assert!(c.get(&CacheKey(2)).await.is_some());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(c.get(&CacheKey(2)).await.is_none());
    }

    #[tokio::test]
    async fn the_memory_tier_is_bounded_by_bytes() {
        let c = ResponseCache::memory_only(16 * 1024);
        let big = "x".repeat(1500);
        for i in 0..100 {
            c.put(CacheKey(i), answer(&big), Duration::from_secs(60))
                .await;
        }
        let s = c.stats();
        assert!(s.memory_bytes <= 16 * 1024, "{s:?}");
        assert!(s.memory_entries < 100, "{s:?}");
        assert!(s.memory_entries > 0, "it still holds what fits: {s:?}");
        assert!(
            c.get(&CacheKey(99)).await.is_some(),
            "the newest entry is kept"
        );
    }
}
