//! What a request costs in Redis round trips, through the whole gateway, with limits,
//! budgets and the cache all on Redis: the limit check, the budget read and the cache
//! lookup share one connection and go out together, so a request reaches its upstream
//! after one round trip, not three.
//!
//! Redis comes from `SLUICE_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`), reached
//! through a proxy that counts round trips; the test fails with a clear message when
//! Redis is not reachable.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use sluice_sim::outage::OutageProxy;
use tower::ServiceExt;

/// An OpenAI-compatible upstream (chat and embeddings) that notes the proxy's
/// round-trip count as each call arrives.
async fn upstream(proxy: Arc<OutageProxy>, seen: Arc<Mutex<Vec<u64>>>) -> SocketAddr {
    let note = move || {
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(proxy.round_trips());
    };
    let on_embeddings = note.clone();
    let app = axum::Router::new()
        .route(
            "/v1/embeddings",
            axum::routing::post(move |Json(body): Json<Value>| {
                on_embeddings();
                async move {
                    Json(json!({
                        "object": "list",
                        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
                        "model": body["model"],
                        "usage": {"prompt_tokens": 4, "total_tokens": 4}
                    }))
                }
            }),
        )
        .route(
        "/v1/chat/completions",
        axum::routing::post(move |Json(body): Json<Value>| {
            note();
            async move {
                Json(json!({
                    "id": "chatcmpl-rt",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "Locks and weirs."}}],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
                }))
            }
        }),
    );
    support::serve(app).await
}

async fn ask(h: &support::Harness, question: &str, cache: &str) -> StatusCode {
    let body = json!({"model": "gpt-4o-mini", "user": "alice",
                      "messages": [{"role": "user", "content": question}]});
    send(h, "/v1/chat/completions", body, cache).await
}

async fn send(h: &support::Harness, path: &str, body: Value, cache: &str) -> StatusCode {
    let response = h
        .app
        .clone()
        .oneshot(
            Request::post(path)
                .header("content-type", "application/json")
                .header("x-sluice-cache", cache)
                .body(Body::from(body.to_string()))
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    response.status()
}

/// The round-trip count the upstream saw at its latest call.
fn last_call(seen: &Mutex<Vec<u64>>) -> u64 {
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .last()
        .copied()
        .unwrap_or_else(|| panic!("the upstream was never called"))
}

/// Wait until the work a request leaves behind (its settlement, budget charge and cache
/// store) is done: no round trip for 200 ms.
async fn quiet(proxy: &OutageProxy) -> u64 {
    let mut last = proxy.round_trips();
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let now = proxy.round_trips();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("Redis never went quiet")
}

#[tokio::test]
async fn limits_budgets_and_the_cache_cost_one_round_trip_before_the_upstream_call() {
    support::redis_raw().await;
    let redis: SocketAddr = support::redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("SLUICE_TEST_REDIS_URL as host:port: {e}"));
    let proxy = OutageProxy::start(redis)
        .await
        .unwrap_or_else(|e| panic!("proxy: {e}"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let upstream = upstream(proxy.clone(), seen.clone()).await;
    let h = support::harness(&format!(
        r#"
        [[providers]]
        name = "up"
        kind = "openai"
        base_url = "http://{upstream}/v1"

        [[models]]
        name = "gpt-4o-mini"
        provider = "up"
        prices = {{ input = 0.15, output = 0.60 }}

        [[models]]
        name = "text-embedding-3-small"
        provider = "up"
        prices = {{ input = 0.02 }}

        [redis]
        url = "redis://{proxy}"
        prefix = "{prefix}"

        [limits]
        default_tier = "t"

        [[tiers]]
        name = "t"
        per_user = {{ requests_per_minute = 1000, tokens_per_minute = 1000000, concurrent = 10 }}
        total = {{ requests_per_minute = 100000 }}

        [[budgets.rules]]
        name = "all"
        scope = "global"
        period = "day"
        limit_usd = 1000.0

        [[budgets.rules]]
        name = "each-user"
        scope = "user"
        period = "day"
        limit_usd = 10.0

        [cache]
        enabled = true
        only_deterministic = false
        "#,
        proxy = proxy.addr(),
        prefix = support::unique_redis_prefix(),
    ))
    .await;

    // The first request loads the scripts and starts the budget counters from the log:
    // round trips of their own, once.
    assert_eq!(
        ask(&h, "What is a lock keeper?", "store").await,
        StatusCode::OK
    );
    quiet(&proxy).await;

    let before = proxy.round_trips();
    assert_eq!(ask(&h, "What is a weir?", "store").await, StatusCode::OK);
    let at_upstream = last_call(&seen);
    assert_eq!(
        at_upstream - before,
        1,
        "round trips between the request and its upstream call: the limit check, budget \
         read and cache lookup go out together"
    );

    // After the answer: the settlement (token refund, slot release) and the budget
    // charge go out together. A request that stores nothing: two round trips in all.
    let before = quiet(&proxy).await;
    assert_eq!(
        ask(&h, "What is a pound lock?", "no-store").await,
        StatusCode::OK
    );
    assert_eq!(
        quiet(&proxy).await - before,
        2,
        "one round trip before the upstream call, one after the answer"
    );

    // Embeddings: their per-item cache lookup goes out with the checks too.
    let before = quiet(&proxy).await;
    let embed = json!({"model": "text-embedding-3-small", "user": "alice",
                       "input": "a flight of locks"});
    assert_eq!(
        send(&h, "/v1/embeddings", embed, "store").await,
        StatusCode::OK
    );
    let at_upstream = last_call(&seen);
    assert_eq!(
        at_upstream - before,
        1,
        "round trips before an embeddings request's upstream call"
    );

    // `/metrics` counts each kind of combined call and the jobs it carried: eight
    // requests at once (the user may have ten in flight) are eight jobs of each kind,
    // in as many calls or fewer.
    quiet(&proxy).await;
    let kinds = [
        "limit_check",
        "limit_settle",
        "budget_read",
        "budget_charge",
        "cache_read",
    ];
    let before = redis_calls(&h, &kinds).await;
    let questions: Vec<String> = (0..8).map(|i| format!("Lock number {i}?")).collect();
    let asks = questions.iter().map(|q| ask(&h, q, "store"));
    for status in futures::future::join_all(asks).await {
        assert_eq!(status, StatusCode::OK);
    }
    quiet(&proxy).await;
    let after = redis_calls(&h, &kinds).await;
    for (kind, ((calls_before, jobs_before), (calls, jobs))) in
        kinds.iter().zip(before.into_iter().zip(after))
    {
        assert_eq!(jobs - jobs_before, 8, "{kind}: jobs of eight requests");
        let made = calls - calls_before;
        assert!((1..=8).contains(&made), "{kind}: {made} calls for 8 jobs");
    }
}

/// Each kind's `sluice_redis_calls_total` and `sluice_redis_call_jobs_total`.
async fn redis_calls(h: &support::Harness, kinds: &[&str]) -> Vec<(u64, u64)> {
    let response = h
        .app
        .clone()
        .oneshot(
            Request::get("/metrics")
                .body(Body::empty())
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&bytes);
    let value = |name: &str, kind: &str| -> u64 {
        let series = format!("{name}{{call=\"{kind}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{series}: {e}"))
    };
    kinds
        .iter()
        .map(|kind| {
            (
                value("sluice_redis_calls_total", kind),
                value("sluice_redis_call_jobs_total", kind),
            )
        })
        .collect()
}
