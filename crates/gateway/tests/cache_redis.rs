//! The response cache's Redis tier against a real Redis: two instances share answers,
//! entries expire with their TTL (kept in the value too), embedding vectors are shared
//! per item, queued writes share a message, and cache keys never enter the rate
//! limiter's key space.
//!
//! Redis comes from `SLUICE_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); a test
//! fails with a clear message when it is not reachable. Each test writes under a prefix
//! of its own.

mod support;

use std::time::Duration;

use serde_json::json;
use sluice_gateway::cache::config::CacheConfig;
use sluice_gateway::cache::{CacheKey, CachedAnswer, ResponseCache};
use sluice_gateway::limits::backend::Verdict;
use sluice_gateway::limits::config::FailMode;
use sluice_gateway::limits::redis::RedisBackend;
use sluice_gateway::limits::{Backend, Bucket, Charge, Check, Unit};
use sluice_gateway::redis_conn::RedisPool;
use sluice_gateway::wire::ChatResponse;
use sluice_sim::outage::OutageProxy;

const TIMEOUT: Duration = Duration::from_secs(5);

/// A cache instance ("a gateway") on the test Redis under `prefix`.
async fn instance(prefix: &str) -> ResponseCache {
    instance_at(support::redis_url(), prefix, None).await
}

/// A cache instance on the Redis at `url`, with `[redis] sync` set to `sync`.
async fn instance_at(url: String, prefix: &str, sync: Option<Duration>) -> ResponseCache {
    // Fails with the "start a Redis" message when none is reachable.
    support::redis_raw().await;
    let mut redis = support::redis_config(url, prefix, FailMode::Open, TIMEOUT);
    redis.sync = sync;
    let config = CacheConfig {
        redis: Some(redis),
        ..CacheConfig::default()
    };
    ResponseCache::new(&config, &mut RedisPool::default(), None)
        .unwrap_or_else(|e| panic!("ResponseCache::new: {e}"))
}

fn answer(text: &str) -> CachedAnswer {
    let response: ChatResponse = serde_json::from_value(json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    CachedAnswer {
        response,
        model: "gpt-4o-mini".into(),
        stored_at: 1,
    }
}

#[tokio::test]
async fn a_put_on_one_instance_is_a_hit_on_another() {
    let prefix = support::unique_redis_prefix();
    let (a, b) = (instance(&prefix).await, instance(&prefix).await);
    let key = CacheKey(0x1234_5678_9abc_def0_1122_3344_5566_7788);
    assert!(b.get(&key).await.is_none(), "nothing cached yet");
    a.put(key, answer("shared"), Duration::from_secs(60)).await;

    let hit = b
        .get(&key)
        .await
        .unwrap_or_else(|| panic!("a miss on the second instance"));
    assert_eq!(hit.response.choices[0].message.text(), "shared");
    assert_eq!(hit.response.usage.map(|u| u.total_tokens), Some(15));
    let s = b.stats();
    assert_eq!((s.redis_hits, s.memory_hits, s.misses), (1, 0, 1), "{s:?}");
    // The Redis hit filled the second instance's memory tier.
    b.get(&key)
        .await
        .unwrap_or_else(|| panic!("memory tier empty"));
    assert_eq!(b.stats().memory_hits, 1);
    assert_eq!(b.stats().redis_errors, 0);

    // Embedding vectors are shared per item the same way.
    let v = CacheKey(42);
    a.put_vectors(vec![(v, json!([0.25, -1.5]))], Duration::from_secs(60))
        .await;
    let got = b.get_vectors(&[CacheKey(41), v]).await;
    assert!(got[0].is_none());
    assert_eq!(got[1].as_deref(), Some(&json!([0.25, -1.5])));
}

#[tokio::test]
async fn entries_expire_with_their_ttl() {
    let prefix = support::unique_redis_prefix();
    let (a, b) = (instance(&prefix).await, instance(&prefix).await);
    let key = CacheKey(7);
    a.put(key, answer("short-lived"), Duration::from_millis(300))
        .await;
    let mut con = support::redis_raw().await;
    let redis_key = format!("{prefix}cache:v2:{}", key.hex());
    let pttl = support::pttl(&mut con, &redis_key).await;
    assert!((1..=300).contains(&pttl), "PTTL {pttl}");
    // The value starts with the same expiry, in Unix milliseconds, then the JSON.
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&redis_key)
        .query_async(&mut con)
        .await
        .unwrap_or_else(|e| panic!("GET: {e}"));
    let text = String::from_utf8(value).unwrap_or_else(|e| panic!("{e}"));
    let (expires, json) = text
        .split_once('\n')
        .unwrap_or_else(|| panic!("no expiry line: {text}"));
    let left = expires
        .parse::<i64>()
        .unwrap_or_else(|e| panic!("{e}: {text}"))
        - now_ms();
    assert!((1..=300).contains(&left), "expires in {left} ms");
    let stored: CachedAnswer = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stored.response.choices[0].message.text(), "short-lived");
    assert!(b.get(&key).await.is_some());
    tokio::time::sleep(Duration::from_millis(450)).await;
    // Gone from Redis and from both memory tiers (the filled one kept Redis's TTL).
    assert!(a.get(&key).await.is_none());
    assert!(b.get(&key).await.is_none());
    assert!(support::keys_under(&prefix).await.is_empty());
}

