//! Micro-benchmarks of the per-request hot functions: request parse + input guard on a
//! typical 1 KB chat request, and the pieces around it.
//! Run: `cargo bench -p sluice-gateway --bench hot_paths`.

use std::hint::black_box;

use sluice_gateway::config::{Config, ConfigSource};
use sluice_gateway::guard::input::{check_chat, precheck};
use sluice_gateway::limits::capacity::{Capacity, CapacityConfig};
use sluice_gateway::limits::{Limiter, Subject};
use sluice_gateway::pipeline::parse_body;
use sluice_gateway::quality::input_hash;
use sluice_gateway::wire::{ChatRequest, StreamChunk};
use tokio_util::sync::CancellationToken;

fn main() {
    divan::main();
}

/// About 1 KB: a system prompt, a short history, and a user question.
/// A single-threaded runtime with I/O and time, for the benches that await.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn typical_body() -> Vec<u8> {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "temperature": 0.7,
        "max_tokens": 400,
        "user": "user-1234",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant for an online bookshop. Answer briefly, cite the catalogue when you can, and never invent prices or delivery dates."},
            {"role": "user", "content": "Hi! I'm looking for a present for my father, who likes history and long walks."},
            {"role": "assistant", "content": "How about a narrative history of the great canals, or a guide to walking the old towpaths? Both are in stock."},
            {"role": "user", "content": "The canal book sounds great. Is there a hardback edition, and could it arrive before Saturday if I order today? He lives in the north of England, near Leeds, and I would like it gift-wrapped with a short note saying happy birthday from all of us."}
        ]
    })
    .to_string()
    .into_bytes()
}

fn config() -> Config {
    Config::from_toml(
        "",
        &[("UNUSED", "")],
        ConfigSource::Embedded { simulated: true },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[divan::bench]
fn parse_and_guard_1kb(bencher: divan::Bencher) {
    let body = typical_body();
    let config = config();
    let policy = config.guard.input.clone();
    let detector = config.guard.detector.clone();
    bencher.bench_local(|| {
        precheck(black_box(&body), policy.max_depth).ok();
        let mut req: ChatRequest = parse_body(black_box(&body)).unwrap_or_else(|e| panic!("{e}"));
        black_box(check_chat(&mut req, &policy, &detector, "gpt-4o-mini").ok())
    });
}

#[divan::bench]
fn guard_only_1kb(bencher: divan::Bencher) {
    let body = typical_body();
    let config = config();
    let policy = config.guard.input.clone();
    let detector = config.guard.detector.clone();
    let req: ChatRequest = parse_body(&body).unwrap_or_else(|e| panic!("{e}"));
    bencher
        .with_inputs(|| req.clone())
        .bench_local_values(|mut req| {
            black_box(check_chat(&mut req, &policy, &detector, "gpt-4o-mini").ok())
        });
}

#[divan::bench]
fn parse_only_1kb(bencher: divan::Bencher) {
    let body = typical_body();
    bencher.bench_local(|| black_box(parse_body::<ChatRequest>(black_box(&body)).ok()));
}

#[divan::bench]
fn input_hash_1kb(bencher: divan::Bencher) {
    let req: ChatRequest = parse_body(&typical_body()).unwrap_or_else(|e| panic!("{e}"));
    bencher.bench_local(|| black_box(input_hash(&req.messages)));
}

#[divan::bench]
fn stream_chunk_peek(bencher: divan::Bencher) {
    let data = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" canal"},"finish_reason":null}]}"#;
    bencher.bench_local(|| black_box(StreamChunk::peek(black_box(data.to_string())).ok()));
}

/// Provider capacity with room to spare: the path every request takes when the upstream
/// is not saturated (one lock, two bucket checks). The rates are high enough that the
/// buckets never run dry during the run.
#[divan::bench]
fn capacity_admit_uncontended(bencher: divan::Bencher) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let _enter = runtime.enter();
    let capacity = Capacity::new(CapacityConfig {
        requests_per_minute: Some(u32::MAX),
        tokens_per_minute: Some(u32::MAX),
        ..CapacityConfig::default()
    });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
    bencher.bench_local(|| {
        let admit = capacity.admit(black_box(1), black_box(1), deadline);
        black_box(futures::FutureExt::now_or_never(admit))
    });
}

