//! The Redis budget ledger against a real Redis: counters started from the request log
//! (once, even when two instances start them at once), a TTL past the period on every
//! key, each threshold crossed exactly once across instances charging concurrently, two
//! gateways blocking at the budget to within one request's cost, a restart (or a
//! flushed Redis) that keeps the spend, and an unreachable Redis reported, never read as
//! zero.
//!
//! Redis comes from `SLUICE_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); a test
//! fails with a clear message when it is not reachable. Each test writes under a prefix
//! of its own.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sluice_gateway::limits::config::FailMode;
use sluice_gateway::redis_conn::RedisPool;
use sluice_gateway::store::{SpendFilter, SpendGroup, SpendRow, StorageTarget, Store};
use sluice_gateway::telemetry::{Endpoint, Outcome, RequestRecord};
use sluice_gateway::usage::alerts::{Alerter, RetryPolicy};
use sluice_gateway::usage::budgets;
use sluice_gateway::usage::ledger::{
    BudgetLedger, Counter, Crossing, LedgerError, RedisLedger, SpendSource, SyncedLedger,
};
use sluice_gateway::usage::{BudgetDecision, Budgets, Cost, Subject, record_cost};
use tokio_util::task::TaskTracker;

const TIMEOUT: Duration = Duration::from_secs(5);

/// A ledger on the test server under `prefix`, reachable before it is returned.
async fn ledger(prefix: &str, source: Arc<dyn SpendSource>) -> RedisLedger {
    support::redis_raw().await;
    RedisLedger::new(
        &support::redis_config(support::redis_url(), prefix, FailMode::Open, TIMEOUT),
        source,
    )
    .unwrap_or_else(|e| panic!("RedisLedger::new: {e}"))
}

/// A log that has spent a fixed amount on everything, counting how often it is read.
struct Fixed(i64, AtomicU64);

