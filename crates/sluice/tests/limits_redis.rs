//! Black-box, against the real Redis: three gateway processes share one set of limits
//! exactly (requests and tokens per minute); with Redis cut away they keep answering on
//! local limits, say so in `/readyz` and `/metrics`, and share exact limits again once
//! it is back.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Proc, spawn, write_temp};
use serde_json::{Value, json};
use sluice_sim::outage::OutageProxy;

fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The Redis address, after checking a server answers there (a clear failure otherwise).
fn redis_addr() -> SocketAddr {
    let url = redis_url();
    let hostport = url
        .trim_start_matches("redis://")
        .rsplit('@')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
        .unwrap()
        .next()
        .unwrap();
    if let Err(e) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        panic!(
            "these tests need Redis at {url} (SLUICE_TEST_REDIS_URL): {e}; start it with `redis-server --daemonize yes`"
        );
    }
    addr
}

fn unique_prefix() -> String {
    format!("sluice_test_{}:", common::unique())
}

const SIM: &str = r#"
[[providers]]
name = "sim"
kind = "sim"
[[models]]
name = "gpt-4o-mini"
provider = "sim"
[[models]]
name = "text-embedding-3-small"
provider = "sim"
kind = "embeddings"
"#;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

fn gateways(n: usize, config: &str) -> Vec<Proc> {
    let path = write_temp(
        &format!("limits-{}.toml", unique_prefix().trim_end_matches(':')),
        config,
    );
    let path = path.to_str().unwrap().to_string();
    (0..n)
        .map(|_| {
            spawn(
                &["serve", "--config", &path, "--listen", "127.0.0.1:0"],
                &[],
            )
        })
        .collect()
}

/// Fire `bodies` all at once, spread round-robin over the gateways; statuses in order.
async fn burst(procs: &[Proc], path: &str, bodies: Vec<Value>) -> (Vec<u16>, Duration) {
    let client = client();
    let addrs: Vec<String> = procs.iter().map(|p| p.addr.clone()).collect();
    let start = Arc::new(tokio::sync::Barrier::new(bodies.len()));
    let began = Instant::now();
    let tasks: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let url = format!("http://{}{path}", addrs[i % addrs.len()]);
            let (client, start) = (client.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                client
                    .post(url)
                    // Identical inputs: keep the cache out of a test of limits.
                    .header("x-sluice-cache", "no-store")
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    (statuses, began.elapsed())
}

/// How many of a burst's answers were 200; every other one must be a 429.
fn accepted(statuses: &[u16]) -> u64 {
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        ok + refused,
        statuses.len(),
        "only 200s and 429s: {statuses:?}"
    );
    ok as u64
}

/// GCRA lets one more request through per `limit/minute` interval that passes during
/// the burst; the burst normally ends well inside the first interval.
fn allowed_extra(elapsed: Duration, per_minute: u64) -> u64 {
    (elapsed.as_secs_f64() * per_minute as f64 / 60.0).floor() as u64
}