/// The limits one typical request is checked against: per key and per end user,
/// requests and tokens per minute and tokens per day, plus the tier's total.
fn limited_config(redis: Option<&str>) -> Config {
    let redis = redis
        .map(|url| {
            format!(
                "[redis]\nurl = \"{url}\"\nprefix = \"sluice_bench_{}:\"\n",
                std::process::id()
            )
        })
        .unwrap_or_default();
    Config::from_toml(
        &format!(
            r#"
            {redis}
            [limits]
            default_tier = "t"
            [[tiers]]
            name = "t"
            per_key = {{ requests_per_minute = 1000000000, tokens_per_minute = 1000000000000 }}
            per_user = {{ requests_per_minute = 1000000000, tokens_per_minute = 1000000000000, tokens_per_day = 1000000000000 }}
            total = {{ requests_per_minute = 1000000000 }}
            "#
        ),
        &[("UNUSED", "")],
        ConfigSource::Embedded { simulated: true },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn bench_limiter(bencher: divan::Bencher, runtime: &tokio::runtime::Runtime, config: &Config) {
    let _enter = runtime.enter();
    let shared = sluice_gateway::limits::shared_backend(&config.limits, &mut Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let limiter = Limiter::new(config.limits.clone(), shared, CancellationToken::new());
    let tier = limiter
        .tier(None, None)
        .unwrap_or_else(|e| panic!("{e}"))
        .cloned();
    let subject = Subject {
        key_id: Some("key_0123456789abcdef"),
        owner: Some("search-team"),
        user: Some("user-1234"),
        tier: tier.as_ref(),
        request_id: "req_0",
        tokens: 650,
    };
    // Warm up (and, with Redis, connect and load the script) before measuring.
    for _ in 0..10 {
        let _ = runtime.block_on(limiter.admit(&subject));
    }
    bencher.bench_local(|| {
        let admission = runtime.block_on(limiter.admit(black_box(&subject)));
        black_box(admission.is_ok())
    });
}

/// The limiter on the in-process store: 6 bucket charges, all or nothing.
#[divan::bench]
fn limiter_admit_memory(bencher: divan::Bencher) {
    let runtime = runtime();
    bench_limiter(bencher, &runtime, &limited_config(None));
}

/// The same check on Redis: one EVALSHA round trip. Needs Redis at
/// `SLUICE_TEST_REDIS_URL` (default redis://127.0.0.1:6379).
#[divan::bench]
fn limiter_admit_redis(bencher: divan::Bencher) {
    let url =
        std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let runtime = runtime();
    bench_limiter(bencher, &runtime, &limited_config(Some(&url)));
}

/// The cache key of a typical 1 KB request: serde_json written straight into xxh3.
#[divan::bench]
fn cache_key_1kb(bencher: divan::Bencher) {
    let req: ChatRequest = parse_body(&typical_body()).unwrap_or_else(|e| panic!("{e}"));
    let scope = sluice_gateway::cache::Scope::Owner(Some("team-a"));
    bencher.bench_local(|| {
        sluice_gateway::cache::chat_key(
            black_box(scope),
            black_box("gpt-4o-mini"),
            None,
            black_box(&req),
        )
    });
}

/// A memory-tier hit: the lookup a cached request makes before it is answered.
#[divan::bench]
fn cache_memory_hit(bencher: divan::Bencher) {
    use sluice_gateway::cache::{CacheKey, CachedAnswer, ResponseCache};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = ResponseCache::memory_only(64 << 20);
    let response: sluice_gateway::wire::ChatResponse = serde_json::from_value(serde_json::json!({
        "id": "chatcmpl-1",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "The canal book comes in hardback; ordered today it arrives on Friday."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 240, "completion_tokens": 18, "total_tokens": 258}
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let key = CacheKey(0xfeed_beef);
    runtime.block_on(cache.put(
        key,
        CachedAnswer {
            response,
            model: "gpt-4o-mini".into(),
            stored_at: 0,
        },
        std::time::Duration::from_secs(3600),
    ));
    bencher.bench_local(|| runtime.block_on(cache.get(black_box(&key))));
}

/// A memory-tier cache hit through the whole gateway, in process (no socket): auth,
/// parse, input guard, limits, budgets, key, lookup, the answer and its record. The
/// issue's target is 50 µs p50 of gateway time.
#[divan::bench]
fn cache_hit_through_the_gateway(bencher: divan::Bencher) {
    use tower::ServiceExt;
    let runtime = runtime();
    let (app, _tasks) = runtime.block_on(async {
        // The zero-config gateway: the simulator answers gpt-4o-mini.
        let config = Config::embedded_default(&[("UNUSED", "")]).unwrap_or_else(|e| panic!("{e}"));
        let config = std::sync::Arc::new(config);
        let store =
            sluice_gateway::store::Store::open(&sluice_gateway::store::StorageTarget::Memory)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        let tasks = tokio_util::task::TaskTracker::new();
        let gw = sluice_gateway::pipeline::Gateway::start(config, store, Vec::new(), tasks.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        (sluice_gateway::server::app(gw), tasks)
    });
    let mut body: serde_json::Value =
        serde_json::from_slice(&typical_body()).unwrap_or_else(|e| panic!("{e}"));
    body["temperature"] = serde_json::json!(0);
    let body = body.to_string();
    let ask = || {
        let request = axum::http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap_or_else(|e| match e {});
            let hit = response.headers().get("x-sluice-cache").cloned();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX).await;
            assert!(status.is_success(), "{status}: {body:?}");
            hit
        }
    };
    // Fill the cache, and wait until the answer is there.
    for _ in 0..200 {
        if runtime.block_on(ask()).is_some_and(|h| h == "hit") {
            break;
        }
        runtime.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(5)).await });
    }
    bencher.bench_local(|| {
        let hit = runtime.block_on(ask());
        assert!(
            hit.as_ref().is_some_and(|h| h == "hit"),
            "not a cache hit: {hit:?}"
        );
    });
}

/// The text of the typical request's messages, joined: what a token count reads.
fn typical_text() -> String {
    let req: ChatRequest = parse_body(&typical_body()).unwrap_or_else(|e| panic!("{e}"));
    req.messages
        .iter()
        .map(|m| m.text())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Exact input tokens (tiktoken o200k) of the 1 KB request, as the input guard counts
/// them for an OpenAI-family model.
#[divan::bench]
fn token_count_tiktoken_1kb(bencher: divan::Bencher) {
    let text = typical_text();
    // The encoder is built on first use; keep that out of the measurement.
    black_box(sluice_gateway::guard::tokens::count("gpt-4o-mini", &text));
    bencher.bench_local(|| {
        sluice_gateway::guard::tokens::count(black_box("gpt-4o-mini"), black_box(&text))
    });
}

/// The estimate (ceil(chars / 4)) used for models without a public tokenizer and for
/// upstreams that report no usage.
#[divan::bench]
fn token_estimate_1kb(bencher: divan::Bencher) {
    let text = typical_text();
    bencher.bench_local(|| sluice_gateway::guard::tokens::estimate(black_box(&text)));
}

/// An upstream OpenAI stream as it comes off the wire: a role chunk, `words` content
/// chunks, a finish chunk, a usage chunk and `[DONE]`, cut into TCP-sized pieces that
/// do not line up with the events.
fn upstream_sse(words: usize) -> Vec<bytes::Bytes> {
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut body = String::new();
    let mut push = |v: serde_json::Value| body.push_str(&format!("data: {v}\n\n"));
    push(chunk(
        serde_json::json!({"role": "assistant", "content": ""}),
        None,
    ));
    for i in 0..words {
        push(chunk(
            serde_json::json!({"content": format!(" word{i}")}),
            None,
        ));
    }
    push(chunk(serde_json::json!({}), Some("stop")));
    push(serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "gpt-4o-mini", "choices": [],
        "usage": {"prompt_tokens": 240, "completion_tokens": words, "total_tokens": 240 + words},
    }));
    body.push_str("data: [DONE]\n\n");
    let bytes = bytes::Bytes::from(body);
    (0..bytes.len())
        .step_by(700)
        .map(|at| bytes.slice(at..(at + 700).min(bytes.len())))
        .collect()
}

