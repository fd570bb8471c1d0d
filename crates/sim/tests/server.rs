//! Black-box tests of the simulator over real HTTP: a `MockServer` on a random loopback
//! port, driven with reqwest, checked against the pure wire functions.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};
use sluice_sim::{ChaosConfig, MockServer, anthropic, openai};

#[expect(
    clippy::unwrap_used,
    reason = "test helper: a failure here should fail the test"
)]
async fn start(cfg: ChaosConfig) -> MockServer {
    MockServer::start(([127, 0, 0, 1], 0).into(), cfg)
        .await
        .unwrap()
}

fn chat_req(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": "hello over http"}],
    })
}

fn anthropic_req(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "stream": stream,
        "system": "be brief",
        "messages": [{"role": "user", "content": "hello over http"}],
    })
}

/// A client; reqwest is built without a TLS provider, so one is installed first (plain
/// http never uses it, but reqwest refuses to build a client without it).
fn client() -> reqwest::Client {
    // Err means another test installed it already, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[expect(
    clippy::unwrap_used,
    reason = "test helper: a failure here should fail the test"
)]
async fn post(server: &MockServer, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", server.url()))
        .bearer_auth("sk-anything")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an OpenAI-style SSE body, `[DONE]` included.
#[expect(
    clippy::unwrap_used,
    reason = "test helper: a failure here should fail the test"
)]
fn data_lines(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter(|frame| !frame.is_empty())
        .map(|frame| frame.strip_prefix("data: ").unwrap())
        .collect()
}

