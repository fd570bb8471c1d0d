//! The response cache: an in-process tier (quick_cache, bounded by bytes, a TTL per entry) in
//! front of an optional Redis tier shared by every instance. Chat answers and embedding
//! vectors share the memory bound.
//!
//! Redis keys: `{prefix}cache:v1:{hex}` for answers and `{prefix}cache:v1:e:{hex}` for
//! embedding vectors, each written with `SET ... PX ttl`. They live apart from the rate
//! limiter's `{prefix}rl:` and the budget counters, and every one carries a TTL. Eviction:
//! under `maxmemory` with a `volatile-*` or `allkeys-*` policy Redis may evict ANY key with
//! a TTL, rate-limit buckets included, which would silently reset limits. Run the shared
//! Redis with `maxmemory-policy noeviction` (cache writes then fail when it is full, and
//! are counted as errors, never fail a request), or give the cache its own Redis or
//! database with `[cache] redis_url = "redis://host:6379/1"`.
//!
//! Redis failures are misses: a lookup that errs or times out (the `[redis]` timeout)
//! serves from upstream, a write that fails is dropped; both are counted
//! (`sluice_cache_redis_errors_total`) and logged at most once a minute.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::CacheConfig;
use super::key::CacheKey;
use crate::limits::config::RedisConfig;
use crate::redis_conn::{RedisConn, RedisPool};
use crate::telemetry::Metrics;
use crate::wire::ChatResponse;

/// Bumped with [`CachedAnswer`]'s layout; part of every Redis key.
const REDIS_NAMESPACE: &str = "cache:v1:";
/// Redis errors are logged at most this often (each is counted).
const WARN_EVERY_MS: i64 = 60_000;
/// What an entry costs beyond its payload (key, bookkeeping), for the byte bound.
const ENTRY_OVERHEAD: usize = 96;
/// Memory a payload takes per byte of its JSON: entries are kept parsed (strings,
/// vectors, maps, each allocation with its own header). Run 7 measured about four times
/// the JSON size; with quick_cache, the full config at 500 req/s for 60 s measured
/// 1.28 bytes of RSS per unit of weight at four (1, 16 and 32 MiB bounds: 29.1, 48.0
/// and 68.6 MiB; bench/RESULTS.md, Run 11), so five. Weighing by this keeps
/// `memory_bytes` a bound on real memory.
const PARSED_PER_JSON_BYTE: usize = 5;

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
    redis_errors: AtomicU64,
}