/// The upstream half of the stream path, per streamed answer of 20 words (23 events):
/// SSE parsing (sse-stream, as `providers::http::sse_events` does) and
/// `StreamChunk::peek` of every `data:` payload (as `providers::openai::openai_chunks`
/// does). Both gateway functions are `pub(crate)`, so this drives the same crate calls.
#[divan::bench]
fn sse_parse_and_peek_20_chunks(bencher: divan::Bencher) {
    use futures::StreamExt as _;
    let pieces = upstream_sse(20);
    bencher
        .with_inputs(|| pieces.clone())
        .bench_local_values(|pieces| {
            let stream = futures::stream::iter(pieces.into_iter().map(Ok::<_, std::io::Error>));
            let mut events = sse_stream::SseByteStream::new(stream);
            let mut chunks = 0;
            futures::executor::block_on(async {
                while let Some(event) = events.next().await {
                    let Some(data) = event.unwrap_or_else(|e| panic!("{e}")).data else {
                        continue;
                    };
                    if data.trim() == "[DONE]" {
                        break;
                    }
                    if StreamChunk::peek(data).is_ok() {
                        chunks += 1;
                    }
                }
            });
            black_box(chunks)
        });
}

/// What the pipeline's stream task does per chunk on top of the peek when the answer
/// is collected (a cache store or an output rule applies): the chunk parsed again, in
/// full, into a `serde_json::Value` for its delta text (`pipeline.rs`, stream task;
/// private, so the expression is repeated here).
#[divan::bench]
fn stream_chunk_answer_parse(bencher: divan::Bencher) {
    let data = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" canal"},"finish_reason":null}]}"#;
    let mut answer = String::new();
    bencher.bench_local(|| {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(black_box(data))
            && let Some(text) = v["choices"][0]["delta"]["content"].as_str()
        {
            answer.clear();
            answer.push_str(text);
        }
        black_box(answer.len())
    });
}