#[tokio::test]
async fn cache_keys_never_enter_the_limiter_key_space() {
    let prefix = support::unique_redis_prefix();
    let cache = instance(&prefix).await;
    let limits = RedisBackend::new(&support::redis_config(
        support::redis_url(),
        &prefix,
        FailMode::Open,
        TIMEOUT,
    ))
    .unwrap_or_else(|e| panic!("RedisBackend::new: {e}"));
    let check = Check {
        penalty_key: None,
        charges: vec![Charge {
            bucket: Bucket {
                key: "key:k1".into(),
                limit: 10,
                period: Duration::from_secs(60),
            },
            unit: Unit::Requests,
            cost: 1,
        }],
        leases: vec![],
    };
    let verdict = limits
        .check(&check)
        .await
        .unwrap_or_else(|e| panic!("limit check: {e}"));
    assert!(matches!(verdict, Verdict::Allowed { .. }), "{verdict:?}");
    for i in 0..20 {
        cache
            .put(CacheKey(i), answer("x"), Duration::from_secs(60))
            .await;
    }
    cache
        .put_vectors(vec![(CacheKey(99), json!([1.0]))], Duration::from_secs(60))
        .await;

    let keys = support::keys_under(&prefix).await;
    let cache_keys: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with(&format!("{prefix}cache:")))
        .collect();
    let limit_keys: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with(&format!("{prefix}rl:")))
        .collect();
    assert_eq!(cache_keys.len(), 21, "{keys:?}");
    assert!(!limit_keys.is_empty(), "the limiter wrote no key: {keys:?}");
    assert_eq!(
        cache_keys.len() + limit_keys.len(),
        keys.len(),
        "a key in neither space: {keys:?}"
    );
    // Every cache key carries a TTL, so eviction and expiry are the cache's own.
    let cache_keys: Vec<String> = cache_keys.into_iter().cloned().collect();
    support::assert_every_key_expires(&cache_keys).await;
}