#[async_trait]
impl SpendSource for Fixed {
    async fn spend(&self, _: &SpendFilter) -> Result<i64, String> {
        self.1.fetch_add(1, Ordering::SeqCst);
        // Slow enough that two instances starting one counter overlap.
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(self.0)
    }
    async fn spend_by(
        &self,
        _: &SpendFilter,
        _: SpendGroup,
        _: usize,
    ) -> Result<Vec<SpendRow>, String> {
        Ok(Vec::new())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn counter(key: &str, limit: i64, thresholds: &[i64]) -> Counter {
    Counter {
        key: key.into(),
        limit,
        thresholds: thresholds.to_vec(),
        expires_at_ms: now_ms() + 3_600_000,
        filter: SpendFilter::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_start_from_the_log_once_and_expire_after_their_period() {
    let prefix = support::unique_redis_prefix();
    let source = Arc::new(Fixed(500, AtomicU64::new(0)));
    let a = Arc::new(ledger(&prefix, source.clone()).await);
    let b = Arc::new(ledger(&prefix, source.clone()).await);
    let c = [counter("r:2025-06:global:", 1_000, &[800])];
    // Two instances start the same counter at once: both see the log's 500, not 1000.
    let (x, y) = tokio::join!(a.check(&c), b.check(&c));
    assert_eq!(x.unwrap()[0].spent, 500);
    assert_eq!(y.unwrap()[0].spent, 500);
    let crossings = a.charge(&c, 300).await.unwrap();
    assert_eq!(
        crossings,
        [Crossing {
            counter: 0,
            threshold: 0,
            spent: 800
        }]
    );
    assert_eq!(b.check(&c).await.unwrap()[0].spent, 800);
    let reads = source.1.load(Ordering::SeqCst);
    assert!(reads <= 2, "read from the log {reads} times");

    let mut con = support::redis_raw().await;
    let key = format!("{prefix}budget:v1:r:2025-06:global:");
    let value: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(value, 800);
    let pttl = support::pttl(&mut con, &key).await;
    assert!(pttl > 3_500_000 && pttl <= 3_600_000, "{pttl}");

    // A counter that lost its expiry (only something outside Sluice removes it) gets it
    // back with its next charge.
    let _: i64 = redis::cmd("PERSIST")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    a.charge(&c, 1).await.unwrap();
    let pttl = support::pttl(&mut con, &key).await;
    assert!(pttl > 3_500_000 && pttl <= 3_600_000, "{pttl}");
    assert_eq!(b.check(&c).await.unwrap()[0].spent, 801);

    let listed = a.list("r:2025-06:").await.unwrap();
    assert_eq!(listed, [("r:2025-06:global:".to_string(), 801)]);
    assert!(a.list("other:").await.unwrap().is_empty());
}

/// Two counters per charge (a global one and a user's), thresholds at 50/80/100 %.
fn two_counters() -> Vec<Counter> {
    vec![
        counter("total:m:global:", 10_000, &[5_000, 8_000, 10_000]),
        counter("user:d:user:4:acme:amy", 2_000, &[1_600, 2_000]),
    ]
}

/// 200 charges of 61 on `counters` at once, alternating between `ledgers`: every
/// crossing reported, each threshold exactly once.
async fn charge_200_at_once(
    ledgers: &[Arc<dyn BudgetLedger>; 2],
    counters: &[Counter],
) -> Vec<Crossing> {
    let mut tasks = Vec::new();
    for i in 0..200 {
        let l = ledgers[i % 2].clone();
        let counters = counters.to_vec();
        tasks.push(tokio::spawn(async move {
            l.charge(&counters, 61)
                .await
                .unwrap_or_else(|e| panic!("charge: {e}"))
        }));
    }
    let mut all: Vec<Crossing> = Vec::new();
    for t in tasks {
        match t.await {
            Ok(crossings) => all.extend(crossings),
            Err(e) => panic!("charge task: {e}"),
        }
    }
    let mut seen: Vec<(usize, usize)> = all.iter().map(|x| (x.counter, x.threshold)).collect();
    seen.sort_unstable();
    assert_eq!(seen, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]);
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_charging_at_once_cross_each_threshold_exactly_once() {
    let prefix = support::unique_redis_prefix();
    let source: Arc<dyn SpendSource> = Arc::new(Fixed(0, AtomicU64::new(0)));
    let redis = [
        Arc::new(ledger(&prefix, source.clone()).await),
        Arc::new(ledger(&prefix, source.clone()).await),
    ];
    let ledgers: [Arc<dyn BudgetLedger>; 2] = [redis[0].clone(), redis[1].clone()];
    let counters = two_counters();
    let all = charge_200_at_once(&ledgers, &counters).await;
    // Charges that arrive together go as one script call, and each still learns what
    // it alone crossed: the spend right after it.
    for x in &all {
        let t = counters[x.counter].thresholds[x.threshold];
        assert!(x.spent >= t && x.spent < t + 61, "{x:?} crossed {t}");
    }
    let (calls, jobs) = redis
        .iter()
        .map(|l| l.charges().counts())
        .fold((0, 0), |(c, j), (c1, j1)| (c + c1, j + j1));
    assert_eq!(jobs, 200);
    assert!(calls * 4 <= jobs, "200 charges at once took {calls} calls");
    let spend = ledgers[0].check(&counters).await.unwrap();
    assert_eq!(spend[0].spent, 200 * 61);
    assert_eq!(spend[1].spent, 200 * 61);
    assert!(spend[0].exhausted() && spend[1].exhausted());
}

/// A synced ledger (`[redis] sync`) on the test server under `prefix`, through a proxy
/// that counts round trips.
async fn synced(
    prefix: &str,
    source: Arc<dyn SpendSource>,
    interval: Duration,
) -> (Arc<SyncedLedger>, Arc<sluice_sim::outage::OutageProxy>) {
    support::redis_raw().await;
    let proxy = sluice_sim::outage::OutageProxy::start(support::redis_addr())
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    let url = format!("redis://127.0.0.1:{}", proxy.addr().port());
    let config = support::redis_config(url, prefix, FailMode::Open, TIMEOUT);
    let redis = RedisLedger::new(&config, source).unwrap_or_else(|e| panic!("new: {e}"));
    (SyncedLedger::start(redis, interval), proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_instances_send_sums_and_still_cross_each_threshold_once() {
    let prefix = support::unique_redis_prefix();
    let source: Arc<dyn SpendSource> = Arc::new(Fixed(0, AtomicU64::new(0)));
    let every = Duration::from_millis(20);
    let (a, proxy) = synced(&prefix, source.clone(), every).await;
    let (b, _b_proxy) = synced(&prefix, source.clone(), every).await;
    let ledgers: [Arc<dyn BudgetLedger>; 2] = [a, b];
    let counters = two_counters();
    let before = proxy.round_trips();
    let all = charge_200_at_once(&ledgers, &counters).await;
    for x in &all {
        let t = counters[x.counter].thresholds[x.threshold];
        assert!(x.spent >= t, "{x:?} crossed {t}");
    }
    // A's hundred charges went out in a few sums (each sync one script call, plus the
    // counters' start from the log), not a hundred calls.
    let trips = proxy.round_trips() - before;
    assert!(trips <= 20, "{trips} round trips for A's 100 charges");
    // Redis holds every charge.
    let exact = ledger(&prefix, source).await;
    let spend = exact.check(&counters).await.unwrap();
    assert_eq!(spend[0].spent, 200 * 61);
    assert_eq!(spend[1].spent, 200 * 61);
}

/// Charge on `l` and run its sync by hand; the charge's crossings.
async fn charge_synced(l: &Arc<SyncedLedger>, counters: &[Counter], nanos: i64) -> Vec<Crossing> {
    let (l2, counters) = (l.clone(), counters.to_vec());
    let charge = tokio::spawn(async move { l2.charge(&counters, nanos).await });
    while !charge.is_finished() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        l.sync().await.unwrap_or_else(|e| panic!("sync: {e}"));
    }
    match charge.await {
        Ok(Ok(crossings)) => crossings,
        Ok(Err(e)) => panic!("charge: {e}"),
        Err(e) => panic!("charge task: {e}"),
    }
}

#[tokio::test]
async fn a_synced_check_is_local_and_sees_the_others_one_sync_later() {
    let prefix = support::unique_redis_prefix();
    let source: Arc<dyn SpendSource> = Arc::new(Fixed(0, AtomicU64::new(0)));
    let by_hand = Duration::from_secs(3600);
    let (a, proxy) = synced(&prefix, source.clone(), by_hand).await;
    let (b, _b_proxy) = synced(&prefix, source.clone(), by_hand).await;
    let counters = vec![counter("total:m:global:", 10_000, &[1_500])];
    let spent = |l: Arc<SyncedLedger>| {
        let counters = counters.clone();
        async move { l.check(&counters).await.unwrap()[0].spent }
    };

    assert!(charge_synced(&a, &counters, 1_000).await.is_empty());
    // B reads the counter from Redis; A knows it from its sync, without a round trip.
    assert_eq!(spent(b.clone()).await, 1_000);
    let before = proxy.round_trips();
    assert_eq!(spent(a.clone()).await, 1_000);
    assert_eq!(
        proxy.round_trips(),
        before,
        "a fresh counter is read locally"
    );

    // B's charge crosses 1,500 in Redis and reports it.
    let crossed = charge_synced(&b, &counters, 600).await;
    assert_eq!(crossed.len(), 1);
    assert_eq!((crossed[0].threshold, crossed[0].spent), (0, 1_600));
    // A has not synced since: it still sees its own view.
    assert_eq!(spent(a.clone()).await, 1_000);
    // A charge waiting for A's next sync already counts on A.
    let (a2, c2) = (a.clone(), counters.clone());
    let pending = tokio::spawn(async move { a2.charge(&c2, 100).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(spent(a.clone()).await, 1_100);
    a.sync().await.unwrap_or_else(|e| panic!("sync: {e}"));
    assert!(
        pending.await.unwrap().unwrap().is_empty(),
        "1,500 was crossed by B"
    );
    assert_eq!(spent(a.clone()).await, 1_700);
}

fn record(id: &str, at_ms: i64, user: &str, nanos: i64) -> RequestRecord {
    let mut r = RequestRecord {
        request_id: id.into(),
        started_at_ms: at_ms as u64,
        endpoint: Endpoint::ChatCompletions,
        key_id: Some("k1".into()),
        owner: Some("acme".into()),
        user: Some(user.into()),
        feature: Some("chat".into()),
        outcome: Outcome::Ok,
        status: 200,
        ..RequestRecord::default()
    };
    record_cost(&mut r, Some(Cost::from_nanos(nanos)), None);
    r
}

fn budgets_on_redis(prefix: &str, store: Arc<Store>, text: &str, tasks: &TaskTracker) -> Budgets {
    budgets_synced(prefix, store, text, tasks, None)
}

/// As [`budgets_on_redis`], with `[redis] sync` at `sync`.
fn budgets_synced(
    prefix: &str,
    store: Arc<Store>,
    text: &str,
    tasks: &TaskTracker,
    sync: Option<Duration>,
) -> Budgets {
    let raw: sluice_gateway::usage::RawBudgets =
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
    let config = budgets::build(raw, &[], &mut |p, m| panic!("{p}: {m}"));
    let mut redis = support::redis_config(support::redis_url(), prefix, FailMode::Open, TIMEOUT);
    redis.sync = sync;
    Budgets::new(
        config,
        Some(&redis),
        &mut RedisPool::default(),
        store,
        None,
        tasks.clone(),
    )
    .unwrap_or_else(|e| panic!("Budgets::new: {e}"))
}

const MONTHLY_PER_KEY: &str = r#"
    [[rules]]
    name = "monthly"
    scope = "key"
    period = "month"
    limit_usd = 0.01
    "#;

const COST: Cost = Cost::from_nanos(700_000);

fn key_subject() -> Subject<'static> {
    Subject {
        key_id: Some("k1"),
        owner: Some("acme"),
        user: None,
        tier: None,
        feature: None,
        endpoint: Endpoint::ChatCompletions,
    }
}

/// Two gateways on one fresh prefix (`[redis] sync` at `sync`) serving requests of
/// [`COST`] in turn, each checked before and charged after, until one is refused: how
/// many were served, the spend the refusal saw, and the gateways.
async fn alternate_until_refused(
    sync: Option<Duration>,
    ledger: &str,
) -> (i64, Cost, Vec<Arc<Budgets>>) {
    support::redis_raw().await;
    let prefix = support::unique_redis_prefix();
    let tasks = TaskTracker::new();
    let store = support::open("sqlite", &StorageTarget::Memory).await;
    let gateways: Vec<Arc<Budgets>> = (0..2)
        .map(|_| {
            let b = budgets_synced(&prefix, store.clone(), MONTHLY_PER_KEY, &tasks, sync);
            Arc::new(b)
        })
        .collect();
    assert_eq!(gateways[0].ledger_name(), ledger);
    let subject = key_subject();
    let mut served = 0i64;
    loop {
        let g = &gateways[(served % 2) as usize];
        let now = now_ms();
        match g.check(&subject, now).await {
            BudgetDecision::Allow => {
                // Synced: returns once the sync that carried it has answered.
                g.charge(&subject, now, COST).await;
                served += 1;
            }
            BudgetDecision::Block { spent, limit, .. } => {
                assert!(spent >= limit);
                return (served, spent, gateways);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(served < 100, "never blocked");
    }
}

async fn both_refuse(gateways: &[Arc<Budgets>]) {
    for g in gateways {
        assert!(matches!(
            g.check(&key_subject(), now_ms()).await,
            BudgetDecision::Block { .. }
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_block_at_the_budget_within_one_request() {
    let (served, spent, gateways) = alternate_until_refused(None, "redis").await;
    let limit = Cost::from_nanos(10_000_000);
    assert!(
        spent.nanos < limit.nanos + COST.nanos,
        "{spent} overshoots {limit} by a request or more"
    );
    // 0.01 / 0.0007: the 15th request reaches the limit, the 16th is refused.
    assert_eq!(served, 15);
    both_refuse(&gateways).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_synced_gateways_block_at_the_budget_within_what_one_sync_allows() {
    let sync = Some(Duration::from_millis(20));
    let (served, _, gateways) = alternate_until_refused(sync, "redis-synced").await;
    // Exact serves 15: the other gateway's view may miss the last charge, at most one
    // request's worth here.
    assert!((15..=16).contains(&served), "served {served}");
    // Once both have read Redis again, both refuse.
    tokio::time::sleep(Duration::from_millis(100)).await;
    both_refuse(&gateways).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_or_a_flushed_redis_keeps_the_spend() {
    for (name, target) in support::backends() {
        support::redis_raw().await;
        let prefix = support::unique_redis_prefix();
        let tasks = TaskTracker::new();
        let store = support::open(name, &target).await;
        let now = now_ms();
        store
            .insert(&[
                record("a", now - 2000, "u", 4_000_000),
                record("b", now - 1000, "u", 5_000_000),
            ])
            .await
            .unwrap();
        let subject = Subject {
            key_id: Some("k1"),
            owner: Some("acme"),
            user: Some("u"),
            tier: None,
            feature: Some("chat"),
            endpoint: Endpoint::ChatCompletions,
        };
        let gateway = budgets_on_redis(&prefix, store.clone(), MONTHLY_PER_KEY, &tasks);
        assert_eq!(
            gateway.check(&subject, now).await,
            BudgetDecision::Allow,
            "{name}"
        );
        let c = record("c", now, "u", 1_000_000);
        gateway.charge_record(&c).await;
        store.insert(&[c]).await.unwrap();
        let BudgetDecision::Block { spent, .. } = gateway.check(&subject, now).await else {
            panic!("{name}: not blocked at the limit")
        };
        assert_eq!(spent, Cost::from_nanos(10_000_000), "{name}");

        // Redis loses everything: the next check starts the counter from the log again.
        let mut con = support::redis_raw().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(keys.len(), 1, "{name}: {keys:?}");
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut con)
            .await
            .unwrap();
        let restarted = budgets_on_redis(&prefix, store.clone(), MONTHLY_PER_KEY, &tasks);
        let BudgetDecision::Block { spent, .. } = restarted.check(&subject, now).await else {
            panic!("{name}: the flushed counter forgot the spend")
        };
        assert_eq!(spent, Cost::from_nanos(10_000_000), "{name}");
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_reported_never_read_as_zero() {
    // Nothing listens on port 9 of loopback.
    let url = "redis://:hunter2@127.0.0.1:9".to_string();
    let source: Arc<dyn SpendSource> = Arc::new(Fixed(0, AtomicU64::new(0)));
    let l = RedisLedger::new(
        &support::redis_config(
            url.clone(),
            "t:",
            FailMode::Open,
            Duration::from_millis(200),
        ),
        source.clone(),
    )
    .unwrap();
    let c = [counter("x", 10, &[])];
    match l.check(&c).await {
        Err(LedgerError::Unavailable(m)) => assert!(!m.contains("hunter2"), "{m}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(l.charge(&c, 5).await.is_err());

    let text = r#"
        [[rules]]
        name = "g"
        scope = "global"
        period = "day"
        limit_usd = 1
        "#;
    let tasks = TaskTracker::new();
    for (mode, expected) in [
        (FailMode::Open, BudgetDecision::Allow),
        (FailMode::Closed, BudgetDecision::Unavailable),
    ] {
        let raw: sluice_gateway::usage::RawBudgets = toml::from_str(text).unwrap();
        let config = budgets::build(raw, &[], &mut |p, m| panic!("{p}: {m}"));
        let ledger: Arc<dyn BudgetLedger> = Arc::new(
            RedisLedger::new(
                &support::redis_config(url.clone(), "t:", mode, Duration::from_millis(200)),
                source.clone(),
            )
            .unwrap(),
        );
        let alerter = Alerter::new(None, RetryPolicy::default(), None, tasks.clone()).unwrap();
        let b = Budgets::with_parts(config, ledger, source.clone(), alerter, mode, None);
        let s = Subject {
            key_id: None,
            owner: None,
            user: None,
            tier: None,
            feature: None,
            endpoint: Endpoint::Embeddings,
        };
        assert_eq!(b.check(&s, now_ms()).await, expected, "{mode:?}");
        // A charge that cannot be counted is logged and counted in metrics, not raised.
        b.charge(&s, now_ms(), Cost::from_nanos(5)).await;
    }
}

/// Each scope's counter key (the tail of its Redis key, so what a restarted or newer
/// gateway must find again) and the log filter it starts from.
#[tokio::test]
async fn each_scope_has_its_counter_key_and_filter() {
    let tasks = TaskTracker::new();
    let store = support::open("sqlite", &StorageTarget::Memory).await;
    let rules = r#"
        [[rules]]
        name = "g"
        scope = "global"
        period = "day"
        limit_usd = 1.0
        [[rules]]
        name = "k"
        scope = "key"
        period = "day"
        limit_usd = 1.0
        [[rules]]
        name = "o"
        scope = "owner"
        period = "day"
        limit_usd = 1.0
        [[rules]]
        name = "f"
        scope = "feature"
        period = "day"
        limit_usd = 1.0
        [[rules]]
        name = "u"
        scope = "user"
        period = "day"
        limit_usd = 1.0
        "#;
    let b = budgets_synced(&support::unique_redis_prefix(), store, rules, &tasks, None);
    let subject = Subject {
        feature: Some("search"),
        user: Some("amy"),
        ..key_subject()
    };
    // 2025-06-15T12:00:00Z.
    let at = 1_749_988_800_000;
    let counted = b.count(&subject, at);
    let counters = counted.counters();
    let keys: Vec<&str> = counters.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "g:2025-06-15:global:",
            "k:2025-06-15:key:k1",
            "o:2025-06-15:owner:acme",
            "f:2025-06-15:feature:search",
            "u:2025-06-15:user:4:acme:amy",
        ]
    );
    let day = |f: SpendFilter| SpendFilter {
        since_ms: 1_749_945_600_000,
        until_ms: 1_750_032_000_000,
        ..f
    };
    let filters: Vec<&SpendFilter> = counters.iter().map(|c| &c.filter).collect();
    let some = |v: &str| Some(v.to_string());
    assert_eq!(
        filters,
        [
            &day(SpendFilter::default()),
            &day(SpendFilter {
                key_id: some("k1"),
                ..SpendFilter::default()
            }),
            &day(SpendFilter {
                owner: some("acme"),
                ..SpendFilter::default()
            }),
            &day(SpendFilter {
                feature: some("search"),
                ..SpendFilter::default()
            }),
            &day(SpendFilter {
                owner: some("acme"),
                user: some("amy"),
                ..SpendFilter::default()
            }),
        ]
    );
}