/// A streamed answer through the whole gateway, in process (no socket): the zero-config
/// gateway and its simulator; the body read to `[DONE]`. Per answer, so divide by its
/// chunks (12 to 40 words, about 30) for a per-chunk figure.
#[divan::bench]
fn stream_through_the_gateway(bencher: divan::Bencher) {
    use tower::ServiceExt;
    let runtime = runtime();
    let (app, _tasks) = runtime.block_on(async {
        let config = Config::embedded_default(&[("UNUSED", "")]).unwrap_or_else(|e| panic!("{e}"));
        let store =
            sluice_gateway::store::Store::open(&sluice_gateway::store::StorageTarget::Memory)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        let tasks = tokio_util::task::TaskTracker::new();
        let gw = sluice_gateway::pipeline::Gateway::start(
            std::sync::Arc::new(config),
            store,
            Vec::new(),
            tasks.clone(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (sluice_gateway::server::app(gw), tasks)
    });
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "user": "user-1234",
        "messages": [{"role": "user", "content": "Is there a hardback edition of the canal book?"}],
    })
    .to_string();
    bencher.bench_local(|| {
        let request = axum::http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let app = app.clone();
        runtime.block_on(async move {
            let response = app.oneshot(request).await.unwrap_or_else(|e| match e {});
            assert!(response.status().is_success(), "{}", response.status());
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(bytes.ends_with(b"data: [DONE]\n\n"));
            black_box(bytes.len())
        })
    });
}

