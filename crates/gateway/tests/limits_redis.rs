//! The Redis limit store against a real Redis: exact under concurrency from several
//! instances, the same answers as the memory store, expiry of leases and penalties, a
//! TTL on every key, surviving Redis going away and coming back, and one round trip
//! per admission check and per settlement.
//!
//! Redis comes from `SLUICE_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); a test
//! fails with a clear message when it is not reachable. Each test writes under a prefix
//! of its own.

mod support;

use std::sync::Arc;

use std::time::{Duration, Instant};

use sluice_gateway::limits::backend::{Signal, Verdict};
use sluice_gateway::limits::config::{FailMode, RedisConfig};
use sluice_gateway::limits::memory::MemoryBackend;
use sluice_gateway::limits::redis::RedisBackend;
use sluice_gateway::limits::{Backend, BackendError, Bucket, Charge, Check, Lease, Unit};
use sluice_sim::outage::OutageProxy;
use tokio::task::JoinHandle;

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);
/// Generous: these tests share two cores with builds; test 5 uses a short one.
const TIMEOUT: Duration = Duration::from_secs(5);

fn config(url: String, prefix: &str, timeout: Duration) -> RedisConfig {
    support::redis_config(url, prefix, FailMode::Open, timeout)
}

/// A store on the test server under `prefix`, connected before it is returned.
async fn store(prefix: &str) -> RedisBackend {
    support::redis_raw().await;
    let b = RedisBackend::new(&config(support::redis_url(), prefix, TIMEOUT))
        .unwrap_or_else(|e| panic!("RedisBackend::new: {e}"));
    b.ping()
        .await
        .unwrap_or_else(|e| panic!("Redis answered a raw connection but not the store: {e}"));
    b
}

fn charge(key: &str, limit: u64, period: Duration, cost: u64) -> Charge {
    Charge {
        bucket: Bucket {
            key: key.into(),
            limit,
            period,
        },
        cost,
        unit: if cost == 1 {
            Unit::Requests
        } else {
            Unit::Tokens
        },
    }
}

fn lease(key: &str, max: u64, id: &str, ttl: Duration) -> Lease {
    Lease {
        key: key.into(),
        max,
        id: id.into(),
        ttl,
    }
}

fn charges(charges: Vec<Charge>) -> Check {
    Check {
        penalty_key: None,
        charges,
        leases: vec![],
    }
}

fn remaining(v: &Verdict) -> Vec<u64> {
    match v {
        Verdict::Allowed { states } | Verdict::Refused { states, .. } => {
            states.iter().map(|s| s.remaining).collect()
        }
        Verdict::Penalized { .. } => vec![],
    }
}

fn ok<T>(r: Result<T, BackendError>) -> T {
    r.unwrap_or_else(|e| panic!("the store failed: {e}"))
}

