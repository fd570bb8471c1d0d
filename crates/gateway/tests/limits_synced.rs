//! The synced limit store (`[redis] sync`) against a real Redis: each instance
//! counts on its own and no request waits on Redis while its keys are fresh; a sync
//! sends what was counted and brings back the others' counts, leases and penalties;
//! what the store promises across instances (the others' charges seen one sync late)
//! holds exactly; Redis going away loses nothing counted.
//!
//! Redis comes from `SLUICE_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); a test
//! fails with a clear message when it is not reachable. Each test writes under a prefix
//! of its own.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_gateway::limits::backend::{Signal, Verdict};
use sluice_gateway::limits::config::FailMode;
use sluice_gateway::limits::redis::RedisBackend;
use sluice_gateway::limits::synced::SyncedBackend;
use sluice_gateway::limits::{Backend, BackendError, Bucket, Charge, Check, Lease, Unit};
use sluice_sim::outage::OutageProxy;

const MINUTE: Duration = Duration::from_secs(60);
/// Buckets refill over a day: nothing refills while a test runs, so counts are exact.
const DAY: Duration = Duration::from_secs(86_400);
/// Long enough that only the test's own `sync()` calls sync and every key read stays
/// fresh.
const BY_HAND: Duration = Duration::from_secs(3600);

fn redis_at(url: String, prefix: &str, timeout: Duration) -> RedisBackend {
    let config = support::redis_config(url, prefix, FailMode::Open, timeout);
    RedisBackend::new(&config).unwrap_or_else(|e| panic!("RedisBackend::new: {e}"))
}

/// An instance on the test server under `prefix`.
async fn instance(prefix: &str, interval: Duration) -> Arc<SyncedBackend> {
    support::redis_raw().await;
    let redis = redis_at(support::redis_url(), prefix, Duration::from_secs(5));
    ok(redis.ping().await);
    SyncedBackend::start(redis, interval)
}

/// The test Redis behind a proxy that counts round trips and can be cut.
async fn proxied(prefix: &str, timeout: Duration) -> (Arc<SyncedBackend>, Arc<OutageProxy>) {
    support::redis_raw().await;
    let proxy = OutageProxy::start(support::redis_addr())
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    let url = format!("redis://127.0.0.1:{}", proxy.addr().port());
    let redis = redis_at(url, prefix, timeout);
    ok(redis.ping().await);
    (SyncedBackend::start(redis, BY_HAND), proxy)
}