/// A finished request's record, as the full-feature gateway fills it in.
fn typical_record(id: u64) -> sluice_gateway::telemetry::RequestRecord {
    use sluice_gateway::telemetry::{Endpoint, Outcome, RequestRecord};
    RequestRecord {
        request_id: format!("req_{id:016x}"),
        started_at_ms: 1_764_000_000_000 + id,
        endpoint: Endpoint::ChatCompletions,
        stream: false,
        key_id: Some("key_0123456789abcdef".into()),
        owner: Some("search-team".into()),
        user: Some("user-1234".into()),
        tier: Some("paid".into()),
        model_requested: Some("gpt-4o-mini".into()),
        model: Some("gpt-4o-mini".into()),
        provider: Some("openai".into()),
        outcome: Outcome::Ok,
        status: 200,
        upstream_calls: 1,
        cache_status: Some("miss".into()),
        prompt_tokens: 240,
        completion_tokens: 18,
        cost_micros: Some(47),
        cost_nanos: Some(46_800),
        latency_ms: 412.5,
        ttft_ms: Some(180.2),
        upstream_ms: Some(412.3),
        overhead_ms: Some(0.2),
        input_hash: Some("9f86d081884c7d65".into()),
        guard_flags: Some("pii_email".into()),
        output_check: Some("pass".into()),
        ..RequestRecord::default()
    }
}

/// A record to JSON (what the admin API and a JSON sink write per request).
#[divan::bench]
fn record_to_json(bencher: divan::Bencher) {
    let record = typical_record(1);
    bencher.bench_local(|| serde_json::to_vec(black_box(&record)).map(|v| v.len()).ok());
}

/// Records into the SQLite request log (a file in WAL mode, as `[storage] path`), 64 to
/// a transaction as the writer batches them under load; the figure is per batch, the
/// counter gives it per row. Each batch has fresh request ids, so every row is written.
#[divan::bench]
fn record_insert_sqlite_64(bencher: divan::Bencher) {
    let runtime = runtime();
    let dir = std::env::temp_dir().join(format!("sluice-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let target = sluice_gateway::store::StorageTarget::Sqlite(dir.join("sluice.db"));
    let store = runtime
        .block_on(sluice_gateway::store::Store::open(&target))
        .unwrap_or_else(|e| panic!("{e}"));
    let next = std::cell::Cell::new(0u64);
    bencher
        .counter(divan::counter::ItemsCount::new(64usize))
        .with_inputs(|| {
            (0..64)
                .map(|_| {
                    next.set(next.get() + 1);
                    typical_record(next.get())
                })
                .collect::<Vec<_>>()
                .into()
        })
        .bench_local_values(|batch: sluice_gateway::telemetry::RecordBatch| {
            runtime
                .block_on(store.insert_batch(black_box(&batch)))
                .unwrap_or_else(|e| panic!("{e}"))
        });
    runtime.block_on(store.close());
    let _ = std::fs::remove_dir_all(&dir);
}

/// An upstream's non-streamed answer as `sluice mock` sends it (about 500 bytes).
const MOCK_ANSWER: &str = r#"{"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"message":{"content":"Simulated reply: Gateway stable read they bytes budget bytes read a model. What stay while streams cache show routes each. In hits upstream answers stays work stable work stable budget metrics. Stay answers clients.","refusal":null,"role":"assistant"}}],"created":1700000000,"id":"chatcmpl-sim-0","model":"gpt-4o-mini","object":"chat.completion","system_fingerprint":"fp_sim","usage":{"completion_tokens":61,"prompt_tokens":14,"total_tokens":75}}"#;

#[divan::bench]
fn chat_response_parse(bencher: divan::Bencher) {
    bencher.bench_local(|| {
        black_box(
            serde_json::from_str::<sluice_gateway::wire::ChatResponse>(black_box(MOCK_ANSWER)).ok(),
        )
    });
}

#[divan::bench]
fn chat_response_parse_value(bencher: divan::Bencher) {
    bencher.bench_local(|| {
        black_box(serde_json::from_str::<serde_json::Value>(black_box(MOCK_ANSWER)).ok())
    });
}

#[divan::bench]
fn chat_response_parse_ignored(bencher: divan::Bencher) {
    bencher.bench_local(|| {
        black_box(serde_json::from_str::<serde::de::IgnoredAny>(black_box(MOCK_ANSWER)).ok())
    });
}