/// One command on the test server, straight (not through a store).
async fn raw<T: redis::FromRedisValue>(cmd: &redis::Cmd) -> T {
    cmd.query_async(&mut support::redis_raw().await)
        .await
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_admit_exactly_the_limit() {
    let prefix = support::unique_redis_prefix();
    // Three gateways sharing one Redis.
    let stores: Vec<Arc<RedisBackend>> = vec![
        Arc::new(store(&prefix).await),
        Arc::new(store(&prefix).await),
        Arc::new(store(&prefix).await),
    ];
    const N: usize = 300;

    // Requests: 60 a minute, 300 at once.
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Result<Verdict, BackendError>>> = (0..N)
        .map(|i| {
            let s = stores[i % 3].clone();
            tokio::spawn(async move { s.check(&charges(vec![charge("rpm", 60, MINUTE, 1)])).await })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        match t.await.unwrap_or_else(|e| panic!("task: {e}")) {
            Ok(Verdict::Allowed { .. }) => allowed += 1,
            Ok(Verdict::Refused { index: 0, .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let burst = started.elapsed();
    // One request frees up each second; the burst must not span one.
    assert!(burst < Duration::from_secs(1), "the burst took {burst:?}");
    assert_eq!(allowed, 60, "exactly the limit, across three instances");

    // Tokens: 10,000 a day, costs of 1..=200 from 300 requests at once. A token frees up
    // every 8.6 s, so nothing refills during the burst.
    let limit = 10_000;
    let cost = |i: usize| (i as u64 * 7919) % 200 + 1;
    let tasks: Vec<(u64, JoinHandle<Result<Verdict, BackendError>>)> = (0..N)
        .map(|i| {
            let s = stores[i % 3].clone();
            let c = cost(i);
            (
                c,
                tokio::spawn(
                    async move { s.check(&charges(vec![charge("tpd", limit, DAY, c)])).await },
                ),
            )
        })
        .collect();
    let mut spent = 0;
    for (c, t) in tasks {
        match t.await.unwrap_or_else(|e| panic!("task: {e}")) {
            Ok(Verdict::Allowed { .. }) => spent += c,
            Ok(Verdict::Refused { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(spent <= limit, "admitted {spent} tokens of {limit}");
    // Some request was refused, so what is left is less than the largest cost...
    assert!(
        limit - spent < 200,
        "only {spent} of {limit} tokens admitted"
    );
    // ...and exactly what was not admitted: nothing was lost or double-counted.
    let left = limit - spent;
    let over = ok(stores[0]
        .check(&charges(vec![charge("tpd", limit, DAY, left + 1)]))
        .await);
    assert!(matches!(over, Verdict::Refused { .. }), "{over:?}");
    if left > 0 {
        let exact = ok(stores[1]
            .check(&charges(vec![charge("tpd", limit, DAY, left)]))
            .await);
        assert_eq!(remaining(&exact), vec![0], "{exact:?}");
    }

    // A rough latency figure: one check at a time, then many at once.
    let one = stores[0].clone();
    let started = Instant::now();
    for _ in 0..200 {
        ok(one
            .check(&charges(vec![charge("lat", 1_000_000, MINUTE, 1)]))
            .await);
    }
    let sequential = started.elapsed() / 200;
    eprintln!(
        "redis check: {sequential:?} each one at a time; {:?} per check for {N} at once on 3 instances",
        burst / N as u32
    );
}

/// Outcomes written down for comparison.
#[derive(Default)]
struct Log(Vec<String>);

impl Log {
    fn note(&mut self, what: &str, v: Verdict) -> Verdict {
        let outcome = match &v {
            Verdict::Allowed { .. } => "allowed".to_string(),
            Verdict::Refused { index, .. } => format!("refused at {index}"),
            Verdict::Penalized { penalty, .. } => format!("penalized: {penalty}"),
        };
        self.0
            .push(format!("{what}: {outcome} {:?}", remaining(&v)));
        v
    }

    fn line(&mut self, line: String) {
        self.0.push(line);
    }
}

/// The same sequence on any store.
async fn sequence(b: &dyn Backend) -> Vec<String> {
    let mut log = Log::default();
    // Periods of a day with limits that divide it: nothing refills while the sequence
    // runs, so remaining counts are the same whatever the timing.
    let pair = |tokens| {
        charges(vec![
            charge("k:rpm", 10, DAY, 1),
            charge("k:tpd", 100, DAY, tokens),
        ])
    };
    log.note("pair 60", ok(b.check(&pair(60)).await));
    log.note("pair 60 again", ok(b.check(&pair(60)).await));
    log.note(
        "rpm 9 after the refusal",
        ok(b.check(&charges(vec![charge("k:rpm", 10, DAY, 9)])).await),
    );
    log.note("pair 1 on an empty rpm", ok(b.check(&pair(1)).await));
    let v = log.note(
        "more than the bucket holds",
        ok(b.check(&charges(vec![charge("big", 100, DAY, 101)])).await),
    );
    let Verdict::Refused { retry_after, .. } = v else {
        panic!("{v:?}")
    };
    assert_eq!(retry_after, DAY);
    // A limit whose cost * period is far past a double's exact integers.
    log.note(
        "a trillion tokens a day",
        ok(b.check(&charges(vec![charge(
            "huge",
            1_000_000_000_000,
            DAY,
            300_000_000_007,
        )]))
        .await),
    );
    // One check naming a bucket twice: the second charge sees the first.
    let twice = charges(vec![charge("dup", 10, DAY, 6), charge("dup", 10, DAY, 6)]);
    log.note("the same bucket twice", ok(b.check(&twice).await));
    log.note(
        "the whole bucket after that",
        ok(b.check(&charges(vec![charge("dup", 10, DAY, 10)])).await),
    );

    // Leases: at most two at once, all-or-nothing with the charge beside them.
    let with_lease = |id: &str| Check {
        penalty_key: None,
        charges: vec![charge("l:rpm", 100, DAY, 1)],
        leases: vec![lease("conc", 2, id, MINUTE)],
    };
    log.note("lease 1", ok(b.check(&with_lease("1")).await));
    log.note("lease 2", ok(b.check(&with_lease("2")).await));
    let v = log.note("lease 3", ok(b.check(&with_lease("3")).await));
    assert!(
        matches!(v, Verdict::Refused { retry_after, .. } if retry_after == Duration::from_secs(1))
    );
    ok(b.release(&lease("conc", 2, "1", MINUTE)).await);
    log.note(
        "lease 3 after a release",
        ok(b.check(&with_lease("3")).await),
    );
    log.note("lease 4", ok(b.check(&with_lease("4")).await));

    // Adjust: refunds and additions after the fact.
    let t = charge("t", 1000, DAY, 800);
    let tokens = charges(vec![t.clone()]);
    log.note("800 tokens", ok(b.check(&tokens).await));
    log.note("800 more", ok(b.check(&tokens).await));
    ok(b.adjust(&t.bucket, -700).await);
    log.note("800 after refunding 700", ok(b.check(&tokens).await));
    ok(b.adjust(&t.bucket, 50).await);
    log.note(
        "1 after adding 50",
        ok(b.check(&charges(vec![charge("t", 1000, DAY, 1)])).await),
    );
    ok(b.adjust(&t.bucket, -1_000_000).await);
    log.note(
        "the whole bucket after a refund past empty",
        ok(b.check(&charges(vec![charge("t", 1000, DAY, 1000)])).await),
    );
    // A settlement naming buckets twice: the second adjustment sees the first.
    let (s, u) = (charge("s", 1000, DAY, 500), charge("u", 1000, DAY, 100));
    log.note(
        "500 and 100 tokens",
        ok(b.check(&charges(vec![s.clone(), u.clone()])).await),
    );
    let twice = [s.bucket.clone(), s.bucket.clone(), u.bucket.clone()];
    let one_each = charges(vec![charge("s", 1000, DAY, 1), charge("u", 1000, DAY, 1)]);
    ok(b.settle(&twice, -200, &[]).await);
    log.note(
        "after refunding 200 twice and 200 once",
        ok(b.check(&one_each).await),
    );
    ok(b.settle(&twice, 300, &[]).await);
    log.note(
        "after adding 300 twice and 300 once",
        ok(b.check(&one_each).await),
    );

    // Signals: the third starts the penalty, the fourth finds it set.
    let signal = Signal {
        counter_key: "a:o:u:injection".into(),
        window: MINUTE,
        threshold: 3,
        penalty_key: "p:o:u".into(),
        penalty: "block".into(),
        period: MINUTE,
    };
    for i in 1..=4 {
        let started = ok(b.signal(&signal).await);
        log.line(format!("signal {i}: {started}"));
    }
    let penalized = Check {
        penalty_key: Some("p:o:u".into()),
        charges: vec![charge("x", 1, DAY, 1)],
        leases: vec![],
    };
    log.note("a penalized check", ok(b.check(&penalized).await));
    log.note(
        "the bucket the penalty kept untouched",
        ok(b.check(&charges(vec![charge("x", 1, DAY, 1)])).await),
    );
    let listed: Vec<String> = ok(b.penalties().await)
        .into_iter()
        .map(|p| format!("{}={}", p.key, p.penalty))
        .collect();
    log.line(format!("penalties: {listed:?}"));
    log.line(format!("cleared: {}", ok(b.clear_penalty("p:o:u").await)));
    log.line(format!(
        "cleared again: {}",
        ok(b.clear_penalty("p:o:u").await)
    ));
    let after = Check {
        penalty_key: Some("p:o:u".into()),
        charges: vec![charge("y", 1, DAY, 1)],
        leases: vec![],
    };
    log.note("after clearing", ok(b.check(&after).await));
    log.note("a check of nothing", ok(b.check(&Check::default()).await));
    log.0
}

#[tokio::test]
async fn answers_as_the_memory_store_does() {
    let memory = sequence(&MemoryBackend::new()).await;
    let redis = sequence(&store(&support::unique_redis_prefix()).await).await;
    assert_eq!(redis, memory);
    // Spot-check that the sequence says what it should.
    let expect = [
        "pair 60: allowed [9, 40]",
        "pair 60 again: refused at 1 [8, 40]",
        "rpm 9 after the refusal: allowed [0]",
        "pair 1 on an empty rpm: refused at 0 [0, 39]",
        "more than the bucket holds: refused at 0 [100]",
        "a trillion tokens a day: allowed [699999999988]",
        "the same bucket twice: refused at 1 [4, 4]",
        "the whole bucket after that: allowed [0]",
        "lease 3: refused at 1 [97]",
        "lease 3 after a release: allowed [97]",
        "lease 4: refused at 1 [96]",
        "800 after refunding 700: allowed [100]",
        "1 after adding 50: allowed [49]",
        "the whole bucket after a refund past empty: allowed [0]",
        "500 and 100 tokens: allowed [500, 900]",
        "after refunding 200 twice and 200 once: allowed [899, 999]",
        "after adding 300 twice and 300 once: allowed [298, 698]",
        "signal 3: true",
        "signal 4: false",
        "a penalized check: penalized: block []",
        "the bucket the penalty kept untouched: allowed [0]",
        "penalties: [\"p:o:u=block\"]",
        "cleared: true",
        "cleared again: false",
        "after clearing: allowed [0]",
    ];
    for line in expect {
        assert!(
            redis.iter().any(|l| l == line),
            "missing `{line}` in {redis:#?}"
        );
    }
}

/// A lease set lives as long as its longest lease: a new set gets that TTL, a longer
/// lease stretches it, a shorter one never cuts it.
#[tokio::test]
async fn a_lease_set_outlives_its_longest_lease() {
    let prefix = support::unique_redis_prefix();
    let b = store(&prefix).await;
    let mut con = support::redis_raw().await;
    let key = format!("{prefix}rl:v1:l:c");
    let take = |id: &str, ttl: Duration| Check {
        penalty_key: None,
        charges: vec![],
        leases: vec![lease("c", 5, id, ttl)],
    };
    for (id, ttl, lives) in [
        ("1", MINUTE, 55_000..=60_001),
        ("2", 2 * MINUTE, 115_000..=120_001),
        ("3", MINUTE, 115_000..=120_001),
    ] {
        assert!(matches!(
            ok(b.check(&take(id, ttl)).await),
            Verdict::Allowed { .. }
        ));
        let left = support::pttl(&mut con, &key).await;
        assert!(lives.contains(&left), "after lease {id}: PTTL {left}");
    }
    // Released to empty, the set is gone; the next lease makes a new one, with a TTL.
    for id in ["1", "2", "3"] {
        ok(b.release(&lease("c", 5, id, MINUTE)).await);
    }
    assert_eq!(support::pttl(&mut con, &key).await, -2);
    assert!(matches!(
        ok(b.check(&take("4", MINUTE)).await),
        Verdict::Allowed { .. }
    ));
    let left = support::pttl(&mut con, &key).await;
    assert!((55_000..=60_001).contains(&left), "a new set: PTTL {left}");
}

#[tokio::test]
async fn leases_and_penalties_expire() {
    let b = store(&support::unique_redis_prefix()).await;
    let short = Duration::from_millis(300);
    let take = |id: &str| Check {
        penalty_key: None,
        charges: vec![],
        leases: vec![lease("c", 2, id, short)],
    };
    assert!(matches!(
        ok(b.check(&take("1")).await),
        Verdict::Allowed { .. }
    ));
    assert!(matches!(
        ok(b.check(&take("2")).await),
        Verdict::Allowed { .. }
    ));
    assert!(matches!(
        ok(b.check(&take("3")).await),
        Verdict::Refused { index: 0, .. }
    ));
    // A release frees its slot at once.
    ok(b.release(&lease("c", 2, "1", short)).await);
    assert!(matches!(
        ok(b.check(&take("3")).await),
        Verdict::Allowed { .. }
    ));
    assert!(matches!(
        ok(b.check(&take("4")).await),
        Verdict::Refused { .. }
    ));
    // Leases nobody released expire with their ttl: both slots free again.
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    assert!(matches!(
        ok(b.check(&take("5")).await),
        Verdict::Allowed { .. }
    ));
    assert!(matches!(
        ok(b.check(&take("6")).await),
        Verdict::Allowed { .. }
    ));

    // Long enough to outlast listing them: the listing SCANs the whole keyspace, which
    // on a test Redis shared with other work may hold many keys.
    let held = Duration::from_millis(1500);
    let signal = |user: &str| Signal {
        counter_key: format!("a:o:{user}:rejected"),
        window: MINUTE,
        threshold: 1,
        penalty_key: format!("p:o:{user}"),
        penalty: "throttle:free".into(),
        period: held,
    };
    assert!(ok(b.signal(&signal("u1")).await));
    assert!(ok(b.signal(&signal("u2")).await));
    let mut listed = ok(b.penalties().await);
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(
        listed
            .iter()
            .map(|p| (p.key.as_str(), p.penalty.as_str()))
            .collect::<Vec<_>>(),
        vec![("p:o:u1", "throttle:free"), ("p:o:u2", "throttle:free")]
    );
    assert!(
        listed
            .iter()
            .all(|p| p.remaining <= held && !p.remaining.is_zero())
    );
    let check = Check {
        penalty_key: Some("p:o:u1".into()),
        ..Check::default()
    };
    let v = ok(b.check(&check).await);
    assert!(
        matches!(&v, Verdict::Penalized { penalty, remaining } if penalty == "throttle:free" && *remaining <= held),
        "{v:?}"
    );
    tokio::time::sleep(held + Duration::from_millis(100)).await;
    assert!(ok(b.penalties().await).is_empty());
    assert!(matches!(ok(b.check(&check).await), Verdict::Allowed { .. }));
}

#[tokio::test]
async fn every_key_lives_under_the_prefix_with_a_ttl() {
    let prefix = support::unique_redis_prefix();
    let b = store(&prefix).await;
    // Every kind of key, including a user id full of characters that mean something
    // to Lua, to SCAN patterns or to the key structure.
    let user = "u*?[x]' .. redis.call('FLUSHALL') .. '\"\n";
    let check = Check {
        penalty_key: Some(format!("p:o:{user}")),
        charges: vec![
            charge(&format!("u:o:{user}:rpm"), 10, MINUTE, 1),
            charge(&format!("u:o:{user}:tpd"), 1_000_000, DAY, 500),
        ],
        leases: vec![lease(&format!("u:o:{user}:conc"), 3, "req-1", MINUTE)],
    };
    assert!(matches!(ok(b.check(&check).await), Verdict::Allowed { .. }));
    ok(b.adjust(&check.charges[1].bucket, 200).await);
    let signal = |name: &str, threshold| Signal {
        counter_key: format!("a:o:{user}:{name}"),
        window: MINUTE,
        threshold,
        penalty_key: format!("p:o:{user}"),
        penalty: "block".into(),
        period: MINUTE,
    };
    assert!(!ok(b.signal(&signal("injection", 5)).await));
    assert!(ok(b.signal(&signal("rejected", 1)).await));
    let listed = ok(b.penalties().await);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, format!("p:o:{user}"));

    let keys = support::keys_under(&prefix).await;
    // Two buckets, a lease set, one counter (the other went with its penalty), a penalty.
    assert_eq!(keys.len(), 5, "{keys:#?}");
    for key in &keys {
        assert!(key.starts_with(&format!("{prefix}rl:v1:")), "{key}");
    }
    support::assert_every_key_expires(&keys).await;
}

/// Poll `check` until it succeeds, for at most `within`.
async fn recovers(b: &RedisBackend, check: &Check, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match b.check(check).await {
            Ok(_) => return started.elapsed(),
            Err(_) if started.elapsed() < within => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("still failing after {within:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_redis_going_away_and_coming_back() {
    support::redis_raw().await;
    let timeout = Duration::from_millis(300);
    let check = charges(vec![charge("r", 1_000_000, MINUTE, 1)]);
    let quickly = timeout + Duration::from_millis(200);

    // Nothing listens on port 1: `new` still succeeds, calls fail within the timeout.
    let down = RedisBackend::new(&config(
        "redis://:hunter2@127.0.0.1:1".into(),
        &support::unique_redis_prefix(),
        timeout,
    ))
    .unwrap_or_else(|e| panic!("new must not need Redis: {e}"));
    for _ in 0..3 {
        let started = Instant::now();
        let r = down.check(&check).await;
        let took = started.elapsed();
        let Err(BackendError::Unavailable(message)) = r else {
            panic!("expected Unavailable, got {r:?}")
        };
        assert!(took <= quickly, "took {took:?}");
        assert!(!message.contains("hunter2"), "{message}");
        assert!(down.ping().await.is_err());
    }
    assert!(!format!("{down:?}").contains("hunter2"));

    // Through a proxy that is down when the store is made.
    let proxy = OutageProxy::start(support::redis_addr())
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    proxy.cut().await;
    let port = proxy.addr().port();
    let b = RedisBackend::new(&config(
        format!("redis://127.0.0.1:{port}"),
        &support::unique_redis_prefix(),
        timeout,
    ))
    .unwrap_or_else(|e| panic!("new: {e}"));
    let started = Instant::now();
    assert!(matches!(
        b.check(&check).await,
        Err(BackendError::Unavailable(_))
    ));
    assert!(started.elapsed() <= quickly);

    // Redis comes up: the same store connects by itself.
    proxy
        .restore()
        .await
        .unwrap_or_else(|e| panic!("restore: {e}"));
    let took = recovers(&b, &check, Duration::from_secs(10)).await;
    eprintln!("connected {took:?} after Redis came up");
    assert!(matches!(b.check(&check).await, Ok(Verdict::Allowed { .. })));

    // Redis goes away: calls fail, quickly.
    proxy.cut().await;
    let mut failed = 0;
    for _ in 0..3 {
        let started = Instant::now();
        if b.check(&check).await.is_err() {
            failed += 1;
        }
        assert!(started.elapsed() <= quickly, "took {:?}", started.elapsed());
    }
    assert_eq!(failed, 3, "every check fails while Redis is away");

    // And back: the same store reconnects.
    proxy
        .restore()
        .await
        .unwrap_or_else(|e| panic!("restore: {e}"));
    let took = recovers(&b, &check, Duration::from_secs(10)).await;
    eprintln!("reconnected {took:?} after Redis came back");
    assert!(matches!(b.check(&check).await, Ok(Verdict::Allowed { .. })));
    assert!(b.ping().await.is_ok());
    proxy.cut().await;
}

#[tokio::test]
async fn a_check_and_a_settlement_cost_one_round_trip_each() {
    support::redis_raw().await;
    let proxy = OutageProxy::start(support::redis_addr())
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    let b = RedisBackend::new(&config(
        format!("redis://127.0.0.1:{}", proxy.addr().port()),
        &support::unique_redis_prefix(),
        TIMEOUT,
    ))
    .unwrap_or_else(|e| panic!("new: {e}"));
    // As a request with per-key, per-user and tier token limits and a concurrency cap.
    let buckets = ["k:tpd", "u:tpd", "t:tpd"];
    let check = |id: &str| Check {
        penalty_key: Some("p:owner:user".into()),
        charges: buckets.iter().map(|k| charge(k, 1000, DAY, 100)).collect(),
        leases: vec![lease("u:conc", 1, id, MINUTE)],
    };
    // Connecting and loading the script cost their own round trips: not counted.
    let warm = ok(b.check(&check("warm")).await);
    assert!(matches!(warm, Verdict::Allowed { .. }), "{warm:?}");
    let warm_buckets: Vec<Bucket> = check("warm")
        .charges
        .into_iter()
        .map(|c| c.bucket)
        .collect();
    ok(b.settle(&warm_buckets, 0, &check("warm").leases).await);

    let before = proxy.round_trips();
    let first = ok(b.check(&check("a")).await);
    assert_eq!(proxy.round_trips() - before, 1, "the admission check");
    assert_eq!(remaining(&first), [800, 800, 800]);
    // The slot is taken.
    assert!(matches!(
        ok(b.check(&check("b")).await),
        Verdict::Refused { .. }
    ));

    // The request used 40 tokens of the 100 charged: 60 back on three buckets, and
    // its slot released, in one round trip.
    let before = proxy.round_trips();
    ok(b.settle(&warm_buckets, -60, &check("a").leases).await);
    assert_eq!(proxy.round_trips() - before, 1, "the settlement");
    let after = ok(b.check(&check("c")).await);
    assert!(
        matches!(after, Verdict::Allowed { .. }),
        "the slot was released: {after:?}"
    );
    assert_eq!(
        remaining(&after),
        [760, 760, 760],
        "the refund reached every bucket"
    );

    // Redis forgot the script (a restart, SCRIPT FLUSH): the call names it by hash, is
    // told NOSCRIPT, and sends the script itself.
    let mut raw = support::redis_raw().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap_or_else(|e| panic!("SCRIPT FLUSH: {e}"));
    ok(b.settle(&warm_buckets, -10, &check("c").leases).await);
    let last = ok(b.check(&check("d")).await);
    assert!(matches!(last, Verdict::Allowed { .. }), "{last:?}");
    assert_eq!(remaining(&last), [670, 670, 670]);

    // A request that used more than it was charged: the rest is taken after the fact.
    ok(b.settle(&warm_buckets, 50, &check("d").leases).await);
    let more = ok(b.check(&check("e")).await);
    assert!(matches!(more, Verdict::Allowed { .. }), "{more:?}");
    assert_eq!(remaining(&more), [520, 520, 520]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_that_arrive_together_go_as_one_script_call_and_stay_exact() {
    let prefix = support::unique_redis_prefix();
    let b = Arc::new(store(&prefix).await);
    const N: usize = 200;
    let (calls_before, jobs_before) = b.checks().counts();
    // As 200 requests of one key and one user at once: 60 a minute, a cap of 50 at once.
    let tasks: Vec<JoinHandle<Result<Verdict, BackendError>>> = (0..N)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move {
                let check = Check {
                    penalty_key: Some("p:o:u".into()),
                    charges: vec![
                        charge("k:rpm", 60, MINUTE, 1),
                        charge("u:rpm", 1000, MINUTE, 1),
                    ],
                    leases: vec![lease("u:conc", 50, &format!("req-{i}"), MINUTE)],
                };
                b.check(&check).await
            })
        })
        .collect();
    let (mut allowed, mut by_rate, mut by_cap) = (0, 0, 0);
    for t in tasks {
        match t.await.unwrap_or_else(|e| panic!("task: {e}")) {
            Ok(Verdict::Allowed { .. }) => allowed += 1,
            Ok(Verdict::Refused { index: 0, .. }) => by_rate += 1,
            Ok(Verdict::Refused { index: 2, .. }) => by_cap += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (allowed, by_rate + by_cap),
        (50, N - 50),
        "the cap of 50 binds first"
    );
    let (calls, jobs) = b.checks().counts();
    let (calls, jobs) = (calls - calls_before, jobs - jobs_before);
    assert_eq!(jobs, N as u64, "one job per check");
    eprintln!("{jobs} checks at once: {calls} script calls");
    assert!(
        calls * 4 <= jobs,
        "{jobs} checks arriving together took {calls} script calls"
    );
    // Exactly the admitted ones hold a lease and were charged: ten more fit the minute's
    // 60, and the per-user bucket counted the same 50.
    let lease_set = format!("{prefix}rl:v1:l:u:conc");
    let held: u64 = raw(redis::cmd("ZCARD").arg(&lease_set)).await;
    assert_eq!(held, 50);
    let probe = ok(b
        .check(&charges(vec![
            charge("k:rpm", 60, MINUTE, 10),
            charge("u:rpm", 1000, MINUTE, 1),
        ]))
        .await);
    assert_eq!(remaining(&probe), [0, 949], "{probe:?}");
    let keys = support::keys_under(&prefix).await;
    support::assert_every_key_expires(&keys).await;
}

/// The script's `check` and `settle` operations with several jobs in one call: each job
/// sees the ones before it, as separate calls back to back would.
#[tokio::test]
async fn several_jobs_in_one_call_run_in_order() {
    use redis::Value;
    use sluice_gateway::limits::combine::{CheckJob, SettleJob};

    let prefix = support::unique_redis_prefix();
    let b = store(&prefix).await;
    let (bucket, leases, penalty) = (
        format!("{prefix}b"),
        format!("{prefix}l"),
        format!("{prefix}p"),
    );
    const HALF: u64 = 30_000_000;
    const PERIOD: u64 = 60_000_000;
    // Two a minute: each charge moves the bucket by half the period; one slot.
    let check = |id: &str, charges: usize, penalized: bool| CheckJob {
        penalty: penalized.then(|| penalty.clone()),
        charges: vec![(bucket.clone(), HALF, PERIOD); charges],
        leases: if id.is_empty() {
            vec![]
        } else {
            vec![(leases.clone(), 1, PERIOD, id.to_string())]
        },
    };
    // A check that ran answers `1 now refused tat...`, one string.
    let ints = |v: &Value| -> Vec<i64> {
        let Value::BulkString(text) = v else {
            panic!("not a string: {v:?}")
        };
        sluice_gateway::redis_conn::decimals(text)
            .unwrap_or_else(|| panic!("not packed numbers: {:?}", String::from_utf8_lossy(text)))
    };
    let half = HALF as i64;
    let jobs = [
        check("a", 1, true),
        // The slot is a's.
        check("b", 1, true),
        // Two charges on one bucket: the second sees the first and does not fit.
        check("", 2, false),
    ];
    let replies = ok(b.checks().together(&jobs.iter().collect::<Vec<_>>()).await);
    assert_eq!(replies.len(), 3);
    let first = ints(&replies[0]);
    let now = first[1];
    assert_eq!(first, [1, now, -1, 0], "allowed, from an empty bucket");
    assert_eq!(
        ints(&replies[1]),
        [1, now, 1, now + half],
        "refused at the lease"
    );
    assert_eq!(
        ints(&replies[2]),
        [1, now, 1, now + half, now + 2 * half],
        "the second charge saw the first"
    );
    // Written once each: a's charge (the refused jobs moved nothing), a's lease alone.
    let tat = || async { raw::<Option<i64>>(redis::cmd("GET").arg(&bucket)).await };
    let members =
        || async { raw::<Vec<String>>(redis::cmd("ZRANGE").arg(&leases).arg(0).arg(-1)).await };
    assert_eq!(tat().await, Some(now + half));
    assert_eq!(members().await, ["a"]);
    support::assert_every_key_expires(&[bucket.clone(), leases.clone()]).await;

    // Settlements together: a refunds its charge and gives its slot back (a release of
    // a lease never taken changes nothing), then a later request is charged half more.
    let settle = |forward: bool, id: &str| SettleJob {
        forward,
        buckets: vec![(bucket.clone(), HALF)],
        leases: vec![(leases.clone(), id.to_string())],
    };
    let jobs = [settle(false, "a"), settle(true, "never")];
    let replies = ok(b
        .settlements()
        .together(&jobs.iter().collect::<Vec<_>>())
        .await);
    assert_eq!(replies, [Value::Int(1), Value::Int(1)]);
    let tat = tat().await.unwrap_or(0);
    // Back to now, then forward by half: about now + half again, on the later clock.
    assert!(tat > now + half && tat < now + half + 5_000_000, "{tat}");
    assert!(members().await.is_empty(), "the slot was released");

    // A penalty answers every check that names it, and only those.
    let () = raw(redis::cmd("SET")
        .arg(&penalty)
        .arg("block")
        .arg("PX")
        .arg(5_000))
    .await;
    let jobs = [
        check("d", 0, true),
        check("", 0, false),
        check("e", 0, true),
    ];
    let replies = ok(b.checks().together(&jobs.iter().collect::<Vec<_>>()).await);
    for i in [0, 2] {
        let Value::Array(items) = &replies[i] else {
            panic!("{:?}", replies[i])
        };
        assert_eq!(items[0], Value::Int(0), "job {i} is penalized");
        assert_eq!(items[1], Value::BulkString(b"block".to_vec()));
        assert!(matches!(items[2], Value::Int(1..=5_000)), "{:?}", items[2]);
    }
    assert_eq!(ints(&replies[1])[2], -1, "no penalty named: allowed");
    let () = raw(redis::cmd("DEL").arg(&bucket).arg(&leases).arg(&penalty)).await;
}