#[tokio::test]
async fn redis_down_is_a_miss_not_an_error() {
    // Nothing listens on port 1: every Redis call fails fast.
    let config = CacheConfig {
        redis: Some(support::redis_config(
            "redis://127.0.0.1:1".into(),
            "sluice-test-down:",
            FailMode::Open,
            Duration::from_millis(200),
        )),
        ..CacheConfig::default()
    };
    let cache = ResponseCache::new(&config, &mut RedisPool::default(), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let key = CacheKey(5);
    assert!(cache.get(&key).await.is_none());
    cache
        .put(key, answer("local"), Duration::from_secs(60))
        .await;
    // Still served from memory.
    assert!(cache.get(&key).await.is_some());
    let s = cache.stats();
    assert!(s.redis_errors >= 2, "{s:?}");
    assert_eq!(s.memory_hits, 1);
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_else(|e| panic!("{e}"))
            .as_millis(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn a_value_past_its_expiry_or_malformed_is_a_miss() {
    let prefix = support::unique_redis_prefix();
    let cache = instance(&prefix).await;
    let mut con = support::redis_raw().await;
    let json = serde_json::to_string(&answer("stale")).unwrap_or_else(|e| panic!("{e}"));
    // Redis still has them (an hour's TTL), but the values say otherwise.
    let values = [
        (CacheKey(1), format!("{}\n{json}", now_ms() - 1)),
        (CacheKey(2), json.clone()),
        (CacheKey(3), format!("soon\n{json}")),
        (CacheKey(4), format!("{}\n{json}", now_ms() + 60_000)),
    ];
    for (key, value) in &values {
        let _: () = redis::cmd("SET")
            .arg(format!("{prefix}cache:v2:{}", key.hex()))
            .arg(value)
            .arg("PX")
            .arg(3_600_000)
            .query_async(&mut con)
            .await
            .unwrap_or_else(|e| panic!("SET: {e}"));
    }
    for key in [CacheKey(1), CacheKey(2), CacheKey(3)] {
        assert!(cache.get(&key).await.is_none(), "{key:?}");
    }
    let live = cache
        .get(&CacheKey(4))
        .await
        .unwrap_or_else(|| panic!("the live value is a miss"));
    assert_eq!(live.response.choices[0].message.text(), "stale");
    let s = cache.stats();
    assert_eq!((s.redis_hits, s.misses, s.redis_errors), (1, 3, 0), "{s:?}");
}

#[tokio::test]
async fn with_sync_the_stores_of_an_interval_share_one_message() {
    let proxy = OutageProxy::start(support::redis_addr())
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    let prefix = support::unique_redis_prefix();
    // An interval longer than the test: only a flush sends.
    let a = instance_at(
        format!("redis://{}", proxy.addr()),
        &prefix,
        Some(Duration::from_secs(30)),
    )
    .await;
    let b = instance(&prefix).await;
    // Connected (the first lookup waits for it), and quiet (the connection's first
    // PING answered too).
    assert!(a.get(&CacheKey(999)).await.is_none());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = proxy.round_trips();
    for i in 0..50 {
        a.store(
            CacheKey(i),
            answer(&format!("answer {i}")),
            Duration::from_secs(60),
            None,
        );
        a.store_vectors(
            vec![(CacheKey(100 + i), json!([i]))],
            Duration::from_secs(60),
        );
    }
    // In memory at once; not in Redis until the interval ends or a flush.
    assert!(a.get(&CacheKey(7)).await.is_some());
    assert!(support::keys_under(&prefix).await.is_empty());
    assert_eq!(proxy.round_trips(), before);
    a.flush().await;
    assert_eq!(proxy.round_trips() - before, 1, "100 stores, one message");
    assert_eq!(support::keys_under(&prefix).await.len(), 100);
    let hit = b
        .get(&CacheKey(42))
        .await
        .unwrap_or_else(|| panic!("the other instance misses"));
    assert_eq!(hit.response.choices[0].message.text(), "answer 42");
    assert_eq!(
        b.get_vectors(&[CacheKey(142)]).await[0].as_deref(),
        Some(&json!([42]))
    );

    // A short interval sends by itself.
    let c = instance_at(
        support::redis_url(),
        &prefix,
        Some(Duration::from_millis(100)),
    )
    .await;
    c.store(
        CacheKey(500),
        answer("by itself"),
        Duration::from_secs(60),
        None,
    );
    let mut seen = None;
    for _ in 0..100 {
        seen = b.get(&CacheKey(500)).await;
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.is_some(), "never sent without a flush");
    assert_eq!(a.stats().redis_errors + c.stats().redis_errors, 0);
}

#[tokio::test]
async fn an_answer_with_the_upstream_bytes_is_stored_as_they_came() {
    let prefix = support::unique_redis_prefix();
    let (a, b) = (instance(&prefix).await, instance(&prefix).await);
    let body = br#"{"id":"chatcmpl-raw","object":"chat.completion","created":7,"model":"gpt-4o-mini","system_fingerprint":"fp_1","choices":[{"index":0,"message":{"role":"assistant","content":"as sent"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#;
    let mut response: ChatResponse = serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}"));
    response.raw = Some(bytes::Bytes::from_static(body));
    let answer = CachedAnswer {
        response,
        model: "my \"model\"".into(),
        stored_at: 1_700_000_000_000,
    };
    a.store(CacheKey(9), answer, Duration::from_secs(60), None);
    a.flush().await;
    let hit = b
        .get(&CacheKey(9))
        .await
        .unwrap_or_else(|| panic!("a miss"));
    assert_eq!(hit.model, "my \"model\"");
    assert_eq!(hit.stored_at, 1_700_000_000_000);
    assert_eq!(hit.response.id, "chatcmpl-raw");
    assert_eq!(hit.response.choices[0].message.text(), "as sent");
    assert_eq!(hit.response.extra["system_fingerprint"], "fp_1");
    assert!(
        hit.response.raw.is_none(),
        "the cache keeps the parsed answer only"
    );
    // The writer kept the bytes: the stored JSON holds the upstream's body verbatim.
    let keys = support::keys_under(&prefix).await;
    let mut con = support::redis_raw().await;
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut con)
        .await
        .unwrap_or_else(|e| panic!("GET: {e}"));
    assert!(
        value.windows(body.len()).any(|w| w == body),
        "{}",
        String::from_utf8_lossy(&value)
    );
}

/// Lookups (and budget reads) that queue behind one in flight go as one `MGET`, and each
/// gets the values of its own keys, in its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_arrive_together_go_as_one_mget() {
    use sluice_gateway::redis_conn::{Reads, RedisConn};

    let prefix = support::unique_redis_prefix();
    let mut raw = support::redis_raw().await;
    let key = |i: usize| format!("{prefix}k{i}");
    for i in (0..40).step_by(2) {
        let () = redis::cmd("SET")
            .arg(key(i))
            .arg(format!("v{i}"))
            .arg("PX")
            .arg(60_000)
            .query_async(&mut raw)
            .await
            .unwrap_or_else(|e| panic!("SET: {e}"));
    }
    let config = support::redis_config(
        support::redis_url(),
        &prefix,
        FailMode::Open,
        Duration::from_secs(5),
    );
    let conn = RedisConn::connect(&config, "test").unwrap_or_else(|e| panic!("{e}"));
    let reads = Reads::new(conn, "test read", "test_read");
    // 100 reads at once, each of three keys (every other key is set).
    let tasks: Vec<_> = (0..100)
        .map(|r| {
            let reads = reads.clone();
            let keys: Vec<String> = (0..3).map(|j| key((r + j) % 40)).collect();
            tokio::spawn(async move { (r, reads.run(keys).await) })
        })
        .collect();
    for t in tasks {
        let (r, got) = t.await.unwrap_or_else(|e| panic!("task: {e}"));
        let got = got.unwrap_or_else(|e| panic!("read {r}: {e}"));
        let want: Vec<Option<Vec<u8>>> = (0..3)
            .map(|j| {
                let i = (r + j) % 40;
                (i % 2 == 0).then(|| format!("v{i}").into_bytes())
            })
            .collect();
        assert_eq!(got, want, "read {r}");
    }
    let (calls, jobs) = reads.counts();
    assert_eq!(jobs, 100);
    assert!(calls * 4 <= jobs, "100 reads at once took {calls} MGETs");
    // A read of no keys is answered without asking Redis (which refuses an empty MGET).
    assert_eq!(reads.run(Vec::new()).await, Ok(Vec::new()));
    let keys: Vec<String> = (0..40).map(key).collect();
    let () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut raw)
        .await
        .unwrap_or_else(|e| panic!("DEL: {e}"));
}