/// Limits on Redis under `prefix` (`redis_extra`: more `[redis]` lines): tier `free`
/// (the default) allows each end user 60 requests a minute, `metered` 6,000 tokens.
fn shared_limits(prefix: &str, redis_extra: &str) -> String {
    format!(
        r#"
        [redis]
        url = "{url}"
        prefix = "{prefix}"
        # Three debug-build gateways, the load generator and Redis share two cores here.
        timeout = "2s"
        {redis_extra}
        [limits]
        default_tier = "free"
        [[tiers]]
        name = "free"
        per_user = {{ requests_per_minute = 60 }}
        [[tiers]]
        name = "metered"
        per_user = {{ tokens_per_minute = 6000 }}
        {SIM}"#,
        url = redis_url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_request_and_token_limits_exactly() {
    redis_addr();
    let prefix = unique_prefix();
    let config = shared_limits(&prefix, "");
    let procs = gateways(3, &config);

    let chat = json!({"model": "gpt-4o-mini", "user": "alice",
                      "messages": [{"role": "user", "content": "hi"}]});
    let (statuses, elapsed) = burst(&procs, "/v1/chat/completions", vec![chat; 300]).await;
    let ok = accepted(&statuses);
    let extra = allowed_extra(elapsed, 60);
    assert!(
        (60..=61 + extra).contains(&ok),
        "accepted {ok} of 300 across 3 instances with a 60/min limit (burst took {elapsed:?})"
    );

    // Tokens: 100-token inputs (token arrays, so the estimate equals the real usage
    // and reconciliation changes nothing) against 6,000 tokens per minute, with the
    // `metered` tier as the default.
    drop(procs);
    let metered = config.replace("default_tier = \"free\"", "default_tier = \"metered\"");
    let procs = gateways(3, &metered);
    let tokens: Vec<u32> = (1..=100).collect();
    let embed = json!({"model": "text-embedding-3-small", "user": "bob", "input": [tokens]});
    let (statuses, elapsed) = burst(&procs, "/v1/embeddings", vec![embed; 300]).await;
    let ok = accepted(&statuses);
    // 6,000 tokens a minute refill 100 tokens (one request) per second.
    let extra = allowed_extra(elapsed, 60);
    assert!(
        (60..=61 + extra).contains(&ok),
        "accepted {ok} 100-token requests of 300 with 6,000 tokens/min (burst took {elapsed:?})"
    );
}

/// `[redis] sync`: three instances count on their own and reconcile through
/// Redis. A burst may pass the limit by what the others admitted since their last sync,
/// never by more than each instance's own view allows; once they have synced, all of
/// them refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synced_instances_share_a_limit_within_what_one_sync_allows() {
    redis_addr();
    let prefix = unique_prefix();
    let config = shared_limits(&prefix, "sync = \"20ms\"");
    let procs = gateways(3, &config);
    let client = client();
    let (status, body) = get_text(&client, format!("http://{}/readyz", procs[0].addr)).await;
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        ready["checks"]["limits"]["backend"], "redis-synced",
        "{ready}"
    );

    let chat = json!({"model": "gpt-4o-mini", "user": "alice",
                      "messages": [{"role": "user", "content": "hi"}]});
    // Twenty on the first instance, then time for its syncs to carry them to Redis.
    let (first, _) = burst(&procs[..1], "/v1/chat/completions", vec![chat.clone(); 20]).await;
    assert!(first.iter().all(|s| *s == 200), "{first:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Every instance starts the burst knowing of those twenty (a new key is read from
    // Redis first), so each admits at most the forty left on its own view.
    let (statuses, elapsed) = burst(&procs, "/v1/chat/completions", vec![chat.clone(); 300]).await;
    let ok = accepted(&statuses);
    let extra = allowed_extra(elapsed, 60);
    assert!(
        (40..=3 * 40 + 3 * extra).contains(&ok),
        "accepted {ok} of 300 after 20, 3 synced instances, 60/min (burst took {elapsed:?})"
    );
    eprintln!("synced: accepted {ok} of 300 (exact: 40) in {elapsed:?}");

    // Synced again: every instance sees the bucket spent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (after, _) = burst(&procs, "/v1/chat/completions", vec![chat; 30]).await;
    let late = accepted(&after);
    assert!(
        late <= 1,
        "{late} of 30 accepted once every instance had synced: {after:?}"
    );
}

async fn get_text(client: &reqwest::Client, url: String) -> (u16, String) {
    let r = client.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_open_and_recovers_exact_limits() {
    let proxy = OutageProxy::start(redis_addr()).await.unwrap();
    let prefix = unique_prefix();
    let config = format!(
        r#"
        [redis]
        url = "redis://{proxy}"
        prefix = "{prefix}"
        on_failure = "open"
        timeout = "200ms"
        [limits]
        default_tier = "free"
        [[tiers]]
        name = "free"
        per_user = {{ requests_per_minute = 5 }}
        {SIM}"#,
        proxy = proxy.addr()
    );
    let procs = gateways(1, &config);
    let base = format!("http://{}", procs[0].addr);
    let client = client();
    let ask = |user: &str| json!({"model": "gpt-4o-mini", "user": user, "messages": [{"role": "user", "content": "hi"}]});
    let send = |user: &'static str| {
        let (client, url, body) = (
            client.clone(),
            format!("{base}/v1/chat/completions"),
            ask(user),
        );
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    // Only 200 and 429 are expected here; anything else fails with the answer and the
    // gateway's log, which say why.
    let st = |(status, body): (u16, String)| {
        if status != 200 && status != 429 {
            let log: Vec<String> = procs[0].log.try_iter().collect();
            panic!(
                "unexpected {status}: {body}\ngateway log:\n{}",
                log.join("\n")
            );
        }
        status
    };
    let send = |user: &'static str| {
        let send = send(user);
        async move { st(send.await) }
    };
    // Use up carol's five on Redis.
    for _ in 0..5 {
        assert_eq!(send("carol").await, 200);
    }
    assert_eq!(send("carol").await, 429);
    let (status, ready) = get_text(&client, format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("\"ready\""), "{ready}");

    proxy.cut().await;
    // Still answering, on this instance's own limits (fresh buckets: carol gets 5 here).
    let mut during = Vec::new();
    for _ in 0..6 {
        during.push(send("carol").await);
    }
    assert_eq!(
        during,
        [200, 200, 200, 200, 200, 429],
        "local limits while Redis is away"
    );
    // Frank uses up his five locally, which Redis never hears of.
    let mut frank = Vec::new();
    for _ in 0..6 {
        frank.push(send("frank").await);
    }
    assert_eq!(frank, [200, 200, 200, 200, 200, 429]);
    let (status, ready) = get_text(&client, format!("{base}/readyz")).await;
    assert_eq!(
        status, 200,
        "fail_open keeps the instance in rotation: {ready}"
    );
    assert!(
        ready.contains("degraded") && ready.contains("unreachable"),
        "{ready}"
    );
    let (_, metrics) = get_text(&client, format!("{base}/metrics")).await;
    assert!(
        metrics.contains("sluice_limits_store_up{backend=\"redis\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_limits_local_fallbacks_total"),
        "{metrics}"
    );

    proxy.restore().await.unwrap();
    // Recovery is automatic: the probe finds Redis within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, ready) = get_text(&client, format!("{base}/readyz")).await;
        if ready.contains("\"ready\"") {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back on Redis: it still remembers carol's five (refused), and knows nothing of
    // frank's local ones (his next request passes): the shared counts rule again.
    assert_eq!(send("carol").await, 429, "shared limits are back");
    assert_eq!(
        send("frank").await,
        200,
        "local counts are not used any more"
    );
    let (_, metrics) = get_text(&client, format!("{base}/metrics")).await;
    assert!(
        metrics.contains("sluice_limits_store_up{backend=\"redis\"} 1"),
        "{metrics}"
    );
    // And a fresh user gets exactly five, counted in Redis.
    let mut fresh = Vec::new();
    for _ in 0..6 {
        fresh.push(send("dave").await);
    }
    assert_eq!(fresh, [200, 200, 200, 200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_while_redis_is_away() {
    let proxy = OutageProxy::start(redis_addr()).await.unwrap();
    let config = format!(
        r#"
        [redis]
        url = "redis://{proxy}"
        prefix = "{prefix}"
        on_failure = "closed"
        timeout = "200ms"
        [limits]
        default_tier = "free"
        [[tiers]]
        name = "free"
        per_user = {{ requests_per_minute = 100 }}
        {SIM}"#,
        proxy = proxy.addr(),
        prefix = unique_prefix()
    );
    let procs = gateways(1, &config);
    let base = format!("http://{}", procs[0].addr);
    let client = client();
    let body = json!({"model": "gpt-4o-mini", "user": "erin", "messages": [{"role": "user", "content": "hi"}]});
    let post = || {
        client
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 200);
    proxy.cut().await;
    let r = post().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limiter_unavailable");
    let (status, ready) = get_text(&client, format!("{base}/readyz")).await;
    assert_eq!(status, 503, "{ready}");
    proxy.restore().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while post().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_budget_and_a_restart_keeps_the_spend() {
    redis_addr();
    // Embeddings of 100-token arrays at $1 per 1M input tokens: exactly $0.0001 a
    // request, so a $0.001 budget holds exactly ten.
    let config = format!(
        r#"
        [redis]
        url = "{url}"
        prefix = "{prefix}"
        timeout = "2s"
        [[budgets.rules]]
        name = "daily"
        scope = "global"
        period = "day"
        limit_usd = 0.001
        on_exceeded = "block"
        [[providers]]
        name = "sim"
        kind = "sim"
        [[models]]
        name = "priced-embeddings"
        provider = "sim"
        upstream = "text-embedding-3-small"
        kind = "embeddings"
        prices = {{ input = 1.0 }}
        "#,
        url = redis_url(),
        prefix = unique_prefix()
    );
    let mut procs = gateways(2, &config);
    let client = client();
    let tokens: Vec<u32> = (1..=100).collect();
    let body = json!({"model": "priced-embeddings", "input": [tokens]});
    let send = |addr: String| {
        let (client, body) = (client.clone(), body.clone());
        async move {
            let r = client
                .post(format!("http://{addr}/v1/embeddings"))
                .header("x-sluice-cache", "no-store")
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    let mut accepted = 0;
    let refusal = loop {
        let addr = procs[accepted % 2].addr.clone();
        let (status, text) = send(addr).await;
        if status != 200 {
            break (status, text);
        }
        accepted += 1;
        assert!(accepted <= 20, "the budget never blocked");
        // Spend is charged when each request's record is finished, just after it.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refusal.0, 429, "{}", refusal.1);
    assert!(refusal.1.contains("budget_exceeded"), "{}", refusal.1);
    assert_eq!(
        accepted, 10,
        "ten $0.0001 requests fit a $0.001 budget across both instances"
    );
    for p in &procs {
        assert_eq!(
            send(p.addr.clone()).await.0,
            429,
            "both instances see the shared spend"
        );
    }
    // Restart one instance: the spend is still there.
    procs.remove(0);
    let restarted = gateways(1, &config);
    assert_eq!(send(restarted[0].addr.clone()).await.0, 429);
}