fn ok<T>(r: Result<T, BackendError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn bucket(key: &str, limit: u64) -> Bucket {
    Bucket {
        key: key.into(),
        limit,
        period: DAY,
    }
}

fn charge(key: &str, limit: u64, cost: u64) -> Check {
    Check {
        penalty_key: None,
        charges: vec![Charge {
            bucket: bucket(key, limit),
            cost,
            unit: Unit::Requests,
        }],
        leases: vec![],
    }
}

fn lease(id: &str) -> Lease {
    Lease {
        key: "u:conc".into(),
        max: 3,
        id: id.into(),
        ttl: MINUTE,
    }
}

fn take(id: &str) -> Check {
    Check {
        penalty_key: None,
        charges: vec![],
        leases: vec![lease(id)],
    }
}

fn allowed(v: &Verdict) -> bool {
    matches!(v, Verdict::Allowed { .. })
}

/// Checks `check` `n` times; how many were allowed.
async fn admitted(b: &SyncedBackend, check: &Check, n: usize) -> usize {
    let mut yes = 0;
    for _ in 0..n {
        if allowed(&ok(b.check(check).await)) {
            yes += 1;
        }
    }
    yes
}

#[tokio::test]
async fn instances_count_alone_and_see_each_other_one_sync_later() {
    let prefix = support::unique_redis_prefix();
    let (a, proxy) = proxied(&prefix, Duration::from_secs(5)).await;
    let b = instance(&prefix, BY_HAND).await;
    let ten = charge("u:rpm", 10, 1);

    // A's first check reads the bucket (one round trip); the next five are local.
    let before = proxy.round_trips();
    assert_eq!(admitted(&a, &ten, 1).await, 1);
    assert_eq!(
        proxy.round_trips() - before,
        1,
        "a key new to A is read first"
    );
    let before = proxy.round_trips();
    assert_eq!(admitted(&a, &ten, 5).await, 5);
    assert_eq!(
        proxy.round_trips(),
        before,
        "fresh keys: no Redis on the request path"
    );
    ok(a.sync().await);
    assert_eq!(proxy.round_trips() - before, 1, "a sync is one round trip");

    // B reads the bucket with A's six in it: four are left.
    assert_eq!(admitted(&b, &ten, 6).await, 4);

    // A has not synced since B charged: it still sees four left and admits them. This
    // is the promise's edge: up to what the others admitted since the last sync.
    assert_eq!(admitted(&a, &ten, 5).await, 4);
    ok(a.sync().await);
    ok(b.sync().await);
    ok(a.sync().await);
    // Both now see all fourteen charges: nothing more for a long while.
    assert_eq!(admitted(&a, &ten, 1).await, 0);
    assert_eq!(admitted(&b, &ten, 1).await, 0);

    // Redis's bucket holds every charge: an exact store on the same keys is refused too.
    let exact = redis_at(support::redis_url(), &prefix, Duration::from_secs(5));
    let v = ok(exact.check(&ten).await);
    let Verdict::Refused { retry_after, .. } = v else {
        panic!("the exact store should be refused: {v:?}")
    };
    // 14 tenths of a day charged: the next fits in about half a day.
    assert!(retry_after > Duration::from_secs(40_000), "{retry_after:?}");
}

#[tokio::test]
async fn refunds_travel_and_a_penalty_reaches_the_others() {
    let prefix = support::unique_redis_prefix();
    let a = instance(&prefix, BY_HAND).await;
    let b = instance(&prefix, BY_HAND).await;
    let tokens = bucket("u:tpm", 1000);
    let check = |cost| Check {
        penalty_key: Some("p:o:u".into()),
        charges: vec![Charge {
            bucket: tokens.clone(),
            cost,
            unit: Unit::Tokens,
        }],
        leases: vec![],
    };
    assert!(allowed(&ok(a.check(&check(800)).await)));
    // The request used 100 of the 800 charged.
    ok(a.adjust(&tokens, -700).await);
    ok(a.sync().await);
    let v = ok(b.check(&check(900)).await);
    let Verdict::Allowed { states } = &v else {
        panic!("B should see only the 100 used: {v:?}")
    };
    assert_eq!(states[0].remaining, 0);

    // An abuse signal on A starts a penalty in Redis and on A at once.
    let signal = Signal {
        counter_key: "a:o:u:injection".into(),
        window: MINUTE,
        threshold: 1,
        penalty_key: "p:o:u".into(),
        penalty: "block".into(),
        period: MINUTE,
    };
    assert!(ok(a.signal(&signal).await));
    assert!(matches!(
        ok(a.check(&check(1)).await),
        Verdict::Penalized { ref penalty, .. } if penalty == "block"
    ));
    // B read the penalty key (empty) with its first check; its next sync brings it.
    assert!(!matches!(
        ok(b.check(&check(1)).await),
        Verdict::Penalized { .. }
    ));
    ok(b.sync().await);
    let v = ok(b.check(&check(1)).await);
    let Verdict::Penalized { penalty, remaining } = v else {
        panic!("B should see A's penalty after its sync: {v:?}")
    };
    assert_eq!(penalty, "block");
    assert!(remaining > Duration::from_secs(50), "{remaining:?}");
    assert_eq!(ok(b.penalties().await).len(), 1, "listed from Redis");

    // Lifted on B: gone there at once, and on A after its sync.
    assert!(ok(b.clear_penalty("p:o:u").await));
    assert!(!matches!(
        ok(b.check(&check(1)).await),
        Verdict::Penalized { .. }
    ));
    ok(a.sync().await);
    assert!(!matches!(
        ok(a.check(&check(1)).await),
        Verdict::Penalized { .. }
    ));
}

#[tokio::test]
async fn leases_are_shared_as_counts_per_instance() {
    let prefix = support::unique_redis_prefix();
    let a = instance(&prefix, BY_HAND).await;
    let b = instance(&prefix, BY_HAND).await;
    assert!(allowed(&ok(a.check(&take("a1")).await)));
    assert!(allowed(&ok(a.check(&take("a2")).await)));
    ok(a.sync().await);
    // B reads A's two: one of three is left.
    assert!(allowed(&ok(b.check(&take("b1")).await)));
    assert!(!allowed(&ok(b.check(&take("b2")).await)));
    // A finishes one request; once both have synced, B may take another.
    ok(a.release(&lease("a1")).await);
    ok(a.sync().await);
    assert!(
        !allowed(&ok(b.check(&take("b2")).await)),
        "B has not synced yet"
    );
    ok(b.sync().await);
    assert!(allowed(&ok(b.check(&take("b2")).await)));
    // A sees B's two: with its own one, the cap is reached.
    ok(b.sync().await);
    ok(a.sync().await);
    assert!(!allowed(&ok(a.check(&take("a3")).await)));

    // Every key the synced store wrote lives under the prefix with a TTL, the lease
    // hash included.
    let keys = support::keys_under(&prefix).await;
    assert!(
        keys.iter().any(|k| k.ends_with("rl:v1:s:u:conc")),
        "the lease hash: {keys:?}"
    );
    support::assert_every_key_expires(&keys).await;
}

#[tokio::test]
async fn syncs_by_itself_every_interval() {
    let prefix = support::unique_redis_prefix();
    let a = instance(&prefix, Duration::from_millis(20)).await;
    let b = instance(&prefix, Duration::from_millis(20)).await;
    let five = charge("u:rpm", 5, 1);
    assert_eq!(admitted(&a, &five, 3).await, 3);
    // Neither calls sync: A's task sends its three, B reads them (a key new to B).
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let exact = redis_at(support::redis_url(), &prefix, Duration::from_secs(5));
        let v = ok(exact.check(&charge("u:rpm", 5, 0)).await);
        let Verdict::Allowed { states } = v else {
            panic!("a zero charge is always allowed: {v:?}")
        };
        if states[0].remaining <= 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "A's charges never reached Redis"
        );
    }
    assert_eq!(admitted(&b, &five, 5).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_goes_on_while_redis_is_away_and_reaches_it_after() {
    let prefix = support::unique_redis_prefix();
    let timeout = Duration::from_millis(300);
    let (a, proxy) = proxied(&prefix, timeout).await;
    let many = charge("u:rpm", 100, 1);
    assert_eq!(admitted(&a, &many, 2).await, 2);
    ok(a.sync().await);

    proxy.cut().await;
    // A fresh key is still counted here, without Redis.
    assert_eq!(admitted(&a, &many, 3).await, 3);
    assert!(
        a.sync().await.is_err(),
        "the sync fails while Redis is away"
    );
    // A key this instance never read cannot be: the limiter falls back or refuses.
    let started = Instant::now();
    let r = a.check(&charge("u:other", 100, 1)).await;
    assert!(matches!(r, Err(BackendError::Unavailable(_))), "{r:?}");
    assert!(started.elapsed() < timeout + Duration::from_millis(500));

    proxy
        .restore()
        .await
        .unwrap_or_else(|e| panic!("restore: {e}"));
    let started = Instant::now();
    while a.sync().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never synced again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The three counted while Redis was away reached it with the sync after.
    let exact = redis_at(support::redis_url(), &prefix, Duration::from_secs(5));
    let v = ok(exact.check(&charge("u:rpm", 100, 0)).await);
    let Verdict::Allowed { states } = v else {
        panic!("a zero charge is always allowed: {v:?}")
    };
    assert_eq!(states[0].remaining, 95);
    proxy.cut().await;
}

/// The bucket keys under `prefix` in the test Redis.
async fn bucket_keys(prefix: &str) -> Vec<String> {
    support::keys_under(&format!("{prefix}rl:v1:b:")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_sends_its_last_counts_and_cache_stores() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    support::redis_raw().await;
    let prefix = support::unique_redis_prefix();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let text = format!(
        r#"
        [storage]
        path = "{db}"
        [redis]
        url = "{url}"
        prefix = "{prefix}"
        # Longer than the test: only the last sync at shutdown can send the counts.
        sync = "10s"
        [limits]
        default_tier = "t"
        [[tiers]]
        name = "t"
        # Six seconds of TAT a request: the bucket stands in Redis long after the stop,
        # however slowly the SCAN below walks a busy Redis.
        total = {{ requests_per_minute = 10 }}
        [cache]
        enabled = true
        only_deterministic = false
        {sim}"#,
        db = dir.path().join("log.db").display(),
        url = support::redis_url(),
        sim = support::SIM_CHAT,
    );
    let config = sluice_gateway::config::Config::from_toml(
        &text,
        &[],
        sluice_gateway::config::ConfigSource::Embedded { simulated: false },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let addr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    let running = sluice_gateway::server::start(config, addr, Vec::new())
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    let client = reqwest::Client::new();
    for i in 0..3 {
        let status = client
            .post(format!("{}/v1/chat/completions", running.url()))
            .json(&serde_json::json!({
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": format!("hi {i}")}],
            }))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request: {e}"))
            .status();
        assert_eq!(status, 200);
    }
    // Read from Redis (the first check), counted here: nothing written yet, and the
    // cache's stores wait for the interval too.
    let cache_keys = || async {
        let prefix = format!("{prefix}cache:");
        support::keys_under(&prefix).await
    };
    assert!(bucket_keys(&prefix).await.is_empty());
    assert!(cache_keys().await.is_empty());
    // Held past the stop, as an exiting process ends before a dropped cache's queue
    // would be sent: only the stop's flush can have sent the stores.
    let cache = running.gateway.cache.clone();
    running.stop().await;
    let keys = bucket_keys(&prefix).await;
    assert_eq!(
        keys.len(),
        1,
        "the tier's bucket, sent by the last sync: {keys:?}"
    );
    let keys = cache_keys().await;
    assert_eq!(
        keys.len(),
        3,
        "the three answers, sent at the stop: {keys:?}"
    );
    drop(cache);
}