struct RedisTier {
    conn: RedisConn,
    /// `{prefix}cache:v1:`.
    namespace: String,
    last_warn_ms: AtomicI64,
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
            Some(r) => Some(RedisTier::new(pool.conn(r)?, r)),
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
        let found = match redis.get_many(&[redis.answer_key(key)]).await {
            Ok(mut found) => found.pop().flatten(),
            Err(e) => {
                self.redis_failed("get", "chat", e);
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
        if let Some(bytes) = self.insert_answer(key, answer, ttl, None) {
            self.redis_put(key, bytes, ttl).await;
        }
    }

    /// [`put`](Self::put) for the hot path: the memory tier has the answer when this
    /// returns; the Redis write, when there is a Redis tier, is the future returned, for
    /// the caller to spawn. Without Redis nothing is spawned, and the answer is not
    /// serialized only to be weighed: `json_len`, its length as JSON when the caller
    /// knows it, is its weight, else it is counted without a buffer.
    pub fn store(
        self: &Arc<Self>,
        key: CacheKey,
        answer: CachedAnswer,
        ttl: Duration,
        json_len: Option<usize>,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let bytes = self.insert_answer(key, answer, ttl, json_len)?;
        let cache = Arc::clone(self);
        Some(async move { cache.redis_put(key, bytes, ttl).await })
    }

    /// The memory half of a store; the answer as JSON when Redis is to have it too.
    fn insert_answer(
        &self,
        key: CacheKey,
        answer: CachedAnswer,
        ttl: Duration,
        json_len: Option<usize>,
    ) -> Option<Vec<u8>> {
        if ttl.is_zero() {
            return None;
        }
        let (len, bytes) = match &self.redis {
            Some(_) => {
                let bytes = serde_json::to_vec(&answer).ok()?;
                (bytes.len(), Some(bytes))
            }
            None => (json_len.or_else(|| serialized_len(&answer))?, None),
        };
        self.memory
            .insert(key.0, entry(Payload::Answer(Arc::new(answer)), ttl, len));
        self.stored("chat", 1);
        bytes
    }

    async fn redis_put(&self, key: CacheKey, bytes: Vec<u8>, ttl: Duration) {
        if let Some(redis) = &self.redis
            && let Err(e) = redis
                .set_many(vec![(redis.answer_key(&key), bytes)], ttl)
                .await
        {
            self.redis_failed("put", "chat", e);
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
        match redis.get_many(&redis_keys).await {
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
                self.redis_failed("get", "embedding", e);
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

    /// Store embedding vectors (one Redis round trip for all of them).
    pub async fn put_vectors(&self, items: Vec<(CacheKey, Value)>, ttl: Duration) {
        if ttl.is_zero() || items.is_empty() {
            return;
        }
        let mut writes = Vec::with_capacity(items.len());
        let n = items.len() as u64;
        for (key, vector) in items {
            let Ok(bytes) = serde_json::to_vec(&vector) else {
                continue;
            };
            self.memory.insert(
                key.0,
                entry(Payload::Vector(Arc::new(vector)), ttl, bytes.len()),
            );
            if let Some(redis) = &self.redis {
                writes.push((redis.vector_key(&key), bytes));
            }
        }
        self.stored("embedding", n);
        if let Some(redis) = &self.redis
            && let Err(e) = redis.set_many(writes, ttl).await
        {
            self.redis_failed("put", "embedding", e);
        }
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
            redis_errors: c.redis_errors.load(Ordering::Relaxed),
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

    fn redis_failed(&self, op: &'static str, kind: &'static str, error: String) {
        self.counters.redis_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.cache_redis_error(op);
            if op == "get" {
                m.cache_lookup(kind, "redis", "error");
            }
        }
        let Some(redis) = &self.redis else { return };
        let now = crate::usage::now_ms();
        let last = redis.last_warn_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY_MS
            && redis
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

impl RedisTier {
    fn new(conn: RedisConn, config: &RedisConfig) -> Self {
        Self {
            conn,
            namespace: format!("{}{REDIS_NAMESPACE}", config.prefix),
            last_warn_ms: AtomicI64::new(i64::MIN / 2),
        }
    }

    fn answer_key(&self, key: &CacheKey) -> String {
        format!("{}{}", self.namespace, key.hex())
    }

    fn vector_key(&self, key: &CacheKey) -> String {
        format!("{}e:{}", self.namespace, key.hex())
    }

    /// Each key's value and remaining TTL, in one round trip; `None` for a missing key
    /// (or one about to expire).
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<(Vec<u8>, Duration)>>, String> {
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GET").arg(k).cmd("PTTL").arg(k);
        }
        let mut con = self.conn.handle();
        let values: Vec<redis::Value> = self
            .conn
            .within("cache get", pipe.query_async(&mut con))
            .await?;
        let mut values = values.into_iter();
        let mut out = Vec::with_capacity(keys.len());
        while let (Some(v), Some(ttl)) = (values.next(), values.next()) {
            let bytes: Option<Vec<u8>> =
                redis::from_redis_value(v).map_err(|e| format!("redis cache get: {e}"))?;
            let ttl: i64 =
                redis::from_redis_value(ttl).map_err(|e| format!("redis cache get: {e}"))?;
            // PTTL: -2 missing, -1 no expiry (never written by us); keep only live entries.
            out.push(
                bytes
                    .filter(|_| ttl > 0)
                    .map(|b| (b, Duration::from_millis(u64::try_from(ttl).unwrap_or(0)))),
            );
        }
        Ok(out)
    }

    async fn set_many(&self, items: Vec<(String, Vec<u8>)>, ttl: Duration) -> Result<(), String> {
        if items.is_empty() {
            return Ok(());
        }
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipe = redis::pipe();
        for (k, v) in items {
            pipe.cmd("SET").arg(k).arg(v).arg("PX").arg(ms).ignore();
        }
        let mut con = self.conn.handle();
        self.conn
            .within("cache put", pipe.query_async::<()>(&mut con))
            .await
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
        let big = "x".repeat(2000);
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
