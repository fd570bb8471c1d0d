//! The response cache through the whole pipeline: deterministic requests are served
//! from the cache the second time (JSON or replayed SSE, cost 0 and savings recorded),
//! the request header steers it, cut streams are never stored, and two instances share
//! hits through the real Redis.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

mod support;

use support::{Harness, Reply, harness};

const SIM: &str = r#"
[[providers]]
name = "sim"
kind = "sim"
[[providers]]
name = "cutting"
kind = "sim"
chaos = { cut_after = 2 }
[[models]]
name = "gpt-4o-mini"
provider = "sim"
[[models]]
name = "cut-model"
provider = "cutting"
upstream = "gpt-4o-mini"
"#;

async fn post(h: &mut Harness, body: Value, headers: &[(&str, &str)]) -> Reply {
    h.send("/v1/chat/completions", body, headers).await
}

fn cache_header(r: &Reply) -> Option<&str> {
    r.headers.get("x-sluice-cache").map(|v| v.to_str().unwrap())
}

fn text_of(r: &Reply) -> String {
    if r.text.starts_with("data:") {
        r.text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    } else {
        r.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

fn ask(content: &str) -> Value {
    json!({"model": "gpt-4o-mini", "temperature": 0,
           "messages": [{"role": "user", "content": content}]})
}

/// Wait until a stored answer is visible (stores happen off the request path).
async fn until_hit(h: &mut Harness, body: Value) -> Reply {
    for _ in 0..100 {
        let r = post(h, body.clone(), &[]).await;
        if cache_header(&r) == Some("hit") {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("never a cache hit");
}

#[tokio::test]
async fn a_deterministic_request_is_answered_from_the_cache_at_no_cost() {
    let mut h = harness(SIM).await;
    let first = post(&mut h, ask("What is a lock on a canal?"), &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(cache_header(&first), Some("miss"));
    assert_eq!(first.record.cache_status.as_deref(), Some("miss"));
    assert_eq!(first.record.upstream_calls, 1);
    let hit = until_hit(&mut h, ask("What is a lock on a canal?")).await;
    assert_eq!(text_of(&hit), text_of(&first));
    assert_eq!(hit.record.cache_status.as_deref(), Some("hit"));
    assert_eq!(hit.record.upstream_calls, 0);
    assert_eq!(hit.record.cost_nanos, Some(0));
    assert_eq!(hit.record.cost_saved_nanos, first.record.cost_nanos);
    assert!(first.record.cost_nanos.unwrap() > 0);
    assert_eq!(
        (hit.record.prompt_tokens, hit.record.completion_tokens),
        (first.record.prompt_tokens, first.record.completion_tokens)
    );
    assert_eq!(hit.headers["x-sluice-model"], "gpt-4o-mini");
    assert!(
        hit.body["id"]
            .as_str()
            .unwrap()
            .contains(&hit.record.request_id),
        "a fresh id"
    );
    // A different question is a different key.
    let other = post(&mut h, ask("What is a towpath?"), &[]).await;
    assert_eq!(cache_header(&other), Some("miss"));
}

#[tokio::test]
async fn the_request_header_steers_the_cache() {
    let mut h = harness(SIM).await;
    // Not deterministic: not cached unless the request opts in.
    let free = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&mut h, free.clone(), &[]).await;
    assert_eq!(cache_header(&r), None);
    assert_eq!(r.record.cache_status, None);
    let r = post(&mut h, free.clone(), &[("x-sluice-cache", "store")]).await;
    assert_eq!(cache_header(&r), Some("miss"));
    let mut hit = None;
    for _ in 0..100 {
        let r = post(&mut h, free.clone(), &[("x-sluice-cache", "store")]).await;
        if cache_header(&r) == Some("hit") {
            hit = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(hit.is_some(), "an opted-in request is cached");
    // no-store: neither read nor written.
    let body = ask("no-store question");
    let r = post(&mut h, body.clone(), &[("x-sluice-cache", "no-store")]).await;
    assert_eq!((cache_header(&r), r.record.upstream_calls), (None, 1));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let r = post(&mut h, body.clone(), &[]).await;
    assert_eq!(cache_header(&r), Some("miss"), "no-store stored nothing");
    // refresh: skips the lookup, asks upstream, stores the new answer.
    until_hit(&mut h, body.clone()).await;
    let r = post(&mut h, body.clone(), &[("x-sluice-cache", "refresh")]).await;
    assert_eq!(
        (cache_header(&r), r.record.upstream_calls),
        (Some("miss"), 1)
    );
}

#[tokio::test]
async fn streams_are_stored_whole_and_replayed_but_never_when_cut() {
    let mut h = harness(SIM).await;
    let mut stream = ask("Tell me about canals.");
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let first = post(&mut h, stream.clone(), &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(cache_header(&first), Some("miss"));
    // The same question, not streamed, is served from the stored stream...
    let whole = until_hit(&mut h, ask("Tell me about canals.")).await;
    assert_eq!(text_of(&whole), text_of(&first));
    // ...and streamed again, replayed as SSE with the usage the client asked for.
    let replay = post(&mut h, stream.clone(), &[]).await;
    assert_eq!(cache_header(&replay), Some("hit"));
    assert!(replay.text.ends_with("data: [DONE]\n\n"));
    assert!(replay.text.contains("\"usage\""));
    assert_eq!(text_of(&replay), text_of(&first));
    assert_eq!(replay.record.upstream_calls, 0);

    // A stream cut mid-way is never stored: the next identical request goes upstream.
    let mut cut = json!({"model": "cut-model", "temperature": 0, "stream": true,
                         "messages": [{"role": "user", "content": "Tell me about locks."}]});
    let r = post(&mut h, cut.clone(), &[]).await;
    assert!(r.text.contains("stream_interrupted"), "{}", r.text);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    cut["stream"] = json!(false);
    let again = post(&mut h, cut, &[]).await;
    assert_ne!(cache_header(&again), Some("hit"));
    assert!(again.record.upstream_calls >= 1);
}

#[tokio::test]
async fn two_instances_share_hits_through_redis() {
    support::redis_raw().await;
    let config = format!(
        "[redis]\nurl = \"{}\"\nprefix = \"{}\"\n{SIM}",
        support::redis_url(),
        support::unique_redis_prefix()
    );
    let mut a = harness(&config).await;
    let mut b = harness(&config).await;
    let body = ask("Which canal is the longest in England?");
    let first = post(&mut a, body.clone(), &[]).await;
    assert_eq!(cache_header(&first), Some("miss"));
    // b has never seen it: its memory tier is empty, Redis has it.
    let hit = until_hit(&mut b, body).await;
    assert_eq!(text_of(&hit), text_of(&first));
    assert_eq!(hit.record.upstream_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_identical_misses_make_one_upstream_call() {
    // The simulator over HTTP counts the calls it answers.
    let mock = sluice_sim::MockServer::start(
        "127.0.0.1:0".parse().unwrap(),
        sluice_sim::ChaosConfig {
            latency: std::time::Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut h = harness(&format!(
        r#"
        [[providers]]
        name = "slow"
        kind = "openai"
        base_url = "{}"
        [[models]]
        name = "slow-model"
        provider = "slow"
        upstream = "gpt-4o-mini"
        "#,
        mock.url()
    ))
    .await;
    let body = json!({"model": "slow-model", "temperature": 0,
                      "messages": [{"role": "user", "content": "one question, asked a hundred times"}]});
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (app, body) = (h.app.clone(), body.to_string());
            tokio::spawn(async move {
                let r = app
                    .oneshot(
                        Request::post("/v1/chat/completions")
                            .header("content-type", "application/json")
                            .body(Body::from(body))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                let status = r.status();
                let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
                    .await
                    .unwrap();
                let v: Value = serde_json::from_slice(&bytes).unwrap();
                (
                    status,
                    v["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            })
        })
        .collect();
    let mut texts = std::collections::HashSet::new();
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        texts.insert(text);
    }
    assert_eq!(texts.len(), 1, "everyone got the same answer");
    let mut calls = 0;
    let mut statuses = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..100 {
        let r = h.records.recv().await.unwrap();
        calls += r.upstream_calls;
        *statuses
            .entry(r.cache_status.clone().unwrap_or_default())
            .or_default() += 1;
        if r.cache_status.as_deref() != Some("miss") {
            assert_eq!(r.cost_nanos, Some(0));
            assert!(r.cost_saved_nanos.unwrap() > 0);
        }
    }
    assert_eq!(
        calls, 1,
        "one upstream call for 100 identical requests: {statuses:?}"
    );
    assert_eq!(statuses.get("miss"), Some(&1), "{statuses:?}");
    assert_eq!(mock.calls(), 1, "the simulator answered once");
}

#[tokio::test]
async fn embeddings_are_cached_per_item_and_only_misses_go_upstream() {
    let mut h = harness(
        r#"
        [[providers]]
        name = "sim"
        kind = "sim"
        [[models]]
        name = "text-embedding-3-small"
        provider = "sim"
        kind = "embeddings"
        "#,
    )
    .await;
    let item = |i: u32| (i * 100..i * 100 + 10).collect::<Vec<u32>>();
    let ten: Vec<Vec<u32>> = (0..10).map(item).collect();
    let embed = |input: &[Vec<u32>], cache: Option<&str>| {
        let mut req = Request::post("/v1/embeddings").header("content-type", "application/json");
        if let Some(c) = cache {
            req = req.header("x-sluice-cache", c);
        }
        req.body(Body::from(
            json!({"model": "text-embedding-3-small", "input": input}).to_string(),
        ))
        .unwrap()
    };
    // The uncached answer for all ten, for comparison.
    let r = h
        .app
        .clone()
        .oneshot(embed(&ten, Some("no-store")))
        .await
        .unwrap();
    let uncached: Value = serde_json::from_slice(
        &axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .unwrap();
    let record = h.records.recv().await.unwrap();
    assert_eq!(record.prompt_tokens, 100);
    // Seven of them, cached.
    let seven: Vec<Vec<u32>> = [0, 1, 2, 4, 5, 7, 9].iter().map(|&i| item(i)).collect();
    let r = h.app.clone().oneshot(embed(&seven, None)).await.unwrap();
    assert_eq!(r.headers()["x-sluice-cache"], "miss");
    h.records.recv().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // All ten: exactly three go upstream, and the answer equals the uncached one.
    let r = h.app.clone().oneshot(embed(&ten, None)).await.unwrap();
    assert_eq!(r.headers()["x-sluice-cache"], "partial");
    let merged: Value = serde_json::from_slice(
        &axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .unwrap();
    let record = h.records.recv().await.unwrap();
    assert_eq!(
        record.prompt_tokens, 30,
        "only the three misses were sent and counted"
    );
    assert_eq!(merged["usage"]["prompt_tokens"], 30);
    assert_eq!(
        merged["data"], uncached["data"],
        "same vectors, same order, same indexes"
    );
    // Now all ten are cached: no upstream call at all.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let r = h.app.clone().oneshot(embed(&ten, None)).await.unwrap();
    assert_eq!(r.headers()["x-sluice-cache"], "hit");
    let all: Value = serde_json::from_slice(
        &axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(all["data"], uncached["data"]);
    let record = h.records.recv().await.unwrap();
    assert_eq!((record.upstream_calls, record.prompt_tokens), (0, 0));
    assert_eq!(record.cost_nanos, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_embedding_requests_go_upstream_as_one_call() {
    let mock = sluice_sim::MockServer::start("127.0.0.1:0".parse().unwrap(), Default::default())
        .await
        .unwrap();
    let h = harness(&format!(
        r#"
        [cache]
        coalesce_window = "50ms"
        [[providers]]
        name = "mock"
        kind = "openai"
        base_url = "{}"
        [[models]]
        name = "text-embedding-3-small"
        provider = "mock"
        kind = "embeddings"
        "#,
        mock.url()
    ))
    .await;
    let tasks: Vec<_> = (0..50u32)
        .map(|i| {
            let app = h.app.clone();
            tokio::spawn(async move {
                let input: Vec<Vec<u32>> = vec![vec![i + 1; 4]];
                let r = app
                    .oneshot(
                        Request::post("/v1/embeddings")
                            .header("content-type", "application/json")
                            .body(Body::from(
                                json!({"model": "text-embedding-3-small", "input": input})
                                    .to_string(),
                            ))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                let v: Value = serde_json::from_slice(
                    &axum::body::to_bytes(r.into_body(), usize::MAX)
                        .await
                        .unwrap(),
                )
                .unwrap();
                (i, v)
            })
        })
        .collect();
    for t in tasks {
        let (i, v) = t.await.unwrap();
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 1, "each caller gets its own item back");
        assert_eq!(data[0]["index"], 0);
        // Each caller's share of the usage: its own 4 tokens.
        assert_eq!(v["usage"]["prompt_tokens"], 4, "caller {i}: {v}");
        // The same vector the simulator gives that item alone.
        let alone = sluice_sim::reply::embedding_of_tokens(&[i + 1; 4], 1536);
        let got: Vec<f32> = data[0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got, alone, "caller {i} got its own vector");
    }
    let calls = mock.calls();
    assert!(
        (1..=5).contains(&calls),
        "50 concurrent requests, {calls} upstream calls"
    );
}

/// The lookup goes to the cache with the limit and budget checks (one round trip on
/// Redis); it is made for the model as routed, so a budget that names a cheaper model
/// must look again, for that model.
#[tokio::test]
async fn a_budget_downgrade_is_looked_up_for_the_model_that_answers() {
    let mut h = harness(&format!(
        r#"
        [[models]]
        name = "gpt-4o"
        provider = "sim"
        [[budgets.rules]]
        name = "strong-model"
        scope = "feature"
        period = "month"
        limit_usd = 0.000001
        on_exceeded = "downgrade"
        downgrade_to = "gpt-4o-mini"
        {SIM}"#
    ))
    .await;
    let question = |model: &str| {
        json!({"model": model, "temperature": 0, "sluice": {"feature": "summaries"},
               "messages": [{"role": "user", "content": "How deep is a canal?"}]})
    };
    // The cheaper model's answer is cached, and its cost spends the feature's budget.
    let first = post(&mut h, question("gpt-4o-mini"), &[]).await;
    assert_eq!(cache_header(&first), Some("miss"));
    let cached = until_hit(&mut h, question("gpt-4o-mini")).await;
    let downgraded = loop {
        let r = post(&mut h, question("gpt-4o"), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        if r.headers["x-sluice-model"] == "gpt-4o-mini" {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        cache_header(&downgraded),
        Some("hit"),
        "{:?}",
        downgraded.record
    );
    assert_eq!(downgraded.record.upstream_calls, 0);
    assert_eq!(text_of(&downgraded), text_of(&cached));
    assert_eq!(
        downgraded.record.limited_by.as_deref(),
        Some("budget:strong-model")
    );
}

/// A request refused by its limits counts no cache lookup, though the lookup was sent
/// with the limit check.
#[tokio::test]
async fn a_refused_request_counts_no_cache_lookup() {
    let mut h = harness(&format!(
        r#"
        [limits]
        default_tier = "t"
        [[tiers]]
        name = "t"
        per_user = {{ requests_per_minute = 1 }}
        {SIM}"#
    ))
    .await;
    let mut body = ask("Who built the Bridgewater Canal?");
    body["user"] = json!("u1");
    let first = post(&mut h, body.clone(), &[]).await;
    assert_eq!(cache_header(&first), Some("miss"));
    // Stored off the request path: wait until it is, so a lookup would hit.
    for _ in 0..100 {
        if h.gateway.cache.stats().stores == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(h.gateway.cache.stats().stores, 1);
    let refused = post(&mut h, body, &[]).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text
    );
    assert_eq!(cache_header(&refused), None);
    let stats = h.gateway.cache.stats();
    assert_eq!((stats.misses, stats.memory_hits), (1, 0), "{stats:?}");
}

/// An upstream that answers every chat request with the same bytes.
async fn fixed_upstream(body: &'static str) -> String {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
        }),
    );
    format!("http://{}/v1", support::serve(app).await)
}

#[tokio::test]
async fn an_answer_reaches_the_client_byte_for_byte_and_a_hit_under_its_own_id() {
    // Laid out as the OpenAI API lays it out: indented, its own field order, fields the
    // gateway has no struct field for.
    const UPSTREAM: &str = r#"{
  "id": "chatcmpl-upstream-1",
  "object": "chat.completion",
  "created": 1741569952,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "Hello! How can I assist you today?",
        "refusal": null,
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29
  },
  "service_tier": "default"
}
"#;
    let url = fixed_upstream(UPSTREAM).await;
    let mut h = harness(&format!(
        r#"
        [[providers]]
        name = "fixed"
        kind = "openai"
        base_url = "{url}"
        [[models]]
        name = "fixed-model"
        provider = "fixed"
        upstream = "gpt-4o"
        "#
    ))
    .await;
    let body = json!({"model": "fixed-model", "temperature": 0,
                      "messages": [{"role": "user", "content": "hello"}]});
    let first = h.send("/v1/chat/completions", body.clone(), &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.text, UPSTREAM, "passed on as it came");
    assert_eq!(cache_header(&first), Some("miss"));
    assert_eq!(first.record.prompt_tokens, 19);

    // The cache keeps the parsed answer: a hit is the same answer under its own id.
    let hit = h.send("/v1/chat/completions", body, &[]).await;
    assert_eq!(cache_header(&hit), Some("hit"));
    assert_eq!(
        hit.body["id"],
        format!("chatcmpl-{}", hit.record.request_id)
    );
    assert_eq!(hit.body["choices"], first.body["choices"]);
    assert_eq!(hit.body["usage"], first.body["usage"]);
    assert_eq!(hit.body["service_tier"], "default");
}