#[tokio::test]
async fn chat_completion_is_byte_identical_to_the_pure_function() {
    let server = start(ChaosConfig::default()).await;
    let resp = post(&server, "/chat/completions", &chat_req(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let bytes = resp.bytes().await.unwrap();
    let expected = serde_json::to_vec(&openai::chat_completion(&chat_req(false), 0).unwrap());
    assert_eq!(bytes.as_ref(), expected.unwrap().as_slice());
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn stream_sends_every_chunk_then_done() {
    let server = start(ChaosConfig::default()).await;
    let resp = post(&server, "/chat/completions", &chat_req(true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.unwrap();
    let lines = data_lines(&body);
    assert_eq!(lines.last(), Some(&"[DONE]"));
    let expected = openai::chat_chunks(&chat_req(true), 0).unwrap();
    assert_eq!(lines[..lines.len() - 1], expected);
}

#[tokio::test]
async fn paced_stream_honours_ttft_and_rate() {
    let server = start(ChaosConfig {
        ttft: Duration::from_millis(60),
        tokens_per_sec: Some(2000.0),
        ..ChaosConfig::default()
    })
    .await;
    let started = Instant::now();
    let resp = post(&server, "/chat/completions", &chat_req(true)).await;
    let body = resp.text().await.unwrap();
    let elapsed = started.elapsed();
    let lines = data_lines(&body);
    assert_eq!(lines.last(), Some(&"[DONE]"));
    // ttft plus a 0.5 ms gap between each of the (at least 15) chunks.
    assert!(elapsed >= Duration::from_millis(60 + 7), "{elapsed:?}");
    assert_eq!(
        lines[..lines.len() - 1],
        openai::chat_chunks(&chat_req(true), 0).unwrap()
    );
}

#[tokio::test]
async fn cut_stream_breaks_the_body_without_done() {
    let server = start(ChaosConfig {
        cut_after: Some(3),
        ..ChaosConfig::default()
    })
    .await;
    let resp = post(&server, "/chat/completions", &chat_req(true)).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut received = Vec::new();
    let mut failed = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the client must see the stream break");
    let text = String::from_utf8(received).unwrap();
    assert!(!text.contains("[DONE]"));
    let expected = openai::chat_chunks(&chat_req(true), 0).unwrap();
    assert_eq!(data_lines(&text), expected[..3]);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let server = start(ChaosConfig {
        rpm: Some(1),
        ..ChaosConfig::default()
    })
    .await;
    assert_eq!(
        post(&server, "/chat/completions", &chat_req(false))
            .await
            .status(),
        200
    );
    let resp = post(&server, "/chat/completions", &chat_req(false)).await;
    assert_eq!(resp.status(), 429);
    let headers = resp.headers();
    let secs: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    let ms: u64 = headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!(ms.div_ceil(1000) == secs, "{ms} vs {secs}");
    assert_eq!(headers["x-ratelimit-limit-requests"], "1");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    assert!(headers.contains_key("x-ratelimit-reset-requests"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(server.calls(), 2);
}

#[tokio::test]
async fn answers_announce_the_rate_window_in_both_formats() {
    let server = start(ChaosConfig {
        rpm: Some(3),
        ..ChaosConfig::default()
    })
    .await;
    let resp = post(&server, "/chat/completions", &chat_req(false)).await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers();
    assert_eq!(headers["x-ratelimit-limit-requests"], "3");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "2");
    let reset = headers["x-ratelimit-reset-requests"].to_str().unwrap();
    assert!(reset.ends_with('s'), "{reset}");

    let resp = post(&server, "/messages", &anthropic_req(true)).await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers();
    assert_eq!(headers["anthropic-ratelimit-requests-limit"], "3");
    assert_eq!(headers["anthropic-ratelimit-requests-remaining"], "1");
    let reset = headers["anthropic-ratelimit-requests-reset"]
        .to_str()
        .unwrap();
    humantime::parse_rfc3339(reset).unwrap();

    // Without rpm nothing is announced.
    let plain = start(ChaosConfig::default()).await;
    let resp = post(&plain, "/embeddings", &json!({"model": "e", "input": "x"})).await;
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("x-ratelimit-limit-requests"));
}

#[tokio::test]
async fn fail_first_then_recovers_on_anthropic_route() {
    let server = start(ChaosConfig {
        fail_first: 1,
        fail_status: 529,
        ..ChaosConfig::default()
    })
    .await;
    let resp = post(&server, "/messages", &anthropic_req(false)).await;
    assert_eq!(resp.status(), 529);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error");
    let resp = post(&server, "/messages", &anthropic_req(false)).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, anthropic::message(&anthropic_req(false), 0).unwrap());
}

#[tokio::test]
async fn anthropic_stream_events_in_order() {
    let server = start(ChaosConfig::default()).await;
    let resp = post(&server, "/messages", &anthropic_req(true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.unwrap();
    let got: Vec<(String, String)> = body
        .split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|frame| {
            let (event, data) = frame.split_once('\n').unwrap();
            (
                event.strip_prefix("event: ").unwrap().to_owned(),
                data.strip_prefix("data: ").unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        anthropic::message_events(&anthropic_req(true), 0).unwrap()
    );
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(!body.contains("[DONE]"));
}

#[tokio::test]
async fn embeddings_return_one_vector_per_input() {
    let server = start(ChaosConfig::default()).await;
    let req = json!({"model": "text-embedding-3-small", "input": ["one", "two"]});
    let resp = post(&server, "/embeddings", &req).await;
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    // Bytes, not parsed values: serde_json's default float parsing may miss the last ulp.
    let expected = serde_json::to_vec(&openai::embeddings(&req).unwrap()).unwrap();
    assert_eq!(bytes.as_ref(), expected.as_slice());
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["embedding"].as_array().unwrap().len(), 1536);
    }
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let server = start(ChaosConfig::default()).await;
    let client = client();
    let resp = client
        .post(format!("{}/chat/completions", server.url()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let resp = post(&server, "/chat/completions", &json!({"model": "m"})).await;
    assert_eq!(resp.status(), 400);
    let resp = post(&server, "/messages", &json!({"model": "m", "messages": []})).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let resp = client
        .get(format!("{}/nope", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn models_and_health_skip_chaos() {
    let server = start(ChaosConfig {
        error_rate: 1.0,
        ..ChaosConfig::default()
    })
    .await;
    let client = client();
    let models: Value = client
        .get(format!("{}/models", server.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models, openai::models(openai::MODELS));
    let health = client
        .get(format!("http://{}/healthz", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(server.calls(), 0);
    let resp = post(&server, "/chat/completions", &chat_req(false)).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn latency_delays_the_answer() {
    let server = start(ChaosConfig {
        latency: Duration::from_millis(50),
        ..ChaosConfig::default()
    })
    .await;
    let started = Instant::now();
    let resp = post(&server, "/chat/completions", &chat_req(false)).await;
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_applies_to_anthropic_and_to_short_streams() {
    let server = start(ChaosConfig {
        cut_after: Some(10_000),
        ..ChaosConfig::default()
    })
    .await;
    for (path, req) in [
        ("/chat/completions", chat_req(true)),
        ("/messages", anthropic_req(true)),
    ] {
        let resp = post(&server, path, &req).await;
        assert_eq!(resp.status(), 200);
        // Even a cut past the last chunk drops the connection instead of ending cleanly.
        let err = resp.text().await;
        assert!(err.is_err(), "{path}: {err:?}");
    }
}
